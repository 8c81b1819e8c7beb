"""Model accounting: parameters, activated parameters, FLOPs and memory traffic per token.

Read from the annotated graph (``ultraplan.param``, ``ultraplan.cost``, ``ultraplan.component``),
so the numbers are the ones the planner uses. Conventions (docs/accounting.md):

- ``params``: every distinct parameter element once (a tied embedding counts once);
- ``active_params``: the elements one token's forward reads. A dense read counts the whole
  tensor; a sparse read (``gather_rows`` of a value table, ``expert_ffn`` of stacked experts)
  counts the rows one token selects (h*k value rows, k experts), summed over the ops that read the
  tensor (a table shared by several layers) and capped at its size. The token embedding is counted
  whole, the convention of the MoE and memory-layer papers' tables;
- ``*_non_embedding``: the same without the token embedding and the LM head;
- ``flops_per_token``: forward matrix-product FLOPs / (B T), the FlopCounterMode convention, as
  a sympy expression in ``T`` evaluated at the spec's seq_len;
- ``memory_access_bytes_per_token``: weight bytes a decode step (T = 1) of B tokens reads, per
  token, in the dtype the forward reads each parameter in (bfloat16 under ``train.precision: bf16``,
  passes/precision.py): dense tensors once per step; a sparse tensor's expected
  distinct rows R (1 - (1 - r/R)^B) for r rows per token of R (uniform routing). The token
  embedding is such a sparse read (one row per token; V (1 - (1 - 1/V)^B) rows), unless it is tied
  to the LM head, which reads the whole matrix. Activations are left out: at decode they are a few
  hidden-size vectors per token against megabytes of weights.

``spec_stats`` lowers one layer per distinct block (a group's repeats are one block) and weighs
each by how many layers it stands for, so 1,000 identical layers cost what one does; specs whose
layers interact (tables shared across layers, outputs delivered to later layers) are lowered whole.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import sympy
from torch import fx

from ..compiler.lower import tensor_args
from ..compiler.memory_tables import table_slots
from ..compiler.node_info import info
from ..compiler.schema import MEMORY_KINDS, LayerSpec, ModelSpec
from ..compiler.shapes import B, T
from .annotate_cost import annotate_cost, flops_per_token_by
from .cost import Touch, expected_distinct
from .pipeline import lower_spec
from .precision import COMPUTE_DTYPES, assign_dtypes
from .symbols import BYTES_PER_ELEMENT, evaluate

# lowering tags the token and position embeddings and the LM head so (Kaplan et al. 2020 leave
# positional embeddings out of the non-embedding count too)
EMBEDDING_COMPONENTS = ("embedding", "position_embedding", "lm_head")


@dataclass(frozen=True)
class ModelStats:
    params: int
    active_params: int
    params_non_embedding: int
    active_params_non_embedding: int
    flops_per_token: sympy.Expr  # in T
    memory_access_bytes_per_token: sympy.Expr  # in B
    seq_len: int
    by_component: dict[str, dict] = field(default_factory=dict)

    @property
    def memory_to_ffn(self) -> float | None:
        """Memory-layer FLOPs / FFN FLOPs per token over the model (UltraMemV2's rebalancing knob;
        its "memory compute proportion" is r / (1 + r) if read as the memory's share of the two)."""
        zero = sympy.Integer(0)
        memory = sum((c["flops_per_token"] for k, c in self.by_component.items() if k in MEMORY_KINDS), zero)
        ffn = self.by_component.get("ffn", {}).get("flops_per_token", zero)
        if memory == 0 or ffn == 0:
            return None
        return float((memory / ffn).subs(T, self.seq_len))

    def as_dict(self, batch: int = 1, *, by_component: bool = False) -> dict:
        out = {"params": self.params, "active_params": self.active_params,
               "params_non_embedding": self.params_non_embedding,
               "active_params_non_embedding": self.active_params_non_embedding,
               "flops_per_token": _number(self.flops_per_token.subs(T, self.seq_len)),
               "flops_per_token_expr": str(self.flops_per_token), "seq_len": self.seq_len,
               "batch": batch,
               "memory_access_bytes_per_token": _at_batch(self.memory_access_bytes_per_token, batch),
               "memory_access_bytes_per_token_expr": str(self.memory_access_bytes_per_token),
               "memory_to_ffn": self.memory_to_ffn}
        if by_component:
            out["by_component"] = {
                name: {"params": c["params"], "active_params": c["active_params"],
                       "flops_per_token": _number(c["flops_per_token"].subs(T, self.seq_len)),
                       "memory_access_bytes_per_token": _at_batch(c["memory_access"], batch)}
                for name, c in self.by_component.items()}
        return out


def _at_batch(expr: sympy.Expr, batch: int) -> int | float:
    """``expr`` at B = ``batch``; (1 - r/R)^B is evaluated in floating point, since exact powers at a
    large B (``stats --batch 2**62``) build fractions with more digits than memory holds."""
    if any(not p.exp.is_number for p in sympy.sympify(expr).atoms(sympy.Pow)):
        return evaluate(expr, {B: batch})
    return _number(sympy.sympify(expr).subs(B, batch))


def _number(value: sympy.Expr) -> int | float:
    value = sympy.nsimplify(value) if value.is_Float else value
    return int(value) if value.is_integer else float(value)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _reads(param: fx.Node) -> list[Touch | None]:
    """How each op reading ``param`` reads it: a Touch for a sparse read, None for a dense one."""
    reads = []
    for user in param.users:
        positions = [i for i, a in enumerate(tensor_args(user)) if a is param]
        sparse = dict(info(user).cost.sparse_inputs)
        touches = [sparse.get(i) for i in positions]
        reads.append(None if any(t is None for t in touches) else touches[0])
    return reads


def _param_accounting(param: fx.Node) -> tuple[int, int, sympy.Expr]:
    """(elements, active elements per token, distinct bytes read by a decode step of B tokens)."""
    record = info(param).param
    numel = _numel(record.shape)
    size = BYTES_PER_ELEMENT[info(param).dtype]
    reads = _reads(param)
    if reads and all(info(user).op == "embedding" for user in param.users):
        rows, width = record.shape  # a lookup gathers one row per token; counted whole in active_params
        return numel, numel, size * width * expected_distinct(rows, sympy.Integer(1), B)
    if not reads or any(r is None for r in reads):
        return numel, numel, sympy.Integer(size * numel)
    first = reads[0]
    rows_per_token = sympy.Min(first.rows, sum((r.rows_per_token for r in reads), sympy.Integer(0)))
    active = int(rows_per_token) * first.row_elems
    distinct_rows = expected_distinct(first.rows, rows_per_token, B)
    return numel, min(active, numel), size * first.row_elems * distinct_rows


LAYER_PATH = re.compile(r"^layers\.(\d+)(\.|$)")


def _layer_of(node: fx.Node) -> int | None:
    found = LAYER_PATH.match(info(node).layer)
    return int(found.group(1)) if found else None


def model_stats(gm: fx.GraphModule, seq_len: int, weight: Callable[[int], int] = lambda layer: 1) -> ModelStats:
    """Requires ``annotate_cost`` to have run on ``gm``. ``weight(i)``: how many layers of the model
    layer ``i`` of ``gm`` stands for (``spec_stats`` lowers each distinct block once)."""

    def times(node: fx.Node) -> int:
        layer = _layer_of(node)
        return 1 if layer is None else weight(layer)

    zero = sympy.Integer(0)
    comp: dict[str, dict] = defaultdict(lambda: {"params": 0, "active_params": 0, "flops_per_token": zero,
                                                 "memory_access": zero})
    totals = {"params": 0, "active": 0, "params_ne": 0, "active_ne": 0, "access": zero}
    for node in gm.graph.nodes:
        c = comp[info(node).component]
        if info(node).op == "param":
            numel, active, access = _param_accounting(node)
            n = times(node)
            numel, active, access = n * numel, n * active, n * access
            embedding = info(node).component in EMBEDDING_COMPONENTS
            totals["params"] += numel
            totals["active"] += active
            totals["params_ne"] += 0 if embedding else numel
            totals["active_ne"] += 0 if embedding else active
            totals["access"] += access / B
            c["params"] += numel
            c["active_params"] += active
            c["memory_access"] += access / B
    by_key = flops_per_token_by(gm, lambda node: (info(node).component, times(node)))
    for (name, n), flops in by_key.items():
        comp[name]["flops_per_token"] = sympy.expand(comp[name]["flops_per_token"] + n * flops)
    flops = sympy.expand(sum((c["flops_per_token"] for c in comp.values()), zero))
    assert B not in flops.free_symbols, f"FLOPs per token should not depend on B: {flops}"
    by_component = {k: v for k, v in comp.items() if v["params"] or v["flops_per_token"] != 0}
    return ModelStats(totals["params"], totals["active"], totals["params_ne"], totals["active_ne"], flops,
                      totals["access"], seq_len, by_component)


def distinct_layers(spec: ModelSpec) -> tuple[ModelSpec, list[int]] | None:
    """(a spec of one layer per distinct block, how many layers each stands for), or None when
    the layers interact (a table shared across layers, an output delivered later) or are all
    distinct already: then only the whole spec gives the right counts."""
    if table_slots(spec) or any(s.deliver_after for layer in spec.layers for s in layer.sublayers):
        return None
    counts: dict[tuple, int] = {}
    first: dict[tuple, LayerSpec] = {}
    for layer in spec.layers:
        counts[layer.sublayers] = counts.get(layer.sublayers, 0) + 1
        first.setdefault(layer.sublayers, layer)
    if len(counts) == len(spec.layers):
        return None
    layers = tuple(dataclasses.replace(first[key], index=i) for i, key in enumerate(counts))
    return dataclasses.replace(spec, layers=layers), list(counts.values())


def spec_stats(spec: ModelSpec) -> ModelStats:
    """Accounting of ``spec`` at its seq_len, from its inference graph (no weights allocated); each
    distinct block is lowered once and counted as many times as it occurs."""
    compute = COMPUTE_DTYPES[spec.train.precision]  # weights are read as the forward reads them
    reduced = distinct_layers(spec)
    if reduced is None:
        gm = lower_spec(spec, mode="infer")
        assign_dtypes(gm, compute)
        annotate_cost(gm, None)
        return model_stats(gm, spec.seq_len)
    small, counts = reduced
    gm = lower_spec(small, mode="infer")
    assign_dtypes(gm, compute)
    annotate_cost(gm, None)
    return model_stats(gm, spec.seq_len, weight=lambda layer: counts[layer])
