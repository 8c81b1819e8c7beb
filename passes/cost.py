"""Forward and backward cost of each op, as sympy expressions in ``B`` and ``T``, from its op record.

FLOPs follow the convention of torch's ``FlopCounterMode`` (and of Kaplan et al. 2020's
``6N`` rule): only matrix products count, 2 FLOPs per multiply-add; elementwise work (norms,
activations, softmax, rotary) is left out, which undercounts a small model by a few percent.
Attention counts both products over the full T x T square (``4 B H T^2 E``), as FlopCounterMode
does; a causal kernel that skips the masked half does half of that. Each op's formula is its
record's ``flops`` in ``compiler/op_table.py``.

Backward FLOPs are twice the forward for a matrix product (one product for the input
gradient, one for the weight gradient) and zero for the rest, the ``6N`` rule's split.

Bytes are the minimum traffic of the unfused op: each input read once, the output written once,
fp32 activations and weights (4 bytes), int64 token ids (8 bytes). A lookup reads only the rows
it gathers, not the whole table; the MoE reads the experts its tokens picked (the record's
``bytes_read``).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from ..compiler.op_records import Touch
from ..compiler.op_table import OP_TABLE, expected_distinct
from ..compiler.shapes import Shape, numel
from .symbols import BYTES_PER_ELEMENT

__all__ = ["ZERO", "OpCost", "Touch", "expected_distinct", "op_cost"]


@dataclass(frozen=True)
class OpCost:
    flops: sympy.Expr
    bytes_read: sympy.Expr
    bytes_written: sympy.Expr
    backward_flops: sympy.Expr
    sparse_inputs: tuple[tuple[int, Touch], ...] = ()  # (argument position, touch) for rows-only reads


ZERO = sympy.Integer(0)


def _bytes(shape: Shape, dtype: str) -> sympy.Expr:
    return numel(shape) * BYTES_PER_ELEMENT[dtype]


def op_cost(op: str, inputs: list[tuple[Shape, str]], output: tuple[Shape, str], attrs: dict) -> OpCost:
    """Cost of one op given its inputs' and output's (shape, dtype)."""
    record = OP_TABLE[op]
    shapes = [shape for shape, _ in inputs]
    written = _bytes(*output)
    if record.bytes_read is not None:
        read = record.bytes_read(shapes, [dtype for _, dtype in inputs], written, attrs)
    else:
        read = sum((_bytes(*i) for i in inputs), ZERO)
    flops = record.flops(shapes, output[0], attrs) if record.flops else ZERO
    sparse = record.sparse(shapes, attrs) if record.sparse else ()
    return OpCost(flops, read, written, record.backward_flops(flops), sparse)
