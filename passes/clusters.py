"""Repeated layers, found once: the search gives every node of identical layers one shared choice.

A layer is the nodes whose ``layer`` starts with ``layers.{i}``. Two layers are identical when their
nodes, in graph order, have the same op, attributes, concrete shape, dtype, parameter (name within
the layer and shape), traits, pins, whether a gradient reaches them, and the same arguments (an
argument inside the layer by its position there, one outside it only as "outside"). Every class of
identical layers is planned as one block with its boundary layouts: node ``j`` of every layer in
the class is one group of the integer program (passes/search_ilp.py) with ``count`` = the layers
it stands for, so a 32-layer model solves one block problem, not 32 (meta-pytorch/autoparallel's
``repeated_subgraphs`` and ColossalAI's repeated-block aliasing do the same). Values are
partitioned by which classes read them, so the costs of tied layers stay exact; what tying loses
is bounded in docs/search.md (``boundary_bound`` computes it).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import fx

from ..compiler.lower import tensor_args
from ..compiler.node_info import info


def block_of(node: fx.Node) -> str | None:
    """``layers.3`` for a node of the fourth layer, None outside the repeated layers."""
    parts = info(node).layer.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 and parts[0] == "layers" else None


def _describe(node: fx.Node, index: dict[fx.Node, int], prefix: str, extra: Callable[[fx.Node], object]) -> tuple:
    rec = info(node)
    param = rec.param
    number = re.compile(rf"(?<![0-9]){re.escape(prefix.split('.')[1])}(?![0-9])")

    def own(name: str) -> str:  # the layer's own names without its number (layers.3.x, memory_tables.layer3_x)
        return number.sub("#", name)

    param_key = (own(param.name), param.shape, param.group) if param is not None else None
    buf = rec.buffer
    buffer_key = (own(buf.name), buf.shape, buf.dtype, buf.init, buf.op, own(buf.source)) if buf is not None else None
    args = tuple(("in", index[a]) if a in index else ("out", info(a).concrete_shape, info(a).dtype)
                 for a in tensor_args(node))
    return (rec.op, repr(sorted(rec.attrs.items())), rec.concrete_shape, rec.dtype, param_key,
            buffer_key, rec.stream, rec.differentiable, rec.component, args, extra(node))


def classes(gm: fx.GraphModule, extra: Callable[[fx.Node], object], *, cluster: bool = True) -> dict[fx.Node, int]:
    """Class id of every node (not the output): nodes of identical layers at the same position share
    one; every other node has its own. ``extra(node)`` adds what the caller must see equal (pins)."""
    layers: dict[str, list[fx.Node]] = {}
    out: dict[fx.Node, int] = {}
    batch: dict[tuple, int] = {}  # the batch's inputs (tokens, targets) by shape and pins
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        block = block_of(node) if cluster else None
        if node.op == "placeholder":
            # one layout for the batch's inputs: the program slices one batch for both (BATCH_SBP)
            out[node] = batch.setdefault((info(node).concrete_shape, extra(node)), len(out) + 10**9)
        elif block is None:
            out[node] = len(out) + 10**9  # renumbered below
        else:
            layers.setdefault(block, []).append(node)
    seen: dict[tuple, list[int]] = {}
    for block, nodes in layers.items():
        index = {n: i for i, n in enumerate(nodes)}
        key = tuple(_describe(n, index, block + ".", extra) for n in nodes)
        if key not in seen:
            seen[key] = [len(out) + 10**9 + i for i in range(len(nodes))]
        for n, cls in zip(nodes, seen[key]):
            out[n] = cls
    ids: dict[int, int] = {}
    return {n: ids.setdefault(c, len(ids)) for n, c in out.items()}


def count_blocks(gm: fx.GraphModule, cls: dict[fx.Node, int]) -> dict[str, int]:
    """Layers per class, named by the first layer of the class (``{"layers.0": 32}``)."""
    firsts: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        block = block_of(node)
        if block is not None and node in cls:
            firsts.setdefault(block, node)
    names: dict[int, str] = {}
    counts: dict[str, int] = {}
    for block, node in firsts.items():
        name = names.setdefault(cls[node], block)
        counts[name] = counts.get(name, 0) + 1
    return counts
