"""The integer program of ``--strategy auto`` (passes/search_lp.py builds it), solved exactly by
HiGHS (``highspy``): as an LP first, which is integral on most of these programs, and by branch and
cut only when the memory row binds or a bucket count is fractional (passes/search_bnb.py).

At an optimum e, s, k and y are 0/1 because x is, and y + z is a key's bucket count
``bucket_count`` (a parameter's gradient bandwidth is in its candidate's time; only the latency is
per bucket, as the plan pays it), so the optimum is the plan's ``step_time``. The z columns are
integers: an LP optimum integral in x but not in z goes to branch and cut too.

Ties are broken deterministically by a second solve: among assignments whose time is within a
relative 1e-9 of the optimum, the smallest sum of candidate indices (index 0 is all-``B``; the
order is passes/signatures.py's, axis by axis). HiGHS itself runs single-threaded with a fixed seed.
``evaluate`` (passes/search_model.py) computes the same objective directly from an assignment.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import sys
from collections.abc import Callable

import highspy
import numpy as np

from .search_bnb import (
    TIE_BREAK_SECONDS,
    Infeasible,
    Root,
    chosen,
    fix_by_reduced_cost,
    integral,
    lagrangian,
    mip,
    optimal_face,
    relaxation,
    restore,
    root_of,
    rounded_up,
)
from .search_lp import GIB, SCALE, Lp, build
from .search_model import Buckets, Demand, Group, Problem, Solution, Use, bucket_count, evaluate

__all__ = ["Buckets", "Demand", "Group", "Infeasible", "Problem", "Solution", "Use", "bucket_count", "build", "evaluate",
           "leanest", "solve"]

def _quiet_highs() -> highspy.Highs:
    """A solver that prints nothing: HiGHS writes its banner to the process's stdout (file
    descriptor 1, from C) when the first one is made, which would corrupt ``plan --json``."""
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    try:
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
    finally:
        try:
            ctypes.CDLL(None).fflush(None)  # C's buffered stdout, before fd 1 is given back
        except (OSError, AttributeError):
            pass
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)
    return h


def _highs(lp: Lp) -> highspy.Highs:
    """The model in HiGHS, every column continuous (search_bnb branches on the x columns)."""
    h = _quiet_highs()
    for name, value in (("output_flag", False), ("threads", 1), ("random_seed", 0), ("mip_rel_gap", 1e-9),
                        ("mip_abs_gap", 1e-9), ("presolve", "off")):  # presolve: 6x slower here
        h.setOptionValue(name, value)
    n = len(lp.cost)
    h.addVars(n, np.zeros(n), np.array(lp.upper, dtype=float))
    h.changeColsCost(n, np.arange(n, dtype=np.int32), np.array(lp.cost, dtype=float))
    _rows(h, lp.rows)
    return h


def _rows(h: highspy.Highs, rows: list) -> None:
    lower, upper, starts, index, value = [], [], [], [], []
    for lo, hi, terms in rows:
        lower.append(lo)
        upper.append(hi)
        starts.append(len(index))
        index.extend(terms)
        value.extend(terms.values())
    h.addRows(len(rows), np.array(lower, dtype=float), np.array(upper, dtype=float), len(index),
              np.array(starts, dtype=np.int32), np.array(index, dtype=np.int32), np.array(value, dtype=float))


def _second(h: highspy.Highs, lp: Lp, x: list[list[int]], first: np.ndarray,
            accept: Callable[[list[int]], bool] | None = None) -> list[int]:
    """The second stage's choice, from the LP when it is integral. When it is not and the objective
    is the candidate indices (an integer), an assignment ``accept`` admits whose index sum reaches
    the LP bound rounded up is optimal too: the first stage's, or the LP's rounded to each group's
    largest candidate. Else HiGHS's MIP solver, from the first stage's answer (for the index sum
    given ``search_bnb.TIE_BREAK_SECONDS``; where it has not proven the second least in that time, the
    first stage's answer, optimal in the first objective too: an incumbent at a time limit would depend on
    the machine's load; moe-tiny on 2x2 with 0.2 MiB buckets took 39 s to give the proof). The first stage's
    answer also when the solver's tolerances make the added row look infeasible (its bound is the
    first optimum itself, at huge memory values a hair tight)."""
    start = chosen(first, x)
    try:
        bound, values = relaxation(h)
    except Infeasible:
        return start
    found = chosen(values, x)
    if found is not None and (accept(found) if accept is not None else integral(values, lp.counts)):
        return found
    if accept is not None:
        rounded = [int(np.argmax(values[cols])) for cols in x]
        for choice in (start, rounded):
            if sum(choice) <= math.ceil(bound - 1e-6) and accept(choice):
                return choice
    try:
        # under the first objective's row every assignment is optimal in it (the time, or for leanest the
        # memory): the second objective's branch and cut may stop early
        # an answer not proven least in time is not taken: which one HiGHS holds at its time limit depends
        # on the machine's load, and the first stage's is the same on every machine
        values, gap = mip(h, lp.integer, first, seconds=TIE_BREAK_SECONDS)
        found = chosen(values, x) if gap == 0 else None
        return found if found is not None and (accept is None or accept(found)) else start
    except Infeasible:
        return start


def solve(problem: Problem, hint: list[int] | None = None, *, proven_only: bool = False) -> Solution:
    """The optimal assignment, ties broken by the smallest sum of candidate indices (``hint``: an
    assignment known to fit, which a branch and cut may start from). ``proven_only``: the caller takes
    the answer only when it is proven optimal (search.py's split), so one whose branch and cut stopped
    at its time limit comes back as it stands, without the tie-break."""
    lp, x, objective = build(problem)
    h = _highs(lp)
    bound, values = relaxation(h)
    root = root_of(h, bound)
    binds = _binds(lp, values, root)
    n = len(lp.cost)
    ranks = np.zeros(n)
    for cols in x:
        for k, c in enumerate(cols):
            ranks[c] = k

    def within(best: float) -> Callable[[list[int]], bool]:
        limit = (best * (1 + 1e-9) + 1e-9) / SCALE + problem.constant  # evaluate counts the constant

        def accept(choice: list[int]) -> bool:
            time, _, ok = evaluate(problem, choice)
            return ok and time <= limit
        return accept

    choice = None
    gap = 0.0  # what the optimum may lie below the answer, where branch and cut ran out of time
    untied = bound  # what no assignment, tied layers untied or not, can beat (search.py's split)
    if chosen(values, x) is None or not integral(values, lp.counts):  # a knapsack, or buckets in part
        if root is not None:  # an assignment at the LP bound is optimal: the tie-break on its face
            choice = _on_face(h, lp, x, root, ranks, _band(bound), within(bound))
            h.changeColsCost(n, np.arange(n, dtype=np.int32), np.array(lp.cost, dtype=float))
        if choice is None and chosen(values, x) is None and not integral(values, lp.counts):
            # both fractional: the bucket counts whole first, x relaxed (a few integer columns); often
            # integral in x too, and then optimal with no branching on x (and for any untying)
            values, gap = mip(_highs(lp), lp.counts, rounded_up(values, lp.counts), presolve=False)  # h's basis kept
            untied = float(np.asarray(lp.cost) @ values) - gap
        if choice is None and (chosen(values, x) is None or not integral(values, lp.counts)):
            values, gap = _branch_and_cut(h, lp, x, root, values, presolve=binds, hint=hint)
            if gap > 0 and proven_only and chosen(values, x) is not None:
                time, memory, _ = evaluate(problem, chosen(values, x))
                return Solution(chosen(values, x), time, memory, "not proven", binds, gap,
                                untied / SCALE + problem.constant)
    if choice is None:
        best = float(sum(c * values[i] for i, c in objective.items()))
        # second stage: stay within 1e-9 (relative) of the optimum, minimise the candidate indices
        choice = _second_stage(h, lp, x, root, values, best, _band(best), ranks, within(best),
                               (best * (1 + 1e-9) + 1e-9, objective), indices=True)
    time, memory, _ = evaluate(problem, choice)
    if gap > 0:  # the lower bound branch and cut left, against the answer the second stage kept
        lower = float(sum(c * values[i] for i, c in objective.items())) - gap
        gap = max(0.0, (time - problem.constant) * SCALE - lower) / SCALE
        return Solution(choice, time, memory, f"within {gap:.3g} s of the optimum", binds, gap,
                        untied / SCALE + problem.constant)
    return Solution(choice, time, memory, "optimal", binds, untied=untied / SCALE + problem.constant)


def _binds(lp: Lp, values: np.ndarray, root: Root | None) -> bool:
    """The device memory constrains the LP optimum ``values``: its row has a dual (``root``), or
    without duals, is full. A full row alone says little: the columns of kept activations cost
    nothing, so an LP may fill the memory with their slack (the 120B UltraMemV2 on 128x8: an
    integral root at 131.3 GiB, its assignment's 111.4 GiB)."""
    if root is not None:
        return bool(abs(root.duals[lp.memory_row]) > 1e-7)  # HiGHS's dual feasibility tolerance
    _, limit, terms = lp.rows[lp.memory_row]  # the device memory, in GiB
    return bool(sum(coef * values[c] for c, coef in terms.items()) >= limit * (1 - 1e-9) - 1e-9)


def _band(best: float) -> float:
    """How far from the optimum ``best`` (solver units) the second stage looks: a relative 1e-9, and
    1e-7 for HiGHS's dual feasibility tolerance."""
    return best * 1e-9 + 1e-9 + 1e-7


def _second_stage(h: highspy.Highs, lp: Lp, x: list[list[int]], root: Root | None, first: np.ndarray, best: float,
                  band: float, costs: np.ndarray, accept: Callable[[list[int]], bool],
                  row: tuple[float, dict[int, float]], *, indices: bool) -> list[int]:
    """Minimise ``costs`` among the assignments within ``band`` of the first stage's optimum
    ``best`` (its solution ``first``): on the root LP's optimal face (``_on_face``) when its answer
    is integral and ``accept`` admits it; else with the first objective as a row (``row``: its bound
    and terms) after forbidding the candidates the root's reduced costs put outside the band
    (``_second``, which may round when the costs are the candidate ``indices``). The face's pins
    stay for that fallback when its LP was feasible: they keep every assignment within the band, and
    on a memory-bound program they leave branch and cut a far smaller tie-break."""
    width = best - root.bound + band if root is not None else band
    whole = None if indices else lp.counts  # a time objective prices the bucket counts: whole ones only
    choice = _on_face(h, lp, x, root, costs, width, accept, keep=True, whole=whole) if root is not None else None
    if choice is not None:
        return choice
    if root is not None:
        fix_by_reduced_cost(h, x, root.values, root.reduced, width)
    _rows(h, [(-highspy.kHighsInf, *row)])
    h.changeColsCost(len(costs), np.arange(len(costs), dtype=np.int32), costs)
    return _second(h, lp, x, first, accept if indices else None)


def _on_face(h: highspy.Highs, lp: Lp, x: list[list[int]], root: Root, costs: np.ndarray, width: float,
             accept: Callable[[list[int]], bool], *, keep: bool = False,
             whole: list[int] | None = None) -> list[int] | None:
    """The second stage without the first objective's row: the LP restricted to what an assignment
    within ``width`` of the root LP's bound can be (``search_bnb.optimal_face``: the columns and rows
    its reduced costs and duals pin) with ``costs`` as objective (the candidate indices; for
    ``leanest``, the time). Its answer, when integral and within the band (``accept``), is the
    second stage's: the restriction keeps every assignment within the band, so none is better. Else
    None, with the bounds as they were (the caller's fallback adds the row and sets the costs), or
    with ``keep`` and a feasible LP, as the face pinned them. ``whole``: columns the answer must have
    integral as well (the bucket counts, where ``costs`` price them and ``accept`` does not)."""
    upper = np.asarray(lp.upper, dtype=float)
    changed = optimal_face(h, upper, lp.exact, root, width)
    n = len(lp.cost)
    h.changeColsCost(n, np.arange(n, dtype=np.int32), costs)
    feasible = True
    try:
        values = relaxation(h)[1]
        found = chosen(values, x) if whole is None or integral(values, whole) else None
    except Infeasible:
        found, feasible = None, False
    if found is not None and accept(found):
        return found
    if not (keep and feasible):
        restore(h, upper, changed)
    return None


def _completion(h: highspy.Highs, lp: Lp, x: list[list[int]], choice: list[int]) -> np.ndarray | None:
    """A solution of the program at an assignment: the LP with the one-hot columns fixed to
    ``choice`` (the other columns at an optimum given them); None when it does not fit."""
    cols = np.array([c for cols in x for c in cols], dtype=np.int32)
    fixed = np.array([float(k == choice[g]) for g, cols in enumerate(x) for k in range(len(cols))])
    order = np.argsort(cols)
    h.changeColsBounds(len(cols), cols[order], fixed[order], fixed[order])
    try:
        return relaxation(h)[1]
    except Infeasible:
        return None
    finally:
        h.changeColsBounds(len(cols), cols[order], np.zeros(len(cols)), np.asarray(lp.upper)[cols[order]])


def _branch_and_cut(h: highspy.Highs, lp: Lp, x: list[list[int]], root: Root | None,
                    values: np.ndarray, *, presolve: bool, hint: list[int] | None = None) -> tuple[np.ndarray, float]:
    """The integer optimum when the root LP (``root``, ``values``) is fractional: HiGHS's MIP solver,
    started from the Lagrangian assignment (``search_bnb.lagrangian``, at the memory row's dual) or
    the assignment ``hint`` (search.py's tied answer, for the untied program), the faster that fits,
    after forbidding the candidates whose root reduced cost exceeds that assignment's gap
    to the bound (they are in no better assignment). With the gap to the optimum ``search_bnb.mip``
    leaves (0: proven). ``presolve``: the LP fills the device memory (a knapsack, where HiGHS's
    presolve pays); else only bucket counts are fractional (search_bnb.mip)."""
    row = len(lp.rows) - 1  # the memory row, built last
    cost = np.array(lp.cost, dtype=float)
    weights = np.zeros(len(cost))
    for c, m in lp.rows[row][2].items():
        weights[c] = m
    starts = [] if hint is None else [_completion(h, lp, x, hint)]
    if root is not None:
        starts.append(lagrangian(h, x, row, cost, weights, max(0.0, -float(root.duals[row])) * (1 + 1e-3)))
    # whole bucket counts: starts the MIP accepts
    starts = [rounded_up(f, lp.counts) for f in starts if f is not None]
    starts = [f for f in starts if float(weights @ f) <= lp.rows[row][1]]
    start = min(starts, key=lambda f: float(cost @ f), default=None)
    if start is not None and root is not None:
        width = float(cost @ start) - root.bound + 1e-9 * abs(root.bound) + 1e-7
        fix_by_reduced_cost(h, x, values, root.reduced, width)
    found, gap = mip(h, lp.integer, start, presolve=presolve or root is None)
    if gap > 0 and root is not None:  # the root LP's bound may be the tighter one where HiGHS stopped early
        gap = min(gap, max(0.0, float(cost @ found) - root.bound))
    return found, gap


def leanest(problem: Problem) -> Solution:
    """When nothing fits: the assignment with the least memory per device, and among those the
    fastest (so the plan shows how far from fitting the model is)."""
    lp, x, _ = build(dataclasses.replace(problem, capacity=float("inf")))
    memory_row = lp.rows.pop()[2]
    h = _highs(lp)
    n = len(lp.cost)
    weights = np.zeros(n)
    for c, m in memory_row.items():
        weights[c] = m
    h.changeColsCost(n, np.arange(n, dtype=np.int32), weights)
    bound, values = relaxation(h)
    root = root_of(h, bound)
    cost = np.array(lp.cost, dtype=float)

    def within(least: float) -> Callable[[list[int]], bool]:
        return lambda choice: evaluate(problem, choice)[1] <= (least * (1 + 1e-9) + 1e-9) * GIB  # in bytes

    choice = None
    if chosen(values, x) is None:
        if root is not None:  # an assignment at the LP bound is the leanest: the fastest on its face
            choice = _on_face(h, lp, x, root, cost, _band(bound), within(bound), whole=lp.counts)
            h.changeColsCost(n, np.arange(n, dtype=np.int32), weights)
        if choice is None:
            values, _ = mip(h, lp.integer, None)
    if choice is None:
        values = rounded_up(values, lp.counts)  # the memory objective leaves bucket counts anywhere
        least = float(sum(m * values[c] for c, m in memory_row.items()))
        choice = _second_stage(h, lp, x, root, values, least, _band(least), cost, within(least),
                               (least * (1 + 1e-9) + 1e-9, memory_row), indices=False)
    time, memory, _ = evaluate(problem, choice)
    return Solution(choice, time, memory, "leanest")
