"""Symbolic shapes: tuples of sympy expressions in the batch ``B`` and sequence length ``T``.

Each op's shape rule is in its record of the op table (``op_table.py``); lowering applies them
node by node, and a test checks them against the shapes torch produces for several (B, T).
"""

from __future__ import annotations

import sympy

Shape = tuple[sympy.Expr, ...]

B, T = sympy.symbols("B T", integer=True, positive=True)


def numel(shape: Shape) -> sympy.Expr:
    out: sympy.Expr = sympy.Integer(1)
    for dim in shape:
        out *= dim
    return out


def shape_str(shape: Shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
