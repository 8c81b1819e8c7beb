"""Forward and backward cost of each op kind, as sympy expressions in ``B`` and ``T``.

FLOPs follow the convention of torch's ``FlopCounterMode`` (and of Kaplan et al. 2020's
``6N`` rule): only matrix products count, 2 FLOPs per multiply-add; elementwise work (norms,
activations, softmax, rotary) is left out, which undercounts a small model by a few percent.
Attention counts both products over the full T x T square (``4 B H T^2 E``), as FlopCounterMode
does; a causal kernel that skips the masked half does half of that.

Backward FLOPs are twice the forward for a matrix product (one product for the input
gradient, one for the weight gradient) and zero for the rest, the ``6N`` rule's split.

Bytes are the minimum traffic of the unfused op: each input read once, the output written once,
fp32 activations and weights (4 bytes), int64 token ids (8 bytes). Embedding reads only the rows
it gathers, not the whole table.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from ..compiler.shapes import Shape, numel
from .symbols import BYTES_PER_ELEMENT


@dataclass(frozen=True)
class OpCost:
    flops: sympy.Expr
    bytes_read: sympy.Expr
    bytes_written: sympy.Expr
    backward_flops: sympy.Expr


ZERO = sympy.Integer(0)


def _bytes(shape: Shape, dtype: str) -> sympy.Expr:
    return numel(shape) * BYTES_PER_ELEMENT[dtype]


def op_cost(op: str, inputs: list[tuple[Shape, str]], output: tuple[Shape, str], attrs: dict) -> OpCost:
    """Cost of one op given its inputs' and output's (shape, dtype)."""
    written = _bytes(*output)
    read = sum((_bytes(*i) for i in inputs), ZERO)
    if op == "linear":
        (x_shape, _), (w_shape, _) = inputs
        out_features, in_features = w_shape
        flops = 2 * numel(x_shape[:-1]) * in_features * out_features
        return OpCost(flops, read, written, 2 * flops)
    if op == "causal_attention":
        q_shape = inputs[0][0]
        batch, seq = q_shape[0], q_shape[1]
        flops = 4 * batch * attrs["num_heads"] * seq * seq * attrs["head_dim"]
        return OpCost(flops, read, written, 2 * flops)
    if op == "embedding":
        (ids_shape, ids_dtype), _ = inputs
        return OpCost(ZERO, _bytes(ids_shape, ids_dtype) + written, written, ZERO)
    return OpCost(ZERO, read, written, ZERO)
