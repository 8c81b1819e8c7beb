"""shape_prop: check the symbolic shapes from lowering against torch, at the plan's B and T.

Runs the graph on meta tensors (no memory, no arithmetic), so it works for specs far too large to
allocate. Data-dependent ops (``DATA_DEPENDENT``) take their shape rule's word.
Requires ``ultraplan.shape`` on every node; promises each equals torch's shape at
``B = ctx.batch, T = ctx.seq``.
"""

from __future__ import annotations

import time

import torch
from torch import fx

from .choose_sbp import PlanError
from .context import PassReport, PlanContext
from .symbols import B, T

# Ops whose kernels pick work by data (which tokens go to which expert, bincount) and so cannot
# run on meta tensors. Their output shapes do not depend on the data (the input's, or (E,));
# the rule stands in for torch here, and tests/unit/test_lower_and_stats.py checks it on real tensors.
DATA_DEPENDENT = {"expert_ffn", "expert_counts"}


def concrete_shapes(gm: fx.GraphModule, batch: int, seq: int) -> dict[str, tuple[int, ...]]:
    """Every node's shape when the graph runs on meta tensors of batch ``batch``, length ``seq``."""
    env: dict[fx.Node, object] = {}
    out: dict[str, tuple[int, ...]] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            value = torch.empty(batch, seq, dtype=torch.int64, device="meta")
        elif node.op == "get_attr":
            dims = tuple(int(d) for d in node.meta["ultraplan.shape"])
            value = torch.empty(dims, dtype=getattr(torch, node.meta["ultraplan.dtype"]), device="meta")
        elif node.op == "call_function" and node.meta["ultraplan.op"] in DATA_DEPENDENT:
            shape = tuple(int(d.subs({B: batch, T: seq})) for d in node.meta["ultraplan.shape"])
            value = torch.empty(shape, device="meta")
        elif node.op == "call_function":
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            value = node.target(*args, **kwargs)
        else:
            continue
        env[node] = value
        out[node.name] = tuple(value.shape)
    return out


def shape_prop(gm: fx.GraphModule, ctx: PlanContext) -> PassReport:
    start = time.perf_counter()
    try:
        real = concrete_shapes(gm, ctx.batch, ctx.seq)
    except RuntimeError as exc:  # e.g. B x T x vocab past what torch can size, even on meta tensors
        raise PlanError(f"torch cannot size this graph at B={ctx.batch}, T={ctx.seq} ({exc}); "
                        "lower --batch or --seq") from None
    for node in gm.graph.nodes:
        if node.name not in real:
            continue
        symbolic = tuple(int(d.subs({B: ctx.batch, T: ctx.seq})) for d in node.meta["ultraplan.shape"])
        assert symbolic == real[node.name], f"{node.name}: shape rule says {symbolic}, torch says {real[node.name]}"
    return PassReport("shape_prop", time.perf_counter() - start,
                      [f"{len(real)} node shapes agree with torch at B={ctx.batch}, T={ctx.seq}"])
