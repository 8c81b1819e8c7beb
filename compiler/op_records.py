"""The records the op table is made of (compiler/op_table.py): what one op kind is (``OpDef``), how much
of a weight a token reads (``Touch``), a shard form that is not an einsum split (``Variant``) and the
collectives such a form runs inside (``InternalComm``), with the rule signatures they hold. Plain frozen
dataclasses: the table (op_table.py) and the shard forms (op_variants.py) are built from them, and every
pass reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sympy

from .shapes import Shape

ShapeRule = Callable[[list[Shape], dict[str, Any]], Shape]
FlopRule = Callable[[list[Shape], Shape, dict[str, Any]], sympy.Expr]
# bytes of one element of each dtype a tensor of the graph may have
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "int64": 8}


@dataclass(frozen=True)
class Touch:
    """How much of an input tensor one token reads: ``rows_per_token`` of ``rows`` rows of
    ``row_elems`` elements. A dense read is one row of everything (rows = rows_per_token = 1)."""

    rows_per_token: sympy.Expr
    rows: int
    row_elems: int


SparseRule = Callable[[list[Shape], dict[str, Any]], tuple[tuple[int, Touch], ...]]
# bytes an op reads when that is not every input once: (input shapes, input dtypes, output bytes, attrs)
ReadRule = Callable[[list[Shape], list[str], sympy.Expr, dict[str, Any]], sympy.Expr]


# Values of a shard call that depend on which device runs it, as data the emitter spells: where this
# device's share of a dim of ``size`` split over mesh ``axes`` starts, and the program's mesh.
MESH: dict[str, list] = {"mesh": []}


def shard_start(size: Any, axes: list[int]) -> dict[str, list]:
    return {"shard_start": [int(size), list(axes)]}


def chunk_start(size: Any, axes: list[int], sizes: list[int]) -> dict[str, list]:
    """``shard_start`` of a dim that may not divide over ``sizes``: then split as torch.chunk does
    (runtime.Mesh.shard_range's ``chunks``), the uneven number-wise placement of a table's rows."""
    rest, even = int(size), True
    for n in sizes:
        even, rest = even and rest % n == 0, -(-rest // n)
    return shard_start(size, axes) if even else {"shard_start": [int(size), list(axes), "chunks"]}


@dataclass(frozen=True)
class InternalComm:
    """A collective a variant's call runs inside, per device: ``payload`` bytes handed to it (sympy
    in the local shapes and the axis size), in the ``forward`` or the ``backward``."""

    phase: str
    collective: str
    what: str
    payload: sympy.Expr
    data_dependent: bool = False  # depends on routing: the payload is the mean over devices
    dtype: str = "float32"


# (global input shapes, attrs, mesh axes it runs over, their sizes) -> the call's non-tensor arguments
ArgsRule = Callable[[list[Shape], dict[str, Any], list[int], list[int]], tuple[tuple[str, Any], ...]]
# (local input shapes, their dtypes, attrs, axis size, training?) -> the collectives inside the call
CommRule = Callable[[list[Shape], list[str], dict[str, Any], sympy.Expr, bool], list[InternalComm]]

# floating dtypes by width, for the ``float`` result rule (torch's promotion among them)
FLOAT_WIDTH = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


@dataclass(frozen=True)
class Variant:
    """A shard form of an op on one mesh axis that is not an einsum split.

    ``inputs`` / ``output`` are the SBPs on that axis (``"S(0)"``, ``"B"``, ``"P"``); ``call`` names
    the function the shard runs instead of the op's own (``runtime.vocab_parallel_cross_entropy``),
    ``args`` its non-tensor arguments; ``comms`` the collectives it runs inside, which the plan
    lists with every other collective; ``why`` says what it does.
    """

    name: str
    inputs: tuple[str, ...]
    output: str
    call: str
    why: str
    args: ArgsRule
    comms: CommRule | None = None
    applies: Callable[[dict[str, Any], int], bool] | None = None  # (attrs, axis size): may it run here?
    uneven: tuple[int, ...] = ()  # inputs whose split may be torch.chunk's shares (passes/sbp.py's fits)
    uneven_only: bool = False  # offered only where an ``uneven`` input's split does not divide
    # on several mesh axes its call runs each collective once, over the process group spanning them (n the
    # product of their sizes, the slowest of their links), not once per axis as ``comms`` otherwise counts
    spanning: bool = False


@dataclass(frozen=True)
class OpDef:
    name: str
    fn: Callable
    shape: ShapeRule
    result: str = "float"
    flops: FlopRule | None = None
    sparse: SparseRule | None = None
    bytes_read: ReadRule | None = None
    index: bool = False
    data_dependent: bool = False
    dims: str = ""
    sums: str = ""
    mean: str = ""
    whole: str = ""
    linear: str = ""
    heads: dict[str, tuple[str, ...]] = field(default_factory=dict)
    variants: tuple[Variant, ...] = ()
    colour: str = "#ffffff"
    loop: str = ""  # a letter of dims the op's code loops over in Python, once per index (passes/host_cost.py)

    @property
    def differentiable(self) -> bool:
        return not self.index

    def result_dtype(self, input_dtypes: list[str]) -> str:
        if self.index:
            return "int64"
        if self.result == "first":
            return input_dtypes[0]
        floats = [d for d in input_dtypes if d in FLOAT_WIDTH] + (["float32"] if self.result == "fp32" else [])
        return max(floats, key=FLOAT_WIDTH.__getitem__, default="float32")

    def backward_flops(self, forward: sympy.Expr) -> sympy.Expr:
        return 2 * forward
