"""The one typed record ultraplan keeps per graph node, under ``node.meta["ultraplan"]``.

Lowering fills what the compiler knows (op kind, attributes, symbolic shape, dtype, where the node
comes from, the parameter or buffer it reads); each pass then fills its own fields. Passes write
analyses here, never in a structure beside the graph, and the Plan is read from these records.
The pass-filled fields hold types defined in ``passes/`` (the compiler does not import them), so
they are typed loosely here and documented with the pass that fills them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx

from .shapes import Shape

KEY = "ultraplan"


@dataclass(frozen=True)
class ParamInfo:
    """A parameter as the plan sees it."""

    name: str
    shape: tuple[int, ...]
    init: str
    std: float
    group: str = "default"  # optimizer group: "default", or "values" for memory value tables


@dataclass(frozen=True)
class BufferInfo:
    """Non-parameter state: ``init`` is ``permutation`` (seeded by name) or ``derived``, recomputed
    as ``op(source)`` from a parameter at start and after every optimizer step."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    init: str
    op: str = ""
    source: str = ""


@dataclass
class NodeInfo:
    """What is known about one node. ``op`` is an op-table key, or one of ``input``, ``param``,
    ``buffer``, ``output`` and (inserted by choose_sbp) ``boxing``."""

    op: str
    attrs: dict[str, Any]
    shape: Shape
    dtype: str
    layer: str = ""  # the module path that produced it (``layers.0.attention``), for grouping
    component: str = ""  # the sublayer kind it belongs to (``attention``, ``moe``, ``embedding``)
    label: str = ""  # the name the component gave the value (``q``, ``residual``)
    param: ParamInfo | None = None
    buffer: BufferInfo | None = None
    differentiable: bool = False  # does a gradient flow back through the value (to a parameter)?
    stream: bool = False  # a value of the residual stream (strategies pin how it is laid out)
    # -- filled by passes --------------------------------------------------------------------------
    concrete_shape: tuple[int, ...] | None = None  # shape_prop: the shape at the plan's B and T
    cost: Any = None  # annotate_cost: passes.cost.OpCost
    sbp: Any = None  # choose_sbp: passes.sbp.Signature (input nd-SBPs -> output nd-SBP)
    variant: Any = None  # choose_sbp: the op table Variant per mesh axis that runs it, or None
    splits: tuple[str, ...] = ()  # choose_sbp: per mesh axis, the dim letter split there ("" if none)
    at_rest: Any = None  # choose_sbp, parameters: the nd-SBP the parameter is stored in
    boxing: list[Any] = field(default_factory=list)  # choose_sbp, boxing nodes: passes.sbp.Boxing steps
    grad_boxing: list[Any] = field(default_factory=list)  # choose_sbp, parameters: gradient sync steps
    reason: str = ""  # choose_sbp: the decision behind a boxing node or a parameter's placement
    fusion: Any = None  # fuse: passes.fuse.Fusion, on the node a fusion rule rewrote


def info(node: fx.Node) -> NodeInfo:
    """The record of ``node`` (every node of a lowered graph has one)."""
    return node.meta[KEY]
