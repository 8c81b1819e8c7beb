"""shape_prop: check the symbolic shapes from lowering against torch, at the plan's B and T.

Runs the graph on meta tensors (no memory, no arithmetic), so it works for specs far too large to
allocate. Data-dependent ops (the op table's ``data_dependent``: which tokens go to which expert,
bincount) cannot run on meta tensors; their output shapes do not depend on the data, so their shape
rule stands in for torch (tests/unit/test_lower_and_stats.py checks it on real tensors).
Requires a symbolic shape and a dtype on every node; promises each dtype is torch's and each shape equals torch's at
``B = ctx.batch, T = ctx.seq`` and records it as ``concrete_shape`` (what costs are evaluated on).
"""

from __future__ import annotations

import functools
import time

import sympy
import torch
from torch import fx

from ..compiler.node_info import info
from ..compiler.op_table import OP_TABLE
from .context import PassReport, PlanContext, PlanError
from .symbols import B, T


def _key(value: object) -> object:
    """A hashable stand-in for an op argument: a meta tensor by its shape and dtype."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in value.items())))
    return value


def concrete_shapes(gm: fx.GraphModule, batch: int, seq: int,
                    dtypes: dict[str, str] | None = None) -> dict[str, tuple[int, ...]]:
    """Every node's shape when the graph runs on meta tensors of batch ``batch``, length ``seq``;
    ``dtypes``, when given, receives every op's result dtype as torch computes it.

    A call is run once per distinct (op, argument shapes, other arguments): the 32 layers of a
    large model repeat the same few calls, and running an op on meta tensors is what costs."""
    env: dict[fx.Node, object] = {}
    out: dict[str, tuple[int, ...]] = {}
    seen: dict[object, object] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            value = torch.empty(batch, seq, dtype=torch.int64, device="meta")
        elif node.op == "get_attr":
            dims = tuple(int(d) for d in info(node).shape)
            value = torch.empty(dims, dtype=getattr(torch, info(node).dtype), device="meta")
        elif node.op == "call_function" and OP_TABLE[info(node).op].data_dependent:
            shape = tuple(_dim(d, batch, seq) for d in info(node).shape)
            value = torch.empty(shape, dtype=getattr(torch, info(node).dtype), device="meta")
        elif node.op == "call_function":
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            try:
                key = (node.target, _key(args), _key(kwargs))
                hash(key)
            except TypeError:  # an unhashable argument: run it
                key = None
            if key is None or key not in seen:
                value = node.target(*args, **kwargs)
                if key is not None:
                    seen[key] = value
            else:
                value = seen[key]
        else:
            continue
        env[node] = value
        out[node.name] = tuple(value.shape)
        if dtypes is not None and node.op == "call_function" and not OP_TABLE[info(node).op].data_dependent:
            dtypes[node.name] = str(value.dtype).removeprefix("torch.")
    return out


@functools.cache
def _dim(dim: object, batch: int, seq: int) -> int:
    """A symbolic dim at B=batch, T=seq (cached: a graph has few distinct dims)."""
    return int(sympy.sympify(dim).xreplace({B: batch, T: seq}))


def shape_prop(gm: fx.GraphModule, ctx: PlanContext) -> PassReport:
    start = time.perf_counter()
    try:
        real = concrete_shapes(gm, ctx.batch, ctx.seq, dtypes := {})
    except RuntimeError as exc:  # e.g. B x T x vocab past what torch can size, even on meta tensors
        raise PlanError(f"torch cannot size this graph at B={ctx.batch}, T={ctx.seq} ({exc}); "
                        "lower --batch or --seq") from None
    for node in gm.graph.nodes:
        if node.name not in real:
            continue
        symbolic = tuple(_dim(d, ctx.batch, ctx.seq) for d in info(node).shape)
        assert symbolic == real[node.name], f"{node.name}: shape rule says {symbolic}, torch says {real[node.name]}"
        assert dtypes.get(node.name, info(node).dtype) == info(node).dtype, \
            f"{node.name}: the precision pass says {info(node).dtype}, torch computes {dtypes[node.name]}"
        info(node).concrete_shape = symbolic
    for node in gm.graph.nodes:
        if node.op == "output":
            info(node).concrete_shape = info(node.args[0]).concrete_shape
    return PassReport("shape_prop", time.perf_counter() - start,
                      [f"{len(real)} node shapes agree with torch at B={ctx.batch}, T={ctx.seq}"])
