"""Model accounting: parameters, activated parameters and forward FLOPs per token.

Read from the annotated graph (``ultraplan.param`` and ``ultraplan.cost``), so the numbers are the
ones the planner uses. Conventions (docs/accounting.md):

- ``params``: every distinct parameter element once (a tied embedding counts once);
- ``active_params``: the elements one token's forward touches; for a dense model that is all
  of them (the token embedding is counted whole, the convention of MoE papers' tables);
- ``flops_per_token``: forward matrix-product FLOPs / (B T), the FlopCounterMode convention, as
  a sympy expression in ``T`` (attention grows with T) and evaluated at the spec's seq_len.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
from torch import fx

from ..compiler.schema import ModelSpec
from ..compiler.shapes import B, T
from .annotate_cost import annotate_cost
from .pipeline import lower_spec


@dataclass(frozen=True)
class ModelStats:
    params: int
    active_params: int
    flops_per_token: sympy.Expr
    seq_len: int

    def as_dict(self) -> dict:
        value = self.flops_per_token.subs(T, self.seq_len)
        return {"params": self.params, "active_params": self.active_params,
                "flops_per_token": int(value) if value.is_integer else float(value),
                "flops_per_token_expr": str(self.flops_per_token), "seq_len": self.seq_len}


def spec_stats(spec: ModelSpec) -> ModelStats:
    """Accounting of ``spec`` at its seq_len, from its inference graph (no weights allocated)."""
    gm = lower_spec(spec, mode="infer")
    annotate_cost(gm, None)
    return model_stats(gm, spec.seq_len)


def model_stats(gm: fx.GraphModule, seq_len: int) -> ModelStats:
    """Requires ``annotate_cost`` to have run on ``gm``."""
    params = {n.meta["ultraplan.param"].name: n.meta["ultraplan.param"] for n in gm.graph.nodes if n.op == "get_attr"}
    total = sum(_numel(p.shape) for p in params.values())
    flops = sum((n.meta["ultraplan.cost"].flops for n in gm.graph.nodes if "ultraplan.cost" in n.meta),
                sympy.Integer(0))
    per_token = sympy.expand(sympy.simplify(flops / (B * T)))
    assert B not in per_token.free_symbols, f"FLOPs per token should not depend on B: {per_token}"
    return ModelStats(total, total, per_token, seq_len)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out
