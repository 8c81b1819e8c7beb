"""Fusion rules whose pattern is a small graph, not a chain (passes/fuse.py runs them after its chains).

A ``GraphRule`` names each op of its pattern and its tensor arguments: another step's name, or an
outside value ``$name`` (the same name binds the same node). Some steps are ``outputs``: their
values are read outside the pattern, and each becomes the fused op its ``Replace`` names, over
outside values and earlier outputs; every other step must be read only inside the pattern and is
removed. Two such rules: product-key retrieval's selection (seven ops between the half scores and
the (scores, slots) pair become ``pk_topk``, the slots, an index op, and ``pk_slot_scores``, their
scores, the only differentiable part) and UltraMem's Tucker selection (eight ops between the rank-1
and per-rank scores and the (core scores, slots) pair become ``tucker_topk`` and
``tucker_slot_scores``; where the halves' top-m ids are read outside too, UltraMemV2's key-balance loss,
the seven after them become ``tucker_grid_topk`` and ``tucker_slot_scores``), so the half_k x half_k grid
is never stored nor saved for the backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sympy
from torch import fx

from ..compiler.lower import tensor_args
from ..compiler.node_info import NodeInfo, info
from ..compiler.op_table import OP_TABLE
from ..compiler.shapes import numel
from .cost import ZERO, op_cost
from .symbols import BYTES_PER_ELEMENT

# (the matched records by step name, training?) -> bytes saved, sympy in B, T
GraphCost = Callable[[dict[str, NodeInfo], bool], sympy.Expr]


@dataclass(frozen=True)
class GStep:
    name: str
    op: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class Replace:
    """An output step becomes ``op`` over ``args`` (outside values ``$x`` or output step names), with
    attributes taken from matched steps: (attribute, step, the step's attribute)."""

    step: str
    op: str
    args: tuple[str, ...]
    attrs: tuple[tuple[str, str, str], ...]


@dataclass(frozen=True)
class GraphRule:
    name: str
    steps: tuple[GStep, ...]
    outputs: tuple[Replace, ...]  # in the order they are made; the first carries the Fusion record
    bytes_saved: GraphCost
    why: str
    extra_flops: GraphCost = lambda recs, train: ZERO  # FLOPs the fused ops add (a recomputation)


def _pk_bytes_saved(recs: dict[str, NodeInfo], train: bool) -> sympy.Expr:
    """Each intermediate the fused selection no longer stores, written once and read by each of its
    readers: the half top-k ids (read by two ops), the kept half scores, the grid of scores (two),
    the grid of slots and the final top-k ids (two). In training the backward no longer writes and
    reads the grid's gradient and the kept half scores' (each slot's gradient goes to its two keys)."""
    def size(step: str) -> sympy.Expr:
        return numel(recs[step].shape) * BYTES_PER_ELEMENT.get(recs[step].dtype, 4)

    forward = 3 * size("half_best") + 2 * size("half_kept") + 3 * size("grid") + 2 * size("grid_slots") + 3 * size("best")
    return forward + (2 * size("grid") + 2 * size("half_kept") if train else ZERO)


def _size(recs: dict[str, NodeInfo], step: str) -> sympy.Expr:
    return numel(recs[step].shape) * BYTES_PER_ELEMENT.get(recs[step].dtype, 4)


def _tucker_bytes_saved(recs: dict[str, NodeInfo], train: bool) -> sympy.Expr:
    """As ``_pk_bytes_saved`` for UltraMem's selection: the half top-m ids (read twice), the kept per-rank
    scores, the grid of every core's scores (read by the core sum and the take), its sum, the grid of
    slots and the final top-m ids (read twice), less what the fused scores write instead: each slot's
    row and column rank vectors (as many as the kept per-rank scores), read back by the backward. In
    training the grid's gradient is no longer written and read back."""
    forward = (3 * _size(recs, "half_best") + _size(recs, "half_kept") + 3 * _size(recs, "grid")
               + 2 * _size(recs, "total") + 2 * _size(recs, "grid_slots") + 3 * _size(recs, "best"))
    return forward + (2 * _size(recs, "grid") - _size(recs, "half_kept") if train else ZERO)


def _tucker_grid_bytes_saved(recs: dict[str, NodeInfo], train: bool) -> sympy.Expr:
    """``_tucker_bytes_saved`` where the half top-m ids are made outside (UltraMemV2's key-balance loss
    counts them): they are written and read as before, so only the rest counts."""
    forward = (_size(recs, "half_kept") + 3 * _size(recs, "grid") + 2 * _size(recs, "total")
               + 2 * _size(recs, "grid_slots") + 3 * _size(recs, "best"))
    return forward + (2 * _size(recs, "grid") - _size(recs, "half_kept") if train else ZERO)


def _tucker_recompute(recs: dict[str, NodeInfo], train: bool) -> sympy.Expr:
    """tucker_slot_scores recomputes the selected slots' scores, row x core (2 tokens H C R^2 M FLOPs);
    the grid's own products are done inside tucker_topk as before (its backward, 2x them, is gone)."""
    cores, ranks = recs["grid"].shape[-2], recs["half_kept"].shape[-2]
    return 2 * numel(recs["best"].shape) * cores * ranks * ranks


GRAPH_RULES: tuple[GraphRule, ...] = (
    GraphRule(
        "product_key_topk",
        (GStep("half_best", "topk_indices", ("$half_scores",)),
         GStep("half_kept", "take", ("$half_scores", "half_best")),
         GStep("grid", "grid_scores", ("half_kept",)),
         GStep("grid_slots", "grid_indices", ("half_best",)),
         GStep("best", "topk_indices", ("grid",)),
         GStep("scores", "take", ("grid", "best")),
         GStep("slots", "take", ("grid_slots", "best"))),
        (Replace("slots", "pk_topk", ("$half_scores",),
                 (("half_k", "half_best", "k"), ("k", "best", "k"), ("num_keys", "grid_slots", "num_keys"))),
         Replace("scores", "pk_slot_scores", ("$half_scores", "slots"), (("num_keys", "grid_slots", "num_keys"),))),
        _pk_bytes_saved,
        "product-key selection in one op: the candidate grid is made and dropped inside, never stored"),
    GraphRule(
        "tucker_topk",
        (GStep("half_best", "topk_indices", ("$filtered",)),
         GStep("half_kept", "take_ranked", ("$scores", "half_best")),
         GStep("grid", "tucker_grid", ("half_kept", "$cores")),
         GStep("total", "sum_cores", ("grid",)),
         GStep("best", "topk_indices", ("total",)),
         GStep("core_scores", "take_cores", ("grid", "best")),
         GStep("grid_slots", "grid_indices", ("half_best",)),
         GStep("slots", "take", ("grid_slots", "best"))),
        (Replace("slots", "tucker_topk", ("$filtered", "$scores", "$cores"),
                 (("half_k", "half_best", "k"), ("k", "best", "k"), ("num_keys", "grid_slots", "num_keys"))),
         Replace("core_scores", "tucker_slot_scores", ("$scores", "$cores", "slots"),
                 (("num_keys", "grid_slots", "num_keys"),))),
        _tucker_bytes_saved,
        "Tucker selection in one op: every core's grid is made and dropped inside; the selected slots' core "
        "scores are recomputed from their row and column rank vectors",
        _tucker_recompute),
    GraphRule(  # the halves' top-m read elsewhere too (UltraMemV2's key-balance loss): the selection from there
        "tucker_grid_topk",
        (GStep("half_kept", "take_ranked", ("$scores", "$half_best")),
         GStep("grid", "tucker_grid", ("half_kept", "$cores")),
         GStep("total", "sum_cores", ("grid",)),
         GStep("best", "topk_indices", ("total",)),
         GStep("core_scores", "take_cores", ("grid", "best")),
         GStep("grid_slots", "grid_indices", ("$half_best",)),
         GStep("slots", "take", ("grid_slots", "best"))),
        (Replace("slots", "tucker_grid_topk", ("$half_best", "$scores", "$cores"),
                 (("k", "best", "k"), ("num_keys", "grid_slots", "num_keys"))),
         Replace("core_scores", "tucker_slot_scores", ("$scores", "$cores", "slots"),
                 (("num_keys", "grid_slots", "num_keys"),))),
        _tucker_grid_bytes_saved,
        "Tucker selection from the halves' top-m (read elsewhere too) in one op: every core's grid is made and "
        "dropped inside; the selected slots' core scores are recomputed from their row and column rank vectors",
        _tucker_recompute),
)


def _step_ok(node: fx.Node, step: GStep) -> bool:
    return node.op == "call_function" and info(node).op == step.op and len(tensor_args(node)) == len(step.args)


def match_graph(anchor: fx.Node, rule: GraphRule) -> dict[str, fx.Node] | None:
    """The nodes ``rule`` matches with its last step at ``anchor`` (step and ``$`` names -> nodes), or None."""
    steps = {s.name: s for s in rule.steps}
    bound: dict[str, fx.Node] = {}

    def bind(name: str, node: fx.Node) -> bool:
        if name in bound:
            return bound[name] is node
        if not name.startswith("$"):
            if not _step_ok(node, steps[name]):
                return False
        if node in bound.values():
            return False
        bound[name] = node
        return name.startswith("$") or all(bind(a, n) for a, n in zip(steps[name].args, tensor_args(node)))

    if not bind(rule.steps[-1].name, anchor):
        return None
    pending = [s for s in rule.steps if s.name not in bound]
    while pending:  # steps that are no ancestor of the anchor: among the readers of a bound argument
        step = next((s for s in pending if any(a in bound for a in s.args)), None)
        if step is None:
            return None
        first = next(a for a in step.args if a in bound)
        found = None
        for user in bound[first].users:
            trial = dict(bound)
            if _step_ok(user, step) and bind(step.name, user):
                found = user
                break
            bound.clear()
            bound.update(trial)
        if found is None:
            return None
        pending = [s for s in rule.steps if s.name not in bound]
    inside = {bound[s.name] for s in rule.steps}
    outputs = {r.step for r in rule.outputs}
    for s in rule.steps:  # an intermediate read outside would have to be stored anyway
        if s.name not in outputs and any(u not in inside for u in bound[s.name].users):
            return None
    return bound


def rewrite_graph(gm: fx.GraphModule, bound: dict[str, fx.Node], rule: GraphRule, fusion: object) -> None:
    """Each output step's node becomes its fused op, all moved, in order, to where the pattern's first
    step stood (their arguments are outside values, made before it, or earlier outputs); the rest is
    erased."""
    outs = [bound[r.step] for r in rule.outputs]
    first = bound[rule.steps[0].name]
    assert first not in outs, f"{rule.name}: the first step is read inside the pattern, not an output"
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    outside = [bound[a] for r in rule.outputs for a in r.args if a.startswith("$")]
    late = max(outside, key=order.__getitem__, default=None)  # an argument made after the first step (a get_attr)
    if late is not None and order[late] > order[first]:
        first = late.next
    for node in outs:
        first.prepend(node)
    for replace, node in zip(rule.outputs, outs):
        rec = info(node)
        attrs = {a: info(bound[step]).attrs[attr] for a, step, attr in replace.attrs}
        args = tuple(bound[a] for a in replace.args)
        node.target, node.args, node.kwargs = OP_TABLE[replace.op].fn, args, attrs
        rec.op, rec.attrs = replace.op, attrs
        rec.cost = op_cost(replace.op, [(info(a).shape, info(a).dtype) for a in args], (rec.shape, rec.dtype), attrs)
        if replace is rule.outputs[0]:
            rec.fusion = fusion
    outputs = set(outs)
    for step in reversed(rule.steps):
        node = bound[step.name]
        if node not in outputs:
            gm.graph.erase_node(node)
