"""Repeated layers, found once: the search gives every node of identical layers one shared choice.

A layer is the nodes whose ``layer`` starts with ``layers.{i}``. Two layers are identical when their
nodes, in graph order, have the same op, attributes, concrete shape, dtype, parameter (name within
the layer and shape), traits, pins, whether a gradient reaches them, and the same arguments (an
argument inside the layer by its position there, one outside it by its shape, dtype and pins: a layer
whose own value table is forced another way is not tied to the others). Every class of
identical layers is planned as one block with its boundary layouts: node ``j`` of every layer in
the class is one group of the integer program (passes/search_ilp.py) with ``count`` = the layers
it stands for, so a 32-layer model solves one block problem, not 32 (meta-pytorch/autoparallel's
``repeated_subgraphs`` and ColossalAI's repeated-block aliasing do the same). Values are
partitioned by which classes read them, so the costs of tied layers stay exact; what tying loses
is bounded in docs/search.md (``boundary_bound`` computes it).

Attributes that only say where a layer's rows start in a table several layers share (``POSITIONS``:
UltraMemV2's ring- and block-shared value tables, compiler/memory_tables.py, put layer l at
offset l n^2) are left out of the comparison: no cost rule reads them (compiler/op_table.py prices
these ops by shapes), so layers that differ only there cost the same in every layout, as
passes/blocks.py treats them as one block with per-layer constants. Without this no two
UltraMemV2 layers of a shared table are identical and the Table 10 models do not cluster.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import fx

from ..compiler.lower import tensor_args
from ..compiler.node_info import info

POSITIONS: dict[str, frozenset[str]] = {op: frozenset({"offset"}) for op in ("shuffle_rows", "expanded_rows")}


def block_of(node: fx.Node) -> str | None:
    """``layers.3`` for a node of the fourth layer, None outside the repeated layers. A parameter or
    buffer belongs where its canonical name puts it: a table several layers share (``memory_tables.*``)
    is the model's, though tracing reaches it inside the first layer that reads it."""
    rec = info(node)
    state = rec.param or rec.buffer
    parts = (state.name if state is not None else rec.layer).split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 and parts[0] == "layers" else None


def _describe(node: fx.Node, index: dict[fx.Node, int], prefix: str, extra: Callable[[fx.Node], object]) -> tuple:
    rec = info(node)
    param = rec.param
    i = re.escape(prefix.split(".")[1])
    number = re.compile(rf"(?<=layers\.){i}(?![0-9])|(?<=layer){i}(?![0-9])")

    def own(name: str) -> str:  # the layer's own names without its number (layers.3.x, memory_tables.layer3_x),
        return number.sub("#", name)  # and nothing else: layer 2's ultramem_v2 keeps its "v2"

    param_key = (own(param.name), param.shape, param.group) if param is not None else None
    buf = rec.buffer
    buffer_key = (own(buf.name), buf.shape, buf.dtype, buf.init, buf.op, own(buf.source)) if buf is not None else None
    args = tuple(("in", index[a]) if a in index else ("out", info(a).concrete_shape, info(a).dtype, extra(a))
                 for a in tensor_args(node))
    masked = POSITIONS.get(rec.op, frozenset())
    attrs = sorted((k, "#" if k in masked else v) for k, v in rec.attrs.items())
    return (rec.op, repr(attrs), rec.concrete_shape, rec.dtype, param_key,
            buffer_key, rec.stream, rec.differentiable, rec.component, args, extra(node))


def runs(n: int) -> list[int]:
    """The run of each of ``n`` identical layers when they are split for a knapsack: runs of 1, 2, 4,
    ... layers and the rest, so any number 0..n of them is a sum of whole runs (the bounded knapsack's
    binary split, e.g. Martello and Toth, *Knapsack Problems*, 1990, section 3.2) with about log2(n)
    choices instead of one: ``runs(5) == [0, 1, 1, 2, 2]``, ``runs(24)``: runs of 1, 2, 4, 8 and 9."""
    out: list[int] = []
    size = 1
    while len(out) < n:
        take = min(size, n - len(out))
        out += [len(set(out))] * take
        size *= 2
    return out


def classes(gm: fx.GraphModule, extra: Callable[[fx.Node], object], *, cluster: bool = True,
            split: bool = False) -> dict[fx.Node, int]:
    """Class id of every node (not the output): nodes of identical layers at the same position share
    one; every other node has its own. ``extra(node)`` adds what the caller must see equal (pins).
    ``split``: identical layers are tied in consecutive ``runs`` rather than all together, so that
    when the device memory binds some of them can take a leaner layout than the others."""
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
    keys = {block: tuple(_describe(n, {n: i for i, n in enumerate(nodes)}, block + ".", extra) for n in nodes)
            for block, nodes in layers.items()}
    run_of: dict[str, int] = {}
    for key in set(keys.values()):
        same = [block for block in layers if keys[block] == key]
        run_of |= dict(zip(same, runs(len(same)) if split else [0] * len(same)))
    seen: dict[tuple, list[int]] = {}
    for block, nodes in layers.items():
        key = (keys[block], run_of[block])
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
