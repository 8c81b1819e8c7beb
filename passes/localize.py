"""How an op's call changes on a shard: the decision choose_sbp made, as the shard's call.

A head split divides the head counts (``num_heads=4`` on 2 devices is ``num_heads=2``, the op
record's ``heads``); a variant runs another function with the shard's place (the record's
``Variant.call`` and ``Variant.args``: ``vocab_start``, the expert axis). Values that depend on
which device runs the call are data the emitter spells, never numbers of one rank:
``{"shard_start": [size, [axes]]}`` (where this device's share of a dim of ``size`` split over
``axes`` starts; a third entry ``"chunks"`` where the size does not divide: torch.chunk's shares)
and ``{"mesh": []}`` (the program's mesh).

The collectives a variant runs inside (``Variant.comms``) are listed here as ``Boxing`` steps, so
the plan's one list holds them with every other collective: per axis, or, for a ``spanning`` variant on
several axes, once over the group spanning them (the Boxing's ``span``).
"""

from __future__ import annotations

from typing import Any

import sympy
from torch import fx

from ..compiler.lower import tensor_args
from ..compiler.node_info import info
from ..compiler.op_records import Variant
from ..compiler.op_table import OP_TABLE
from .sbp import Boxing, local_dims
from .symbols import axis_size


def _variant(node: fx.Node) -> tuple[Variant | None, list[int]]:
    """The node's variant and the mesh axes it runs over (one variant per node)."""
    found = {v.name: v for v in (info(node).variant or ()) if v is not None}
    if not found:
        return None, []
    assert len(found) == 1, f"{node.name}: two variants {sorted(found)} on one node"
    (variant,) = found.values()
    return variant, [a for a, v in enumerate(info(node).variant) if v is not None]


def localize(node: fx.Node, mesh: tuple[int, ...]) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """(call, local attributes) of ``node``'s shard."""
    rec = info(node)
    attrs = dict(rec.attrs)
    for letter, counts in OP_TABLE[rec.op].heads.items():
        factor = 1
        for axis, split in enumerate(rec.splits):
            if split == letter:
                factor *= mesh[axis]
        for count in counts:
            attrs[count] = attrs[count] // factor
    variant, axes = _variant(node)
    if variant is None:
        return f"ops.{rec.op}", tuple(attrs.items())
    return variant.call, variant.args([info(a).shape for a in tensor_args(node)], attrs, axes, [mesh[a] for a in axes])


def internal_collectives(node: fx.Node, mesh: tuple[int, ...], train: bool) -> list[tuple[str, Boxing, bool, str]]:
    """(phase, collective, data_dependent, dtype) that a variant runs inside its call, per device."""
    variant, axes = _variant(node)
    if variant is None or variant.comms is None:
        return []
    sizes = [axis_size(a) for a in range(len(mesh))]
    local = [local_dims(info(a).shape, info(a).sbp.output, sizes) for a in tensor_args(node)]
    dtypes = [info(a).dtype for a in tensor_args(node)]
    spans = variant.spanning and len(axes) > 1  # one call over the group of all its axes, not one per axis
    out = []
    for group in ([tuple(axes)] if spans else [(a,) for a in axes]):
        n = sympy.Mul(*(axis_size(a) for a in group))
        where = f" (one group over mesh axes {', '.join(map(str, group))})" if spans else ""
        for c in variant.comms(local, dtypes, info(node).attrs, n, train):
            share = 2 * (n - 1) / n if c.collective == "all_reduce" else (n - 1) / n
            messages = 2 * (n - 1) if c.collective == "all_reduce" else n - 1
            out.append((c.phase, Boxing(c.collective, group[0], c.what + where,
                                        "B" if c.collective == "all_reduce" else "S", c.payload, share * c.payload,
                                        messages, group if spans else ()),
                        c.data_dependent, c.dtype))
    return out
