"""SBP values (OneFlow's split / broadcast / partial-sum) and the boxing table between them.

A tensor on a mesh axis of n devices is either split along a dim ``S(d)`` (each device holds
1/n of it), broadcast ``B`` (each holds all of it) or a partial sum ``P`` (the logical tensor is
the sum of the devices' tensors). An nd-SBP is one value per mesh axis.

Boxing turns one SBP into another with a collective. Bytes are *per device*, ring algorithms,
for a logical tensor of ``nbytes`` on an axis of ``n`` devices (OneFlow's
``oneflow/core/framework/sbp_infer_util.cpp`` and DTensor's ``torch/distributed/tensor/_collective_utils.py``):

    P -> B  all_reduce       2 (n-1)/n * nbytes     2(n-1) messages
    S -> B  all_gather         (n-1)/n * nbytes      (n-1) messages
    P -> S  reduce_scatter     (n-1)/n * nbytes      (n-1) messages
    S(i) -> S(j) all_to_all    (n-1)/n^2 * nbytes    (n-1) messages
    B -> S  local slice        0
    B -> P  local (each device keeps 1/n; the n shares sum to the whole) 0
    S -> P  and P(op1) -> P(op2): not allowed (OneFlow forbids a split producer feeding a
            partial consumer in lazy mode, DTensor has no Shard -> Partial)

Every boxing has a dual that runs on the gradient in the backward: the gradient of a ``S(d)``
value is ``S(d)``, of a ``B`` value ``P`` (each device's gradient is its share), of a ``P`` value
``B``; so the dual of ``X -> Y`` is ``dual(Y) -> dual(X)``: all_reduce <-> all_reduce, all_gather
<-> reduce_scatter, all_to_all <-> the inverse all_to_all, a local slice <-> a local zero-fill
(autograd's slice backward), B -> P (divide) <-> divide.

``payload`` is what the program hands the collective (the local tensor's bytes): that is what
the emitted runtime counts, and what tests compare against a real collective.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import sympy

from ..compiler.shapes import numel
from .context import PlanError
from .symbols import BYTES_PER_ELEMENT, axis_size


@dataclass(frozen=True)
class Split:
    dim: int

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True)
class Broadcast:
    def __str__(self) -> str:
        return "B"


@dataclass(frozen=True)
class PartialSum:
    def __str__(self) -> str:
        return "P"


Sbp = Split | Broadcast | PartialSum
NdSbp = tuple[Sbp, ...]


def chunk_share(size: int, n: int) -> int:
    """The largest of torch.chunk's ``n`` shares of ``size`` indices (DTensor's ``Shard``): ceil(size / n);
    the size itself divided when ``n`` divides it. What a device is planned to hold of a split dim."""
    return -(-int(size) // n)


@functools.cache
def fits(shape: tuple, nd: NdSbp, mesh: tuple[int, ...], uneven: frozenset[int] = frozenset()) -> bool:
    """The one rule of splitting: may ``nd`` lay out a ``shape`` tensor on a mesh of ``mesh`` sizes?

    Every split names a dim of ``shape``; a dim split on several axes splits outer axis first. A dim
    must divide by the product of its axes' sizes, except the dims in ``uneven`` (a value table's rows
    or columns, an expert group's expert index: passes/placement.py's ``uneven_dims``, and the inputs
    an op-table variant declares ``uneven``), which split as torch.chunk does (runtime.Mesh.shard_range's
    ``chunks``: ceil(size / n) per coordinate, the last ones what is left) as long as every device keeps
    at least one index. Read by choose_sbp (the plan) and search_costs (``--strategy auto``) alike, so
    the search considers exactly the layouts the plan accepts; ``local_dims`` and ``local_numel`` size
    them by their largest share."""
    if any(isinstance(e, Split) and e.dim >= len(shape) for e in nd):
        return False
    for dim, size in enumerate(shape):
        axes = [mesh[a] for a, e in enumerate(nd) if e == Split(dim)]
        if dim not in uneven:
            if int(size) % math.prod(axes):
                return False
            continue
        shares = [int(size)]
        for n in axes:
            shares = [min(chunk_share(s, n), s - j * chunk_share(s, n)) for s in shares for j in range(n)]
            if min(shares) <= 0:
                return False
    return True


def local_numel(shape, nd: NdSbp, mesh: tuple[int, ...]) -> int:
    """Elements of the largest share one device holds of a ``shape`` tensor laid out ``nd`` (plain
    numbers: the search's hot path; ``local_dims`` with a numeric mesh gives the same in sympy)."""
    dims = [int(d) for d in shape or ()]
    for axis, entry in enumerate(nd):
        if isinstance(entry, Split):
            dims[entry.dim] = chunk_share(dims[entry.dim], mesh[axis])
    return math.prod(dims)


def local_dims(shape, sbp: NdSbp, sizes, *, skip_axis: int | None = None, mesh=None) -> tuple:
    """The dims one device holds: each ``S(d)`` on axis ``a`` divides dim ``d`` by ``sizes[a]``.

    ``sizes`` are numbers or the symbols ``n{axis}``; ``skip_axis`` leaves that axis's split
    out (the size a collective on that axis sees). A split that does not divide (``mesh``: the
    axes' numeric sizes, or ``sizes`` themselves when they are numbers) holds torch.chunk's largest
    share, ``ceiling(d / n)`` (``chunk_share``): only the dims ``fits`` lets split unevenly do.
    """
    dims = list(shape)
    numeric = mesh if mesh is not None else sizes if all(isinstance(n, int) for n in sizes) else None
    counts = [int(d) if numeric is not None and isinstance(d, (int, sympy.Integer)) else None for d in shape]
    for axis, entry in enumerate(sbp):
        if axis != skip_axis and isinstance(entry, Split):
            d, count = dims[entry.dim], counts[entry.dim]
            uneven = count is not None and count % numeric[axis]
            dims[entry.dim] = sympy.ceiling(d / sizes[axis]) if uneven else d / sizes[axis]
            counts[entry.dim] = chunk_share(count, numeric[axis]) if count is not None else None
    return tuple(dims)


def parse_sbp(text: str) -> Sbp:
    """Inverse of ``str``: ``"S(0)"``, ``"B"`` or ``"P"``."""
    if text == "B":
        return Broadcast()
    if text == "P":
        return PartialSum()
    if text.startswith("S(") and text.endswith(")"):
        return Split(int(text[2:-1]))
    raise ValueError(f"not an SBP: {text!r}")


def nd_str(sbp: NdSbp) -> str:
    return ",".join(str(s) for s in sbp)


@dataclass(frozen=True)
class Boxing:
    """One collective on one mesh axis (or over the group spanning several: ``span``), with its
    per-device costs as sympy expressions."""

    collective: str
    axis: int
    src: str
    dst: str
    payload: sympy.Expr  # bytes of the local tensor handed to the collective
    wire: sympy.Expr  # bytes each device sends (ring model)
    messages: sympy.Expr
    # the mesh axes its process group spans, where more than ``axis`` (the first of them): a variant's
    # call running once over several axes (op_table's ``Variant.spanning``, expert parallelism)
    span: tuple[int, ...] = ()

    @property
    def dual(self) -> str:
        """The collective the backward runs on the gradient ("" for local steps)."""
        return DUALS[self.collective]


DUALS = {"all_reduce": "all_reduce", "all_gather": "reduce_scatter", "reduce_scatter": "all_gather",
         "all_to_all": "all_to_all", "local": ""}


def dual_sbp(sbp: Sbp) -> Sbp:
    """The SBP of the gradient of a value laid out as ``sbp``."""
    if isinstance(sbp, Broadcast):
        return PartialSum()
    if isinstance(sbp, PartialSum):
        return Broadcast()
    return sbp


ONE = sympy.Integer(1)


@dataclass(frozen=True)
class Signature:
    """An op's nd-SBPs: one per tensor input, and its output's. A ``P`` output made by splitting a
    mean (the loss) is the local mean times ``partial_scale``, this device's share."""

    inputs: tuple[NdSbp, ...]
    output: NdSbp
    partial_scale: sympy.Expr = ONE

    def __str__(self) -> str:
        ins = ", ".join(f"[{nd_str(s)}]" for s in self.inputs)
        return f"{ins} -> [{nd_str(self.output)}]" if ins else f"[{nd_str(self.output)}]"


def box(src: Sbp, dst: Sbp, *, axis: int, nbytes: sympy.Expr, n: sympy.Expr) -> Boxing | None:
    """The collective that turns ``src`` into ``dst`` on ``axis``; ``None`` when nothing moves.

    ``nbytes`` is the logical size of the tensor *on this axis* (already divided by the sizes of
    other axes on which it stays split).
    """
    if src == dst:
        return None
    pair = (type(src), type(dst))
    if pair == (PartialSum, Broadcast):
        return Boxing("all_reduce", axis, str(src), str(dst), nbytes, 2 * (n - 1) / n * nbytes, 2 * (n - 1))
    if pair == (Split, Broadcast):
        return Boxing("all_gather", axis, str(src), str(dst), nbytes / n, (n - 1) / n * nbytes, n - 1)
    if pair == (PartialSum, Split):
        return Boxing("reduce_scatter", axis, str(src), str(dst), nbytes, (n - 1) / n * nbytes, n - 1)
    if pair == (Split, Split):
        return Boxing("all_to_all", axis, str(src), str(dst), nbytes / n, (n - 1) / n**2 * nbytes, n - 1)
    if pair in ((Broadcast, Split), (Broadcast, PartialSum)):
        return Boxing("local", axis, str(src), str(dst), sympy.Integer(0), sympy.Integer(0), sympy.Integer(0))
    raise ValueError(f"no boxing from {src} to {dst}: a consumer may not take a partial value from a split one")


def parse_nd(text: str) -> NdSbp:
    """``"S(0),B"`` -> (Split(0), Broadcast())."""
    return tuple(parse_sbp(part.strip()) for part in text.split(","))


def boxings(src: NdSbp, dst: NdSbp, shape, dtype: str) -> list[Boxing]:
    """Per-axis collectives turning ``src`` into ``dst``, innermost axis first; each step is sized by
    the layout the steps before it left (an all-gather on axis 1 has already grown the tensor).

    A dim split on several axes is split outer axis first; changing an outer axis's split of a dim
    that an inner axis still splits would need a strided layout. When innermost-first meets one,
    outermost-first is tried (``[P,S(4)] -> [S(0),S(0)]``: reduce-scatter dim 0 on axis 0, then
    all-to-all each chunk on axis 1, a number-wise table across nodes, dimension-wise within);
    when both meet one, the inner axes that split are first made whole (``B``, or ``P`` left as it
    is), then every axis is boxed outermost first (``[S(4),S(4)] -> [S(0),S(0)]``: all-gather dim 4
    on axis 1, all-to-all on axis 0, each device keeps its chunk of dim 0 on axis 1: a value table
    split dimension-wise on both axes, whose gathered rows a consumer takes by token)."""
    try:
        return _boxings(src, dst, shape, dtype, reversed(range(len(src))))
    except PlanError as inner_first:
        try:
            return _boxings(src, dst, shape, dtype, range(len(src)))
        except PlanError:
            whole = tuple(src[:1]) + tuple(Broadcast() if isinstance(e, Split) else e for e in src[1:])
            if whole == src:
                raise inner_first from None
            try:
                return (_boxings(src, whole, shape, dtype, reversed(range(len(src))))
                        + _boxings(whole, dst, shape, dtype, range(len(src))))
            except PlanError:
                raise inner_first from None


def _boxings(src: NdSbp, dst: NdSbp, shape, dtype: str, order) -> list[Boxing]:
    out = []
    sizes = [axis_size(a) for a in range(len(src))]
    layout = list(src)
    for axis in order:
        if layout[axis] != dst[axis]:
            for entry in (layout[axis], dst[axis]):
                if isinstance(entry, Split) and any(layout[a] == entry for a in range(axis + 1, len(src))):
                    raise PlanError(f"boxing [{nd_str(src)}] -> [{nd_str(dst)}] changes how mesh axis {axis} splits "
                                    f"dim {entry.dim} while an inner axis splits it too (a strided layout); "
                                    "pin another SBP")
        nbytes = numel(local_dims(shape, tuple(layout), sizes, skip_axis=axis)) * BYTES_PER_ELEMENT[dtype]
        try:
            step = box(layout[axis], dst[axis], axis=axis, nbytes=nbytes, n=axis_size(axis))
        except ValueError as exc:
            raise PlanError(f"boxing [{nd_str(src)}] -> [{nd_str(dst)}]: {exc}") from None
        if step is not None:
            out.append(step)
        layout[axis] = dst[axis]
    return out


def box_cost(have: Sbp, want: Sbp, nbytes: float, n: int) -> tuple[float, int, int] | None:
    """(bytes per device, collectives, local steps) of one axis's boxing, as plain numbers for the
    search (``box`` gives the same as sympy); None when not allowed."""
    if have == want:
        return (0.0, 0, 0)
    pair = (type(have), type(want))
    if pair == (PartialSum, Broadcast):
        return (2 * (n - 1) / n * nbytes, 1, 0)
    if pair in ((Split, Broadcast), (PartialSum, Split)):
        return ((n - 1) / n * nbytes, 1, 0)
    if pair == (Split, Split):
        return ((n - 1) / n**2 * nbytes, 1, 0)
    if pair in ((Broadcast, Split), (Broadcast, PartialSum)):
        return (0.0, 0, 1)
    return None
