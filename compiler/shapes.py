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
}


def numel(shape: Shape) -> sympy.Expr:
    out: sympy.Expr = sympy.Integer(1)
    for dim in shape:
        out *= dim
    return out


def shape_str(shape: Shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
