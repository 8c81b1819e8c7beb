"""The integer program of ``--strategy auto``, solved exactly by HiGHS (``highspy``).

The graph has been reduced (passes/search.py, passes/clusters.py) to *groups*: one group per graph
node, or per class of identical nodes in repeated layers (``count`` nodes sharing one choice).
Group g has candidates k (its nd-SBP signatures), each with a modelled time ``time[k]`` (compute,
collectives inside the call, a parameter's gather and gradient sync), bytes per device
``memory[k]`` and, for inference, the activation it holds at once ``peak[k]``.

Values move between groups through *demands*, one per value (or class of identical values):
each of its uses (a consumer's input position) takes it in a layout w that depends on the
consumer's candidate, and choose_sbp boxes a value once per layout however many consumers want it.

    x[g,k] in {0,1}        one-hot: sum_k x[g,k] = 1
    u[p,o]                 sum of x[p,k] whose output layout is o (an expression)
    v[j,w]                 sum of x[c,k] over the candidates k of use j's consumer c taking w
    e[j,o,w] in [0,1]      use j takes layout o as w: sum_w e[j,o,w] = u[p,o], sum_o e[j,o,w] = v[j,w]
                           (both marginals, as Alpa's edge variables: the LP relaxation is integral
                           on trees); no e where o -> w has no boxing (S -> P), and for parameters
                           and buffers none but o = w (consumers take them as stored)
    s[d,o,w] >= e[j,o,w]   the boxing o -> w runs (once for every use j that needs it); its backward
                           dual likewise, over the uses the gradient flows back through
    k[d,w] >= v[j,w]       the value is kept in layout w for the backward (uses that save it)
    y[q] in [0,1]          gradient bucket key q (passes/buckets.py) is used: y >= sum_k x[g,k] over
                           the candidates of each group g whose gradient joins q (its first bucket)
    z[q] >= 0              its buckets beyond the first: z >= (sum count*min(bytes,cap)*x - first*y) / cap

    minimise   sum count*time[k]*x + sum count*move(o,w)*s + sum count*dual(o,w)*s_dual
               + sum latency[q]*(y + z)                              (modelled step seconds)
    subject to sum count*memory[k]*x + sum count*saved(w)*k + A <= device memory  (one row: the
               memory model's per-device bytes; A >= sum_k peak[k] x[g,k] for every g, inference)

At an optimum e, s, k and y are 0/1 because x is, and z is its bound: the modelled bucket count
``bucket_count`` (a parameter's gradient bandwidth is in its candidate's time; only the latency is
per bucket, as the plan pays it).

Ties are broken deterministically by a second solve: among assignments whose time is within a
relative 1e-9 of the optimum, the smallest sum of candidate indices (index 0 is all-``B``; the
order is passes/signatures.py's, axis by axis). HiGHS itself runs single-threaded with a fixed seed.
``evaluate`` computes the same objective directly from an assignment (for brute-force checks).
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import highspy
import numpy as np

from .search_bnb import Infeasible, chosen, fix_by_reduced_cost, lagrangian, minimise, mip, near_optimal_only, relaxation

SCALE = 1e6  # seconds -> microseconds inside the solver: its absolute tolerances are ~1e-6..1e-9
GIB = 2.0**30  # the memory row in GiB, for the same reason


@dataclass
class Group:
    name: str
    count: int
    time: list[float]
    memory: list[float]
    out: list[int]  # the layout id consumers see, per candidate
    peak: list[float] = field(default_factory=list)


@dataclass
class Use:
    """One consumer of a value (or the producer keeping its own output): the candidates of ``group``
    that take the value in each layout ``w``; whether the gradient flows back through it (``grad``),
    whether it keeps the value for its backward (``keeps``), whether it reads it at all (``moves``)."""

    group: int
    takes: dict[int, list[int]]
    grad: bool = False
    keeps: bool = False
    moves: bool = True


@dataclass
class Demand:
    """How one value (``count`` nodes of identical layers) is taken by its uses."""

    producer: int
    count: int
    uses: list[Use]
    move: dict[tuple[int, int], float | None] = field(default_factory=dict)  # (o, w) -> seconds; None: no boxing
    dual: dict[tuple[int, int], float] = field(default_factory=dict)  # (o, w) -> seconds of the backward dual
    saved: dict[int, float] = field(default_factory=dict)  # w -> bytes per device autograd keeps
    state: bool = False  # a parameter or buffer: consumers take it as stored
    boundary: bool = False  # read across a layer boundary (passes/clusters.py's bound sums these)


@dataclass
class Buckets:
    """The gradients of one bucket key (passes/buckets.py: the same collectives, the same dtype),
    packed into buckets of ``first`` then ``cap`` bytes, each paying ``latency`` seconds. ``members``
    are (group, candidate, bytes per node) of the candidates whose gradient joins this key. With
    ``first = cap = inf`` it is one collective per key however many join it: a layer's gather group
    (passes/gather_groups.py), whose latency is paid once when any of its parameters is gathered."""

    latency: float
    first: float
    cap: float
    members: list[tuple[int, int, float]]


@dataclass
class Problem:
    groups: list[Group]
    demands: list[Demand]
    capacity: float  # bytes per device
    constant: float = 0.0  # seconds every plan pays (the loss's logging all-reduce)
    buckets: list[Buckets] = field(default_factory=list)


def bucket_count(b: Buckets, choice: list[int], groups: list[Group]) -> float:
    """The modelled number of buckets of one key: 0 when no gradient joins it, else the first bucket
    plus the bytes beyond it over the cap, each parameter's bytes clipped to the cap (one that
    large closes a bucket by itself): 1 + max(0, sum min(bytes, cap) - first) / cap."""
    chosen = [(g, nbytes) for g, k, nbytes in b.members if choice[g] == k]
    if not chosen:
        return 0.0
    clipped = sum(groups[g].count * min(nbytes, b.cap) for g, nbytes in chosen)
    return 1.0 + max(0.0, clipped - b.first) / b.cap


@dataclass
class Solution:
    choice: list[int]
    time: float
    memory: float
    status: str


def evaluate(problem: Problem, choice: list[int], demands: list[Demand] | None = None) -> tuple[float, float, bool]:
    """(time, memory, feasible) of one assignment, computed directly (no linearisation); with
    ``demands``, only those demands' terms (what one group's choice touches)."""
    groups = problem.groups
    time = memory = 0.0
    if demands is None:
        time = problem.constant + sum(g.count * g.time[k] for g, k in zip(groups, choice))
        memory = sum(g.count * g.memory[k] for g, k in zip(groups, choice))
        memory += max((g.peak[k] for g, k in zip(groups, choice) if g.peak), default=0.0)
        time += sum(b.latency * bucket_count(b, choice, groups) for b in problem.buckets)
    ok = True
    for d in problem.demands if demands is None else demands:
        o = groups[d.producer].out[choice[d.producer]]
        taken = {kind: {w for u in d.uses if getattr(u, kind) for w, ks in u.takes.items() if choice[u.group] in ks}
                 for kind in ("moves", "grad", "keeps")}
        memory += sum(d.count * d.saved[w] for w in taken["keeps"])
        for w in taken["moves"]:
            cost = d.move.get((o, w), 0.0)
            if cost is None or (d.state and w != o):
                ok = False
            else:
                time += d.count * cost
        time += sum(d.count * (d.dual.get((o, w)) or 0.0) for w in taken["grad"])
    return time, memory, ok and (demands is not None or memory <= problem.capacity)


class _Lp:
    """Columns and rows collected in plain lists, handed to HiGHS at once."""

    def __init__(self) -> None:
        self.cost: list[float] = []
        self.upper: list[float] = []
        self.integer: list[int] = []
        self.rows: list[tuple[float, float, dict[int, float]]] = []

    def col(self, cost: float, upper: float = 1.0, integer: bool = False) -> int:
        self.cost.append(cost)
        self.upper.append(upper)
        if integer:
            self.integer.append(len(self.cost) - 1)
        return len(self.cost) - 1

    def row(self, lower: float, upper: float, terms: dict[int, float]) -> None:
        self.rows.append((lower, upper, terms))


def _add(terms: dict[int, float], col: int, coef: float) -> None:
    terms[col] = terms.get(col, 0.0) + coef


def build(problem: Problem) -> tuple[_Lp, list[list[int]], dict[int, float]]:
    """The model of the module docstring: (lp, x columns per group, time objective by column)."""
    lp = _Lp()
    inf = highspy.kHighsInf
    memory: dict[int, float] = {}
    x = [[lp.col(g.count * t * SCALE, integer=True) for t in g.time] for g in problem.groups]
    for g, cols in zip(problem.groups, x):
        lp.row(1.0, 1.0, {c: 1.0 for c in cols})
        for c, m in zip(cols, g.memory):
            if m:
                _add(memory, c, g.count * m / GIB)
    if any(g.peak for g in problem.groups):
        a = lp.col(0.0, upper=inf)
        memory[a] = 1.0
        for g, cols in zip(problem.groups, x):
            if g.peak:
                lp.row(0.0, inf, {a: 1.0} | {c: -p / GIB for c, p in zip(cols, g.peak) if p})
    for d in problem.demands:
        _demand(lp, d, problem.groups[d.producer], x, memory)
    for b in problem.buckets:
        _buckets(lp, b, problem.groups, x)
    lp.row(-inf, problem.capacity / GIB, memory)
    return lp, x, {i: c for i, c in enumerate(lp.cost) if c}


def _demand(lp: _Lp, d: Demand, producer: Group, x: list[list[int]], memory: dict[int, float]) -> None:
    """The rows of one value: per use a joint (o, w) choice with both marginals (tight on trees, as
    Alpa's edge variables), and the boxing o -> w paid once however many uses run it."""
    inf = highspy.kHighsInf
    outs: dict[int, list[int]] = {}
    for k, o in enumerate(producer.out):
        outs.setdefault(o, []).append(x[d.producer][k])
    paid: dict[tuple[str, int, int], int] = {}
    kept: dict[int, int] = {}
    single = sum(use.moves for use in d.uses) == 1
    for use in d.uses:
        if use.keeps:
            for w, ks in use.takes.items():
                if w not in kept:
                    kept[w] = lp.col(0.0)
                    _add(memory, kept[w], d.count * d.saved[w] / GIB)
                lp.row(0.0, inf, {kept[w]: 1.0} | {x[use.group][k]: -1.0 for k in ks})
        if not use.moves:
            continue
        pairs = {}
        for o in outs:
            for w in use.takes:
                cost = d.move.get((o, w), 0.0)
                if cost is not None and not (d.state and o != w):
                    pairs[o, w] = lp.col(0.0)
        for o, cols in outs.items():  # sum_w e[o,w] = u[o]
            lp.row(0.0, 0.0, {e: 1.0 for (oo, _), e in pairs.items() if oo == o} | {c: -1.0 for c in cols})
        for w, ks in use.takes.items():  # sum_o e[o,w] = the use's candidates taking w
            lp.row(0.0, 0.0, {e: 1.0 for (_, ww), e in pairs.items() if ww == w} | {x[use.group][k]: -1.0 for k in ks})
        for (o, w), e in pairs.items():
            for kind, cost in (("move", d.move.get((o, w)) or 0.0), ("dual", d.dual.get((o, w), 0.0) if use.grad else 0.0)):
                if cost > 0 and single:  # one reader: the boxing runs exactly when e does
                    lp.cost[e] += d.count * cost * SCALE
                elif cost > 0:
                    if (kind, o, w) not in paid:
                        paid[kind, o, w] = lp.col(d.count * cost * SCALE)
                    lp.row(0.0, inf, {paid[kind, o, w]: 1.0, e: -1.0})


def _buckets(lp: _Lp, b: Buckets, groups: list[Group], x: list[list[int]]) -> None:
    """``bucket_count`` linearised: y in [0,1] is 1 when any member is chosen (the first bucket's
    latency), z >= 0 the buckets beyond it: z >= (sum count*min(bytes, cap)*x - first*y) / cap."""
    if b.latency <= 0:
        return
    inf = highspy.kHighsInf
    y = lp.col(b.latency * SCALE)
    per_group: dict[int, dict[int, float]] = {}
    for g, k, _ in b.members:
        per_group.setdefault(g, {})[x[g][k]] = 1.0
    for cols in per_group.values():  # one-hot: y >= the sum of a group's member columns
        lp.row(0.0, inf, {y: 1.0} | {c: -1.0 for c in cols})
    if math.isinf(b.first):  # one per key (a gather group): no buckets beyond the first
        return
    z = lp.col(b.latency * SCALE, upper=inf)
    beyond = {z: 1.0, y: b.first / b.cap}
    for g, k, nbytes in b.members:
        _add(beyond, x[g][k], -groups[g].count * min(nbytes, b.cap) / b.cap)
    lp.row(0.0, inf, beyond)


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


def _highs(lp: _Lp) -> highspy.Highs:
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


def _second(h: highspy.Highs, lp: _Lp, x: list[list[int]], first: np.ndarray,
            accept: Callable[[list[int]], bool] | None = None) -> list[int]:
    """The second stage's choice, from the LP when it is integral. When it is not and the objective
    is the candidate indices (an integer), an assignment ``accept`` admits whose index sum reaches
    the LP bound rounded up is optimal too: the first stage's, or the LP's rounded to each group's
    largest candidate. Else HiGHS's MIP solver, from the first stage's answer. The first stage's
    answer also when the solver's tolerances make the added row look infeasible (its bound is the
    first optimum itself, at huge memory values a hair tight)."""
    start = chosen(first, x)
    try:
        bound, values = relaxation(h)
    except Infeasible:
        return start
    found = chosen(values, x)
    if found is not None:
        return found
    if accept is not None:
        rounded = [int(np.argmax(values[cols])) for cols in x]
        for choice in (start, rounded):
            if sum(choice) <= math.ceil(bound - 1e-6) and accept(choice):
                return choice
    try:
        return chosen(mip(h, lp.integer, first), x) or start
    except Infeasible:
        return start


def solve(problem: Problem) -> Solution:
    """The optimal assignment, ties broken by the smallest sum of candidate indices."""
    lp, x, objective = build(problem)
    h = _highs(lp)
    bound, values = relaxation(h)
    root = None
    if chosen(values, x) is None:  # the memory row binds (a knapsack) or buckets count fractionally
        root = _branch_and_cut(h, lp, x, bound, values)
        values = root[2]
    best = float(sum(c * values[i] for i, c in objective.items()))
    # second stage: stay within 1e-9 (relative) of the optimum, minimise the candidate indices
    band = best * 1e-9 + 1e-9 + 1e-7  # 1e-7: HiGHS's dual feasibility tolerance
    if root is None:
        near_optimal_only(h, x, band)
    else:  # the root LP's reduced costs against the optimum: what cannot be within the band of it
        fix_by_reduced_cost(h, x, root[0], root[1], best - bound + band)
    _rows(h, [(-highspy.kHighsInf, best * (1 + 1e-9) + 1e-9, objective)])
    n = len(lp.cost)
    ranks = np.zeros(n)
    for cols in x:
        for k, c in enumerate(cols):
            ranks[c] = k
    h.changeColsCost(n, np.arange(n, dtype=np.int32), ranks)
    limit = (best * (1 + 1e-9) + 1e-9) / SCALE + problem.constant  # evaluate counts the constant

    def accept(choice: list[int]) -> bool:
        time, _, ok = evaluate(problem, choice)
        return ok and time <= limit

    choice = _second(h, lp, x, values, accept)
    time, memory, _ = evaluate(problem, choice)
    return Solution(choice, time, memory, "optimal")


def _branch_and_cut(h: highspy.Highs, lp: _Lp, x: list[list[int]], bound: float,
                    values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The integer optimum when the root LP (``bound``, ``values``) is fractional: HiGHS's MIP solver,
    started from the Lagrangian assignment (``search_bnb.lagrangian``, at the memory row's dual) when
    that fits, after forbidding the candidates whose root reduced cost exceeds that assignment's gap
    to the bound (they are in no better assignment). Returns (root values, root reduced costs, optimum)."""
    sol = h.getSolution()
    reduced = np.asarray(sol.col_dual, dtype=float).copy()
    values = values.copy()
    row = len(lp.rows) - 1  # the memory row, built last
    cost = np.array(lp.cost, dtype=float)
    weights = np.zeros(len(cost))
    for c, m in lp.rows[row][2].items():
        weights[c] = m
    start = None
    if sol.dual_valid:
        found = lagrangian(h, x, row, cost, weights, max(0.0, -float(sol.row_dual[row])) * (1 + 1e-3))
        if found is not None and float(weights @ found) <= lp.rows[row][1]:
            start = found
            fix_by_reduced_cost(h, x, values, reduced, float(cost @ found) - bound + 1e-9 * abs(bound) + 1e-7)
    return values, reduced, mip(h, lp.integer, start)


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
    values = minimise(h, x, integrality=lp.integer)
    least = float(sum(m * values[c] for c, m in memory_row.items()))
    near_optimal_only(h, x, least * 1e-9 + 1e-9 + 1e-7)
    _rows(h, [(-highspy.kHighsInf, least * (1 + 1e-9) + 1e-9, memory_row)])
    h.changeColsCost(n, np.arange(n, dtype=np.int32), np.array(lp.cost, dtype=float))
    choice = _second(h, lp, x, values)
    time, memory, _ = evaluate(problem, choice)
    return Solution(choice, time, memory, "leanest")
