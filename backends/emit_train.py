"""The constants the program's progress line needs from the plan: FLOPs per step and peak FLOP/s.

Model FLOPs utilisation divides the model's FLOPs per second by what the devices could do. The
plan holds both, the second inside its modelled compute time, ``compute_time = sum of (forward +
backward FLOPs) / split / peak`` (passes/build_plan.py): evaluating that expression with
``peak = 1`` at the plan's point and dividing by its value gives the peak FLOP/s it was priced at
(the hardware spec's, at the plan's precision) without a second source of numbers.
"""

from __future__ import annotations

import sympy

from ..passes.plan import Plan


def peak_flops(plan: Plan) -> float:
    """One device's peak FLOP/s at which the plan priced its compute (0 when it computes nothing)."""
    cost = plan.total("compute_time")
    if cost.value <= 0:
        return 0.0
    expr = sympy.sympify(cost.expr)
    point = {"B": plan.batch, "T": plan.seq, "peak": 1, **{f"n{i}": n for i, n in enumerate(plan.mesh)}}
    unknown = sorted(str(s) for s in expr.free_symbols if str(s) not in point)
    if unknown:
        raise ValueError(f"compute_time {cost.expr} has symbols {unknown} that are not the plan's B, T, peak or n<axis>")
    return float(expr.subs({s: point[str(s)] for s in expr.free_symbols})) / cost.value


def train_constants(plan: Plan) -> list[str]:
    totals = dict(plan.totals)
    flops = totals["forward_flops"].value + totals["backward_flops"].value
    return [
        "# model FLOPs utilisation (progress.Meter, on GPUs) = FLOPS_PER_STEP / step seconds / (PEAK_FLOPS x devices):",
        "# the plan's forward+backward FLOPs of one global step, and one device's peak FLOP/s as the plan priced it",
        f"FLOPS_PER_STEP, PEAK_FLOPS = {flops:.6g}, {peak_flops(plan):.6g}",
    ]
