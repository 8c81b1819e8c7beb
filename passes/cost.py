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
class Touch:
    """How much of an input tensor one token reads: ``rows_per_token`` of ``rows`` rows of
    ``row_elems`` elements. A dense read is one row of everything (rows = rows_per_token = 1)."""

    rows_per_token: sympy.Expr
    rows: int
    row_elems: int


@dataclass(frozen=True)
class OpCost:
    flops: sympy.Expr
    bytes_read: sympy.Expr
    bytes_written: sympy.Expr
    backward_flops: sympy.Expr
    sparse_inputs: tuple[tuple[int, Touch], ...] = ()  # (argument position, touch) for rows-only reads


ZERO = sympy.Integer(0)


def expected_distinct(rows: int, per_token: sympy.Expr, draws: sympy.Expr) -> sympy.Expr:
    """Expected distinct rows of ``rows`` that ``draws`` tokens read, each ``per_token`` distinct rows
    chosen uniformly: R (1 - (1 - r/R)^draws). Used for experts (tokens of a batch) and value rows
    (decode batch); tests/unit/test_accounting.py checks it against sampling."""
    return rows * (1 - (1 - sympy.Rational(1, rows) * per_token) ** draws)


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
    if op == "pk_scores":
        (q_shape, _), (k_shape, _) = inputs
        heads, halves, num_keys, width = k_shape
        flops = 2 * numel(q_shape[:-1]) * heads * halves * num_keys * width
        return OpCost(flops, read, written, 2 * flops)
    if op in ("weighted_sum", "row_dot"):
        rows_shape = inputs[0][0] if op == "weighted_sum" else inputs[1][0]
        flops = 2 * numel(rows_shape)
        return OpCost(flops, read, written, 2 * flops)
    if op == "gather_rows":
        (table_shape, _), (ids_shape, ids_dtype) = inputs
        rows, row_elems = table_shape
        per_token = numel(ids_shape[2:])  # ids are (B, T, ...)
        return OpCost(ZERO, _bytes(ids_shape, ids_dtype) + written, written, ZERO,
                      ((0, Touch(per_token, int(rows), int(row_elems))),))
    if op == "expert_ffn":
        return _expert_ffn(inputs, output, attrs, written)
    if op in TUCKER_FLOPS:
        flops = TUCKER_FLOPS[op]([shape for shape, _ in inputs], output[0])
        return OpCost(flops, read, written, 2 * flops)
    return OpCost(ZERO, read, written, ZERO)


# UltraMem's retrieval products (ops.py, "Tucker-decomposed query-key retrieval"), as torch runs them.
TUCKER_FLOPS = {
    # every key of every rank against the query: 2 * tokens * H * 2 * R * N * D_k (shared queries too)
    "tucker_scores": lambda ins, out: 2 * numel(out) * ins[1][-1],
    # the rank-1 filter contracts R: 2 * tokens * H * 2 * N * R
    "rank_one_scores": lambda ins, out: 2 * numel(out) * ins[0][-2],
    # row x core (2 * tokens * H * C * R * R * M), then x column (2 * tokens * H * C * M * M * R)
    "tucker_grid": lambda ins, out: 2 * numel(ins[0][:3]) * ins[1][1] * ins[1][2] * ins[1][3] * ins[0][-1]
    + 2 * numel(out) * ins[1][2],
    # each value element of each kept row, once: 2 * tokens * H * M * D_v
    "core_pool": lambda ins, out: 2 * numel(ins[0]),
}


def _expert_ffn(inputs, output, attrs: dict, written: sympy.Expr) -> OpCost:
    """Each token runs k experts of d -> f -> d; the unfused op reads the experts that any token
    of the batch picked: E (1 - (1 - k/E)^tokens) of them in expectation under uniform routing."""
    (x_shape, _), (ids_shape, _), _, (up_shape, _), _, _ = inputs
    experts, hidden, dim = (int(s) for s in up_shape)
    k = int(ids_shape[-1])
    tokens = numel(x_shape[:-1])
    matrices = 3 if attrs["activation"] == "swiglu" else 2
    flops = 2 * tokens * k * hidden * dim * matrices
    expected_experts = expected_distinct(experts, sympy.Integer(k), tokens)
    weight_bytes = expected_experts * matrices * hidden * dim * 4
    act_bytes = sum((_bytes(*i) for i in inputs[:3]), ZERO)
    touch = Touch(sympy.Integer(k), experts, hidden * dim)
    # the gelu form passes w_up twice (as w_gate too); accounting counts a parameter once per op
    sparse = ((3, touch), (4, touch), (5, touch))
    return OpCost(flops, act_bytes + weight_bytes, written, 2 * flops, sparse)
