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

from dataclasses import dataclass

from ..compiler.op_table import OpDef, Variant
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
                    n: int) -> list[AxisSignature]:
    """Every signature of ``record`` on an axis of ``n`` devices, for these concrete shapes; memoised,
    as a large graph asks the same few questions thousands of times (choose_sbp and the search)."""
    key = (record.name, id(record), tuple(tuple(s or ()) for s in shapes), tuple(out_shape or ()),
           repr(sorted(attrs.items())), n)
    if key not in _KNOWN:
        if len(_KNOWN) > 65536:
            _KNOWN.clear()
        _KNOWN[key] = tuple(_signatures(record, shapes, out_shape, attrs, n))
    return list(_KNOWN[key])


def _signatures(record: OpDef, shapes: list[tuple[int, ...]], out_shape: tuple[int, ...], attrs: dict,
                n: int) -> list[AxisSignature]:
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
        if variant.uneven_only and all(_fits(ins[i], shapes[i], n) for i in variant.uneven):
            continue  # the even form is another signature's
        if all(_fits(sbp, shape, n) or (i in variant.uneven and isinstance(sbp, Split))
               for i, (sbp, shape) in enumerate(zip(ins, shapes))):
            found.append(AxisSignature(ins, parse_sbp(variant.output), variant=variant))
    return found


def _fits(sbp: Sbp, shape: tuple[int, ...], n: int) -> bool:
    return not isinstance(sbp, Split) or (sbp.dim < len(shape) and shape[sbp.dim] % n == 0)
