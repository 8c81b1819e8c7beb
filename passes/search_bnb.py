"""The search's integer program solved as an LP first, as a MIP only when the LP is not integral.

Most of these programs are integral at the LP optimum: with both marginals on every edge
(passes/search_lp.py) the relaxation is tight on trees, and one dual simplex solve answers them,
where HiGHS's MIP solver spends most of its time on root cuts, heuristics and strong branching that
such a program does not need (on Llama-3-8B on 8x8: 0.1 s against 0.6 s). An LP optimum that is
integral in the one-hot columns is optimal for the integer program too (the LP is its relaxation),
and the other columns then take the values the program gives them (search_ilp's docstring). When
the memory row binds, the relaxation mixes a fast candidate that does not fit with a lean one (a
knapsack), and HiGHS's branch and cut takes over, from the incumbent when one is known. A root
LP's reduced costs and duals also restrict later stages: ``fix_by_reduced_cost`` forbids
candidates, ``optimal_face`` pins columns and rows, so that the tie-break needs no dense row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import highspy
import numpy as np

INTEGRAL = 1e-6  # a group whose largest x is this close to 1 has chosen
MIP_SECONDS = 20.0  # a branch and cut stops here with its best assignment and the gap it leaves (search_ilp)
FEASIBLE = 2  # HiGHS's kSolutionStatusFeasible: a time-limited MIP has an incumbent
TIE_BREAK_SECONDS = 2.0  # a second objective's branch and cut: its answers are optimal in the first already


class Infeasible(Exception):
    """No assignment fits the device memory (or satisfies the pins)."""


def _lp(h: highspy.Highs) -> tuple[float, np.ndarray] | None:
    h.run()
    status = h.getModelStatus()
    if status == highspy.HighsModelStatus.kOptimal:
        return h.getInfo().objective_function_value, np.asarray(h.getSolution().col_value)
    if status in (highspy.HighsModelStatus.kInfeasible, highspy.HighsModelStatus.kUnboundedOrInfeasible):
        return None
    raise Infeasible(h.modelStatusToString(status))


def _set(h: highspy.Highs, cols: list[int], upper: float) -> None:
    if cols:
        idx = np.unique(np.asarray(cols, dtype=np.int32))  # HiGHS wants a set: increasing, no repeats
        h.changeColsBounds(len(idx), idx, np.zeros(len(idx)), np.full(len(idx), upper))


def relaxation(h: highspy.Highs) -> tuple[float, np.ndarray]:
    """The LP optimum of the model in ``h`` (every column continuous): (objective, column values)."""
    found = _lp(h)
    if found is None:
        raise Infeasible("no assignment satisfies the memory row and the pins")
    return found


def chosen(values: np.ndarray, x: list[list[int]]) -> list[int] | None:
    """Each group's candidate when the solution is integral in the one-hot columns, else None."""
    out = []
    for cols in x:
        k = int(np.argmax(values[cols]))
        if values[cols[k]] < 1 - INTEGRAL:
            return None
        out.append(k)
    return out


def integral(values: np.ndarray, cols: list[int]) -> bool:
    """Every one of ``cols`` (integer columns: the bucket counts) is whole in the solution ``values``."""
    v = values[np.asarray(cols, dtype=np.int64)]
    return bool(np.all(np.abs(v - np.round(v)) <= INTEGRAL))


def rounded_up(values: np.ndarray, cols: list[int]) -> np.ndarray:
    """``values`` with ``cols`` (bucket counts, each bounded below only) rounded up to whole numbers:
    an integral x's completion that every row still admits, and the MIP may start from."""
    out = values.copy()
    idx = np.asarray(cols, dtype=np.int64)
    out[idx] = np.ceil(out[idx] - INTEGRAL)
    return out


def lagrangian(h: highspy.Highs, x: list[list[int]], row: int, cost: np.ndarray, weights: np.ndarray,
               multiplier: float) -> np.ndarray | None:
    """A solution of the model with row ``row`` (the memory row, ``weights`` its coefficients) moved
    into the objective at ``multiplier`` per unit: min cost + multiplier * weights. Without that
    row the relaxation is integral wherever it is tight (trees), so at a multiplier a little above
    the row's dual this gives an integral assignment that usually fits: the incumbent the MIP starts
    from and prunes with. None when the answer is fractional. The model is restored afterwards."""
    n = len(cost)
    lower, upper = h.getLp().row_lower_[row], h.getLp().row_upper_[row]
    h.changeRowBounds(row, -highspy.kHighsInf, highspy.kHighsInf)
    h.changeColsCost(n, np.arange(n, dtype=np.int32), cost + multiplier * weights)
    try:
        found = _lp(h)
    except Infeasible:
        found = None
    finally:
        h.changeRowBounds(row, lower, upper)
        h.changeColsCost(n, np.arange(n, dtype=np.int32), cost)
    if found is None or chosen(found[1], x) is None:
        return None
    return found[1]


def fix_by_reduced_cost(h: highspy.Highs, x: list[list[int]], values: np.ndarray, reduced: np.ndarray,
                        width: float) -> int:
    """Forbid every candidate that cannot be in an assignment within ``width`` of the LP bound whose
    solution is (``values``, ``reduced``): at an LP optimum every feasible point has objective >=
    bound + sum of reduced cost * x over the columns at their lower bound (plus non-negative terms
    for the rest), so a candidate at zero whose reduced cost exceeds ``width`` is in no such
    assignment. Returns how many were forbidden."""
    cols = np.concatenate([np.asarray(c, dtype=np.int64) for c in x if len(c) > 1] or [np.zeros(0, dtype=np.int64)])
    out = cols[(values[cols] <= INTEGRAL) & (reduced[cols] > width)]
    _set(h, [int(c) for c in out], 0.0)
    return len(out)


@dataclass
class Root:
    """An LP optimum of the model (``bound``; ``values``, ``reduced`` costs of the columns and row
    ``duals``), kept to restrict later stages by what it proves."""

    bound: float
    values: np.ndarray
    reduced: np.ndarray
    duals: np.ndarray


def root_of(h: highspy.Highs, bound: float) -> Root | None:
    """The LP optimum just solved in ``h`` as a ``Root``; None when HiGHS has no valid duals."""
    sol = h.getSolution()
    if not sol.dual_valid:
        return None
    return Root(bound, *(np.array(a, dtype=float) for a in (sol.col_value, sol.col_dual, sol.row_dual)))


def optimal_face(h: highspy.Highs, upper: np.ndarray, exact_rows: list[int], root: Root, width: float) -> tuple:
    """Restrict the model in ``h`` to what an assignment within ``width`` of the LP bound ``root``
    can be, without a dense row "objective <= bound + width" (which makes the tie-break's LP several
    times slower). At an LP optimum every feasible point costs the bound plus, over the non-basic
    columns, reduced cost times the distance from their bound, plus over the rows, |dual| times their
    slack: all non-negative. A point within ``width`` therefore has every column of reduced cost
    above ``width`` at its bound and every row of |dual| above it without slack, wherever those
    distances are 0 or at least 1. They are at the program's own completion of an assignment
    (search_lp: e, s, k, y are 0/1 and the rows ``exact_rows`` have 0/1 slack), so pinning those
    columns (``upper`` finite) and rows keeps every assignment within ``width`` feasible: the
    restricted minimum of any objective is a lower bound of its minimum among them, and equal to it
    when its answer is one of them. Returns what changed, for ``restore``."""
    finite = np.isfinite(upper)
    low = np.nonzero(finite & (root.values <= INTEGRAL) & (root.reduced > width))[0].astype(np.int32)
    high = np.nonzero(finite & (root.values >= upper - INTEGRAL) & (root.reduced < -width))[0].astype(np.int32)
    if len(low):
        h.changeColsBounds(len(low), low, np.zeros(len(low)), np.zeros(len(low)))
    if len(high):
        h.changeColsBounds(len(high), high, upper[high], upper[high])
    model = h.getLp()
    lower, upper_rows = np.asarray(model.row_lower_), np.asarray(model.row_upper_)  # each access copies
    rows = []
    for i in exact_rows:
        lo, hi = float(lower[i]), float(upper_rows[i])
        if lo == hi or abs(root.duals[i]) <= width:
            continue
        active = lo if root.duals[i] > 0 else hi  # a positive dual: the row sits at its lower bound
        if np.isfinite(active):
            rows.append((i, lo, hi))
            h.changeRowBounds(i, active, active)
    return [int(c) for c in (*low, *high)], rows


def restore(h: highspy.Highs, upper: np.ndarray, changed: tuple[list, list]) -> None:
    """Undo ``optimal_face``: the columns' bounds back to [0, upper], the rows' to theirs."""
    cols, rows = changed
    if cols:
        idx = np.unique(np.asarray(cols, dtype=np.int32))
        h.changeColsBounds(len(idx), idx, np.zeros(len(idx)), upper[idx])
    for i, lo, hi in rows:
        h.changeRowBounds(i, lo, hi)


def mip(h: highspy.Highs, integrality: list[int], best: np.ndarray | None, *,
        presolve: bool = True, seconds: float | None = None) -> tuple[np.ndarray, float]:
    """HiGHS's MIP solver on the model (``integrality``: its integer columns), from ``best`` when
    that is a known feasible solution; the columns are continuous again afterwards. Returns the
    solution and its gap to HiGHS's lower bound (solver units): 0 when proven optimal, more when
    the run reached ``MIP_SECONDS`` (many bucket counts fractional at once can make a branch and
    cut long: moe-tiny on 2x2 with 10 KiB buckets ran minutes); a run out of time before its first
    assignment, with no start, goes on without the limit (the limit bounds the proof, and a run
    with nothing to return would call the program infeasible). ``presolve``:
    on where the memory row binds (the MIP then solves 3x faster, 120B UltraMemV2 on 128x8); off
    where only bucket counts are fractional (Llama-3-8B on 8x8: 0.12 s against 0.18 s).

    HiGHS 1.16 with presolve can map a start into its presolved model at a wrong objective, prune
    everything above that, and report "optimal" at that objective while returning the start itself
    (ultramem-v2-tiny's knapsack on 8 devices: 595.4 reported, the start's 721.9 returned, the
    optimum 637.9, tests/unit/test_search.py; Llama-3-8B on 8x8 likewise), and without a start
    after an LP solved in the same model (the 120B UltraMemV2 on 128x8: 3.4342 s reported, below
    the LP bound, 3.4691 s returned). So the returned solution's objective must be the reported
    one; where it is not, the MIP runs again on a cleared solver, without the start."""
    idx = np.asarray(integrality, dtype=np.int32)
    h.changeColsIntegrality(len(idx), idx, np.full(len(idx), highspy.HighsVarType.kInteger))
    h.setOptionValue("presolve", "on" if presolve else "off")
    h.setOptionValue("time_limit", MIP_SECONDS if seconds is None else seconds)
    try:
        found = None
        if best is not None:
            start = highspy.HighsSolution()
            start.col_value = list(best)
            start.value_valid = True
            h.setSolution(start)
            found = _run_mip(h)
        if found is None:
            h.clearSolver()  # forget the start, and the LPs solved before (either can mislead presolve)
            found = _run_mip(h)
        if found is None and best is None and h.getModelStatus() == highspy.HighsModelStatus.kTimeLimit:
            h.setOptionValue("time_limit", math.inf)  # out of time before any assignment: the limit is
            found = _run_mip(h)  # for proving an incumbent optimal, so search on until there is one
        if found is None:
            if best is not None:
                return best, math.inf
            raise Infeasible(h.modelStatusToString(h.getModelStatus()))
        return found
    finally:
        h.setOptionValue("presolve", "off")  # the LPs' setting (presolve is slower there)
        h.setOptionValue("time_limit", math.inf)
        h.changeColsIntegrality(len(idx), idx, np.full(len(idx), highspy.HighsVarType.kContinuous))


def _run_mip(h: highspy.Highs) -> tuple[np.ndarray, float] | None:
    """The MIP's solution and its gap, or None when it has none (or not the one HiGHS reports)."""
    h.run()
    status, info = h.getModelStatus(), h.getInfo()
    if status == highspy.HighsModelStatus.kOptimal:
        gap = 0.0
    elif status == highspy.HighsModelStatus.kTimeLimit and info.primal_solution_status == FEASIBLE:
        gap = max(0.0, info.objective_function_value - info.mip_dual_bound)
    else:
        return None
    found = np.asarray(h.getSolution().col_value)
    cost = np.asarray(h.getLp().col_cost_)
    if not math.isclose(float(cost @ found), info.objective_function_value, rel_tol=1e-9, abs_tol=1e-7):
        return None
    return found, gap
