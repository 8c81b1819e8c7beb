"""Where two candidates' modelled costs cross: the batch (or sequence length) at which they are equal.

Each plan's ``step_time`` is a sympy expression in ``B``, ``T`` and the hardware's symbols (peak,
per-axis bandwidth and latency, ...). Two candidates for one decision (the same plan but for one
node's signature) differ by terms such as ``c * B / bw0`` (activations boxed) against ``k / bw0``
(a gradient synchronised whatever the batch), so ``solve(step_a - step_b, B)`` gives the crossover in
closed form, in the hardware's symbols; evaluated at the plan's hardware it is a number. Below it
one candidate is cheaper, above it the other. The expression holds while the plans keep their
structure (the same collectives); ultraplan/decision.py says how the CLI makes the two plans, and
tests/unit/test_crossover.py checks the root against a bisection over re-planned batches.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import sympy

from .symbols import B, T


@dataclass(frozen=True)
class Crossover:
    """``symbolic``: the roots of ``a - b`` in ``var`` as expressions (empty when sympy finds no closed
    form); ``points``: the positive real roots at the plan's values, ascending; ``cheaper_below``:
    which of "a" and "b" is cheaper just above zero (below the first point), "" when they are equal."""

    var: sympy.Symbol
    difference: sympy.Expr
    symbolic: tuple[sympy.Expr, ...]
    points: tuple[float, ...]
    cheaper_below: str


def parse_cost(text: str, symbols: list[sympy.Symbol]) -> sympy.Expr:
    """A plan's cost text (``Cost.expr``) with its names bound to the planner's symbols, whose
    assumptions (positive, integer) sympy needs to solve."""
    names = {str(s): s for s in [B, T, *symbols]}
    return sympy.sympify(text, locals=names)


def crossover(a: sympy.Expr, b: sympy.Expr, values: dict[sympy.Symbol, float], var: sympy.Symbol = B) -> Crossover:
    """The values of ``var`` at which ``a`` and ``b`` are equal, every other symbol at ``values``."""
    difference = sympy.together(sympy.expand(a - b))
    others = {s: v for s, v in values.items() if s != var}
    try:
        symbolic = tuple(sympy.solve(sympy.numer(difference), var))
    except (NotImplementedError, TypeError):  # e.g. (1 - k/E)^(B T) of MoE traffic: no closed form
        symbolic = ()
    points = set()
    for root in symbolic:
        value = complex(sympy.sympify(root).evalf(30, subs=others))
        if abs(value.imag) <= 1e-9 * max(1.0, abs(value.real)) and value.real > 0:
            points.add(value.real)
    if not symbolic:  # no closed form: the sign changes of the numeric difference over powers of two
        points = set(_numeric_roots(sympy.lambdify(var, difference.xreplace(others), "math")))
    near_zero = min(points) / 2 if points else 1.0
    sign = float(difference.xreplace(others | {var: near_zero}))
    cheaper = "" if sign == 0 else ("a" if sign < 0 else "b")
    return Crossover(var, difference, symbolic, tuple(sorted(points)), cheaper)


def _numeric_roots(f, low: float = 1.0, high: float = 2.0**40) -> list[float]:
    """Roots of ``f`` on [low, high] by bisection between sign changes on a grid of powers of two."""
    grid, roots = [], []
    x = low
    while x <= high:
        grid.append(x)
        x *= 2
    for lo, hi in itertools.pairwise(grid):
        flo, fhi = f(lo), f(hi)
        if flo == 0:
            roots.append(lo)
        elif flo * fhi < 0:
            for _ in range(100):
                mid = (lo + hi) / 2
                if f(mid) * flo > 0:
                    lo = mid
                else:
                    hi = mid
            roots.append((lo + hi) / 2)
    return roots
