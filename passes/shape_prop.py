"""shape_prop: check the symbolic shapes from lowering against torch, at the plan's B and T.

Runs the graph on meta tensors (no memory, no arithmetic), so it works for specs far too large to
allocate. Data-dependent ops (the op table's ``data_dependent``: which tokens go to which expert,
bincount) cannot run on meta tensors; their output shapes do not depend on the data, so their shape
rule stands in for torch (tests/unit/test_lower_and_stats.py checks it on real tensors).
Requires a symbolic shape on every node; promises each equals torch's shape at
``B = ctx.batch, T = ctx.seq`` and records it as ``concrete_shape`` (what costs are evaluated on).
"""

from __future__ import annotations

import time

import torch
from torch import fx

from ..compiler.node_info import info
from ..compiler.op_table import OP_TABLE
from .context import PassReport, PlanContext, PlanError
from .symbols import B, T


def concrete_shapes(gm: fx.GraphModule, batch: int, seq: int) -> dict[str, tuple[int, ...]]:
    """Every node's shape when the graph runs on meta tensors of batch ``batch``, length ``seq``."""
    env: dict[fx.Node, object] = {}
    out: dict[str, tuple[int, ...]] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            value = torch.empty(batch, seq, dtype=torch.int64, device="meta")
        elif node.op == "get_attr":
            dims = tuple(int(d) for d in info(node).shape)
            value = torch.empty(dims, dtype=getattr(torch, info(node).dtype), device="meta")
        elif node.op == "call_function" and OP_TABLE[info(node).op].data_dependent:
            shape = tuple(int(d.subs({B: batch, T: seq})) for d in info(node).shape)
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
        symbolic = tuple(int(d.subs({B: ctx.batch, T: ctx.seq})) for d in info(node).shape)
        assert symbolic == real[node.name], f"{node.name}: shape rule says {symbolic}, torch says {real[node.name]}"
        info(node).concrete_shape = symbolic
    for node in gm.graph.nodes:
        if node.op == "output":
            info(node).concrete_shape = info(node.args[0]).concrete_shape
    return PassReport("shape_prop", time.perf_counter() - start,
                      [f"{len(real)} node shapes agree with torch at B={ctx.batch}, T={ctx.seq}"])
