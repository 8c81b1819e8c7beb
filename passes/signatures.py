"""The valid SBP signatures of one op on one mesh axis, derived from its op-table record.

As DTensor derives einsum strategies (``torch/distributed/tensor/_ops/_einsum_strategy.py``),
from the op's dims (``"*i,oi->*o"`` for linear) and its traits:

- nothing split: every input ``B``, output ``B`` (always valid);
- a letter the output keeps (and the record does not hold ``whole``): every tensor that has it is
  split on it, the others ``B``; output ``S(its position)``. Letters that hold heads need the head
  counts divisible by the axis size;
- a letter the op sums over (``sums``) or averages (``mean``): the tensors that have it are split
  on it, the others ``B``, and the output is ``P`` (for a mean, the local mean times this device's
  share of the split, ``1/n``);
- ``linear == "each"``: one input ``P`` and the others ``B`` gives ``P``; ``"all"``: all ``P`` gives ``P``;
- the record's variants (vocabulary-parallel cross entropy, expert parallelism, ...).

Every split needs its dim divisible by the axis size (even splits only: the emitted program and
the shard-wise init assume torch.chunk of a divisible dim), except a variant's ``uneven`` inputs (a
value table's rows, in torch.chunk's shares).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..compiler.op_records import OpDef, Variant
from .sbp import Broadcast, PartialSum, Sbp, Split, parse_sbp

B_, P_ = Broadcast(), PartialSum()


@dataclass(frozen=True)
class AxisSignature:
    """One way to run an op on one mesh axis."""

    inputs: tuple[Sbp, ...]
    output: Sbp
    split: str = ""  # the letter split on this axis ("" if none)
    mean: bool = False  # P made by splitting a mean: scaled by 1/n
    variant: Variant | None = None

    def describe(self) -> str:
        how = f"variant {self.variant.name}" if self.variant else (f"split {self.split!r}" if self.split else "")
        ins = ", ".join(str(s) for s in self.inputs)
        return f"{ins} -> {self.output}" + (f" ({how})" if how else "")


def expand_dims(spec: str, ranks: list[int], out_rank: int) -> tuple[list[str], str]:
    """Each tensor's dims as a list of letters (``*`` expanded to digits, aligned from the left);
    ``.`` stays ``.`` (never split)."""
    lhs, out = spec.split("->")
    tensors = lhs.split(",") if lhs else []
    if len(tensors) != len(ranks):
        raise AssertionError(f"dims {spec!r} name {len(tensors)} inputs, the op has {len(ranks)}")

    def expand(text: str, rank: int) -> str:
        if "*" not in text:
            assert len(text) == rank, f"dims {spec!r}: {text!r} for a tensor of rank {rank}"
            return text
        stars = rank - (len(text) - 1)
        assert stars >= 0, f"dims {spec!r}: {text!r} for a tensor of rank {rank}"
        return "".join(str(i) for i in range(stars)) + text.replace("*", "")

    return [expand(t, r) for t, r in zip(tensors, ranks)], expand(out, out_rank)


_KNOWN: dict[tuple, tuple[AxisSignature, ...]] = {}


def axis_signatures(record: OpDef, shapes: list[tuple[int, ...]], out_shape: tuple[int, ...], attrs: dict,
                    n: int, chunked: frozenset[tuple[int, int]] = frozenset()) -> list[AxisSignature]:
    """Every signature of ``record`` on an axis of ``n`` devices, for these concrete shapes; memoised,
    as a large graph asks the same few questions thousands of times (choose_sbp and the search).
    ``chunked``: (input, dim) pairs stored in torch.chunk's shares over the whole mesh although each axis
    alone may divide them (34 columns on 2x2: 17, then 9/8; ``chunked_dims``), for which the
    ``uneven_only`` variants are offered too (one axis cannot tell)."""
    key = (record.name, id(record), tuple(tuple(s or ()) for s in shapes), tuple(out_shape or ()),
           repr(sorted(attrs.items())), n, chunked)
    if key not in _KNOWN:
        if len(_KNOWN) > 65536:
            _KNOWN.clear()
        _KNOWN[key] = tuple(_signatures(record, shapes, out_shape, attrs, n, chunked))
    return list(_KNOWN[key])


def chunked_dims(shapes: list[tuple[int, ...]], layouts: list[tuple | None],
                 mesh: tuple[int, ...]) -> frozenset[tuple[int, int]]:
    """The (input, dim) pairs of inputs laid out ``layouts`` (an NdSbp per input; None: not known) whose split
    does not divide over the product of its axes' sizes: torch.chunk's shares (a placed table's)."""
    out = set()
    for i, (shape, nd) in enumerate(zip(shapes, layouts)):
        for dim, size in enumerate(shape or ()):
            sizes = [n for n, e in zip(mesh, nd or ()) if e == Split(dim)]
            if sizes and int(size) % math.prod(sizes):
                out.add((i, dim))
    return frozenset(out)


def covers_uneven(axes: tuple[AxisSignature, ...] | list[AxisSignature],
                  chunked: frozenset[tuple[int, int]] = frozenset()) -> bool:
    """Do per-axis signatures combine around uneven inputs? A variant's call places its ``uneven`` inputs'
    shares over the axes it runs on (``chunk_start`` of the global size), so every axis that splits such an
    input on the same dim must run that variant: an einsum split of that dim on another axis would hand the
    call another share than it computes (splits of other dims, number-wise rows and dimension-wise columns,
    combine freely). A ``chunked`` input (stored unevenly over the mesh) may be split only by such a variant."""
    for i in range(len(axes[0].inputs) if axes else 0):
        for dim in {c.inputs[i].dim for c in axes if isinstance(c.inputs[i], Split)}:
            splitting = [c for c in axes if c.inputs[i] == Split(dim)]
            owners = {c.variant.name for c in splitting if c.variant is not None and i in c.variant.uneven}
            if (owners or (i, dim) in chunked) and (len(owners) != 1 or any(
                    c.variant is None or c.variant.name not in owners for c in splitting)):
                return False
    return True


def _signatures(record: OpDef, shapes: list[tuple[int, ...]], out_shape: tuple[int, ...], attrs: dict,
                n: int, chunked: frozenset[tuple[int, int]] = frozenset()) -> list[AxisSignature]:
    dims, out = expand_dims(record.dims, [len(s) for s in shapes], len(out_shape))
    count = len(shapes)
    found = [AxisSignature((B_,) * count, B_)]  # on an axis of one device every split is the whole, and free
    letters = [c for c in dict.fromkeys("".join(dims) + out) if c != "."]
    sums = set(record.sums.replace("*", "")) | ({c for c in "".join(dims) if c.isdigit()} if "*" in record.sums else set())
    mean = set(record.mean)

    def divisible(letter: str) -> bool:
        for d, shape in ((d, s) for d, s in zip([*dims, out], [*shapes, out_shape])):
            for pos, c in enumerate(d):
                if c == letter and shape[pos] % n:
                    return False
        return all(attrs[a] % n == 0 for a in record.heads.get(letter, ()))

    for letter in letters:
        if letter in record.whole or not divisible(letter):
            continue
        ins = tuple(Split(d.index(letter)) if letter in d else B_ for d in dims)
        if letter in out:
            found.append(AxisSignature(ins, Split(out.index(letter)), letter))
        elif letter in sums or letter in mean:
            found.append(AxisSignature(ins, P_, letter, mean=letter in mean))
    if record.linear == "each":
        for i in range(count):
            found.append(AxisSignature(tuple(P_ if j == i else B_ for j in range(count)), P_))
    elif record.linear == "all":
        found.append(AxisSignature((P_,) * count, P_))
    for variant in record.variants:
        ins = tuple(parse_sbp(s) for s in variant.inputs)
        if variant.applies is not None and not variant.applies(attrs, n):
            continue
        if variant.uneven_only and all(_fits(ins[i], shapes[i], n) and (i, getattr(ins[i], "dim", None)) not in chunked
                                       for i in variant.uneven):
            continue  # the even form is another signature's
        if all(_fits(sbp, shape, n) or (i in variant.uneven and isinstance(sbp, Split))
               for i, (sbp, shape) in enumerate(zip(ins, shapes))):
            found.append(AxisSignature(ins, parse_sbp(variant.output), variant=variant))
    return found


def _fits(sbp: Sbp, shape: tuple[int, ...], n: int) -> bool:
    return not isinstance(sbp, Split) or (sbp.dim < len(shape) and shape[sbp.dim] % n == 0)
