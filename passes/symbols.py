"""The named sympy symbols every cost is written in, and how they are given values late.

``B`` batch (global sequences per step) and ``T`` sequence length come from the compiler's
shape rules. A mesh axis ``a`` has a size ``n{a}``, a link bandwidth ``bw{a}`` (bytes/s per
device, per direction) and a per-message latency ``lat{a}`` (seconds); ``peak`` is the device's
FLOP/s at the spec's ``train.precision`` (fp32 or bf16). Costs stay symbolic through planning;
``evaluate`` substitutes numbers at the end.
"""

from __future__ import annotations

import functools

import sympy

from ..compiler.shapes import B, T

PEAK = sympy.Symbol("peak", positive=True)
BYTES_PER_ELEMENT = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "int64": 8}


@functools.cache  # sympy's Symbol() sanitises its assumptions on every call: 10% of a large plan
def axis_size(axis: int) -> sympy.Symbol:
    return sympy.Symbol(f"n{axis}", integer=True, positive=True)


@functools.cache  # sympy's Symbol() sanitises its assumptions on every call: 10% of a large plan
def axis_bandwidth(axis: int) -> sympy.Symbol:
    return sympy.Symbol(f"bw{axis}", positive=True)


@functools.cache  # sympy's Symbol() sanitises its assumptions on every call: 10% of a large plan
def axis_latency(axis: int) -> sympy.Symbol:
    return sympy.Symbol(f"lat{axis}", nonnegative=True)


def device_count(num_axes: int) -> sympy.Expr:
    """``n0 * n1 * ...``: the devices of a mesh with ``num_axes`` axes."""
    return sympy.Mul(*(axis_size(a) for a in range(num_axes)))


def evaluate(expr: sympy.Expr, values: dict[sympy.Symbol, float]) -> float:
    """The number an expression takes at ``values``; every free symbol must be given."""
    expr = sympy.sympify(expr)
    if any(not p.exp.is_number for p in expr.atoms(sympy.Pow)):
        # (1 - k/E)^(B T) of MoE traffic: exact substitution builds a fraction with millions of digits
        result = expr.evalf(17, subs=values)
    else:  # xreplace: a plain substitution, many times faster than subs (no rewriting of the tree)
        result = expr.xreplace(values)
    if result.free_symbols:
        raise ValueError(f"cost {expr} still has free symbols {sorted(map(str, result.free_symbols))}")
    return float(result)


def _hardware_symbols(expr: sympy.Expr) -> frozenset[str]:
    return frozenset(str(s) for s in expr.free_symbols if str(s).startswith(("bw", "lat", "peak")))


@functools.lru_cache(maxsize=4096)
def readable(expr: sympy.Expr) -> sympy.Expr:
    """A total in a form a reader can follow, cheaply: expanded, its terms grouped by the hardware
    symbols they hold (bandwidth, latency, peak) and their denominator, each group factored
    (``176*lat0*(n0 - 1) + 768*B*T*(5*T + 864)/(n0*peak)``). ``sympy.simplify`` of whole totals
    gave similar text but was most of a large plan's time (bench/plan_speed.py). Memoised: plans of one
    spec share many totals, and factoring is still the slow part of a tiny plan."""
    expanded = sympy.expand(sympy.sympify(expr))
    groups: dict[tuple, list[sympy.Expr]] = {}
    for term in sympy.Add.make_args(expanded):
        key = (_hardware_symbols(term), sympy.fraction(term)[1])
        groups.setdefault(key, []).append(term)
    return sympy.Add(*(sympy.factor(sympy.Add(*terms)) for terms in groups.values()))


__all__ = ["BYTES_PER_ELEMENT", "PEAK", "B", "T", "axis_bandwidth", "axis_latency", "axis_size", "device_count",
           "evaluate", "readable"]
