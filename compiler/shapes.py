"""Symbolic output shapes of each op kind, as tuples of sympy expressions in B and T.

One rule per op in ``ops.py``; lowering applies them node by node, and a test checks them
against the shapes torch produces for several concrete (B, T).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sympy

Shape = tuple[sympy.Expr, ...]

B, T = sympy.symbols("B T", integer=True, positive=True)


def _same(shapes: list[Shape], attrs: dict[str, Any]) -> Shape:
    return shapes[0]


def _embedding(shapes: list[Shape], attrs: dict[str, Any]) -> Shape:
    return (*shapes[0], shapes[1][1])


def _linear(shapes: list[Shape], attrs: dict[str, Any]) -> Shape:
    return (*shapes[0][:-1], shapes[1][0])


def _attention(shapes: list[Shape], attrs: dict[str, Any]) -> Shape:
    return (*shapes[0][:-1], sympy.Integer(attrs["num_heads"] * attrs["head_dim"]))


def _scalar(shapes: list[Shape], attrs: dict[str, Any]) -> Shape:
    return ()


def _pk_scores(shapes: list[Shape], attrs: dict[str, Any]) -> Shape:
    heads, halves, num_keys, _ = shapes[1]
    return (*shapes[0][:-1], heads, halves, num_keys)


def _topk(shapes: list[Shape], attrs: dict[str, Any]) -> Shape:
    return (*shapes[0][:-1], sympy.Integer(attrs["k"]))


def _take(shapes: list[Shape], attrs: dict[str, Any]) -> Shape:
    return shapes[1]


def _grid(shapes: list[Shape], attrs: dict[str, Any]) -> Shape:
    k = shapes[0][-1]
    return (*shapes[0][:-2], k * k)


def _gather_rows(shapes: list[Shape], attrs: dict[str, Any]) -> Shape:
    return (*shapes[1], shapes[0][1])


def _weighted_sum(shapes: list[Shape], attrs: dict[str, Any]) -> Shape:
    return (*shapes[0][:2], shapes[0][-1])


def _row_dot(shapes: list[Shape], attrs: dict[str, Any]) -> Shape:
    return shapes[1][:-1]


SHAPE_RULES: dict[str, Callable[[list[Shape], dict[str, Any]], Shape]] = {
    "embedding": _embedding,
    "rms_norm": _same,
    "layer_norm": _same,
    "linear": _linear,
    "rope": _same,
    "causal_attention": _attention,
    "swiglu": _same,
    "gelu": _same,
    "add": _same,
    "cross_entropy": _scalar,
    "pk_scores": _pk_scores,
    "group_layer_norm": _same,
    "topk_indices": _topk,
    "take": _take,
    "grid_scores": _grid,
    "grid_indices": _grid,
    "softmax": _same,
    "sigmoid": _same,
    "normalize_sum": _same,
    "gather_rows": _gather_rows,
    "weighted_sum": _weighted_sum,
    "row_dot": _row_dot,
    "activation": _same,
    "mul": _same,
    "expert_ffn": _same,
}

def _tucker_scores(shapes: list[Shape], attrs: dict[str, Any]) -> Shape:
    heads, halves, ranks, num_keys, _ = shapes[1]
    return (*shapes[0][:-1], heads, halves, ranks, num_keys)


def _drop_second_last(shapes: list[Shape], attrs: dict[str, Any]) -> Shape:
    """rank_one_scores (contracts the rank axis) and sum_cores (sums the cores axis)."""
    return (*shapes[0][:-2], shapes[0][-1])


def _take_along_last(shapes: list[Shape], attrs: dict[str, Any]) -> Shape:
    """take_ranked and take_cores: the index's batch axes, the source's second-last axis, k picks."""
    return (*shapes[1][:-1], shapes[0][-2], shapes[1][-1])


def _tucker_grid(shapes: list[Shape], attrs: dict[str, Any]) -> Shape:
    m = shapes[0][-1]
    return (*shapes[0][:3], shapes[1][1], m * m)


SHAPE_RULES.update({
    "tucker_scores": _tucker_scores, "rank_one_scores": _drop_second_last, "take_ranked": _take_along_last,
    "tucker_grid": _tucker_grid, "sum_cores": _drop_second_last, "take_cores": _take_along_last,
    "shuffle_rows": _same, "scale_cores": _same, "core_pool": _weighted_sum, "block_of": _same, "row_in_block": _same,
    "ive_pool": lambda shapes, attrs: (*shapes[0][:2], attrs["num_blocks"] * shapes[0][-1]),
    "expert_counts": lambda shapes, attrs: (sympy.Integer(attrs["num_experts"]),),
    "column_sums": lambda shapes, attrs: (shapes[0][-1],),
    "balance_loss": _scalar,
})

# Ops through which no gradient flows (their results are indices or counts).
# Ops whose result is not float32: index-valued ops, and take (the dtype of what it takes from).
INDEX_OPS = {"topk_indices", "grid_indices", "shuffle_rows", "block_of", "row_in_block"}

# Ops through which no gradient flows (their results are indices or counts).
NON_DIFFERENTIABLE = INDEX_OPS | {"expert_counts"}


def result_dtype(op: str, input_dtypes: list[str]) -> str:
    if op in INDEX_OPS:
        return "int64"
    if op == "take":
        return input_dtypes[0]
    return "float32"


def numel(shape: Shape) -> sympy.Expr:
    out: sympy.Expr = sympy.Integer(1)
    for dim in shape:
        out *= dim
    return out


def shape_str(shape: Shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
