"""How an op's call changes on a shard: the decision choose_sbp made, as the shard's call.

A head split divides the head counts (``num_heads=4`` on 2 devices is ``num_heads=2``); a variant
runs another function with the shard's place (``vocab_start``, the expert axis). Values that
depend on which device runs the call are written as data the emitter spells, never as numbers
of one rank: ``{"shard_start": [size, [axes]]}`` (where this device's share of a dim of ``size``
split over ``axes`` starts) and ``{"mesh": []}`` (the program's mesh).

Variants that communicate inside list their collectives here (``internal_collectives``), so the
plan's one list holds them with every other collective.
"""

from __future__ import annotations

from typing import Any

import sympy
from torch import fx

from ..compiler.lower import tensor_args
from ..compiler.node_info import info
from ..compiler.op_table import OP_TABLE
from ..compiler.shapes import numel
from .sbp import Boxing, local_dims
from .symbols import axis_size

MESH: dict[str, list] = {"mesh": []}


def _axes(node: fx.Node, variant: str) -> list[int]:
    return [a for a, v in enumerate(info(node).variant or ()) if v is not None and v.name == variant]


def localize(node: fx.Node, mesh: tuple[int, ...]) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """(call, local attributes) of ``node``'s shard."""
    rec = info(node)
    record = OP_TABLE[rec.op]
    attrs = dict(rec.attrs)
    for letter, counts in record.heads.items():
        factor = 1
        for axis, split in enumerate(rec.splits):
            if split == letter:
                factor *= mesh[axis]
        for count in counts:
            attrs[count] = attrs[count] // factor
    variants = {v.name: v for v in (rec.variant or ()) if v is not None}
    if not variants:
        return f"ops.{rec.op}", tuple(attrs.items())
    (name, variant), = variants.items()
    axes = _axes(node, name)
    args = tensor_args(node)
    if rec.op == "embedding":
        rows = int(info(args[1]).shape[0])
        return variant.call, (("row_start", {"shard_start": [rows, axes]}),)
    if rec.op == "cross_entropy":
        vocab = int(info(args[0]).shape[-1])
        return variant.call, (("mesh", MESH), ("axes", tuple(axes)), ("vocab_start", {"shard_start": [vocab, axes]}))
    if rec.op == "expert_ffn":
        experts = int(info(args[3]).shape[0])
        (axis,) = axes
        return variant.call, (("activation", attrs["activation"]), ("mesh", MESH), ("axis", axis),
                              ("num_experts", experts))
    raise AssertionError(f"no shard call for variant {name} of {rec.op}")


def internal_collectives(node: fx.Node, mesh: tuple[int, ...], train: bool) -> list[tuple[str, Boxing, bool, str]]:
    """(phase, collective, data_dependent, dtype) that a variant runs inside its call, per device."""
    rec = info(node)
    names = {v.name for v in (rec.variant or ()) if v is not None}
    if not names:
        return []
    (name,) = names
    sizes = [axis_size(a) for a in range(len(mesh))]
    args = tensor_args(node)
    out: list[tuple[str, Boxing, bool, str]] = []
    if rec.op == "cross_entropy":
        positions = numel(local_dims(info(args[1]).shape, info(args[1]).sbp.output, sizes))
        for axis in _axes(node, name):  # runtime.vocab_parallel_cross_entropy: two all-reduces per axis
            n = axis_size(axis)
            for what, nbytes in (("each position's max", positions * 4),
                                 ("each position's sum of exponentials and target logit", 2 * positions * 4)):
                out.append(("forward", Boxing("all_reduce", axis, what, "B", nbytes, 2 * (n - 1) / n * nbytes,
                                              2 * (n - 1)), False, "float32"))
    if rec.op == "expert_ffn":
        (axis,) = _axes(node, name)
        n = axis_size(axis)
        x_shape = local_dims(info(args[0]).shape, info(args[0]).sbp.output, sizes)
        k = info(args[1]).shape[-1]
        assignments = numel(x_shape[:-1]) * k
        rows = assignments * x_shape[-1] * 4

        def a2a(what: str, nbytes: sympy.Expr) -> Boxing:
            return Boxing("all_to_all", axis, what, "S", nbytes, (n - 1) / n * nbytes, n - 1)

        out += [("forward", a2a("routing counts", n * 8), False, "int64"),
                ("forward", a2a("expert ids", assignments * 8), False, "int64"),
                ("forward", a2a("token rows", rows), False, "float32"),
                ("forward", a2a("expert outputs", rows), True, "float32")]
        if train:
            out += [("backward", a2a("expert output gradients", rows), False, "float32"),
                    ("backward", a2a("token row gradients", rows), True, "float32")]
    return out
