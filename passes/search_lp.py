"""The integer program of ``--strategy auto`` as plain lists of columns and rows (``build``), over
the groups and demands of passes/search_model.py; passes/search_ilp.py hands it to HiGHS and
solves it.

    x[g,k] in {0,1}        one-hot: sum_k x[g,k] = 1
    u[p,o]                 sum of x[p,k] whose output layout is o (an expression)
    v[j,w]                 sum of x[c,k] over the candidates k of use j's consumer c taking w
    e[j,o,w] in [0,1]      use j takes layout o as w: sum_w e[j,o,w] = u[p,o], sum_o e[j,o,w] = v[j,w]
                           (both marginals, as Alpa's edge variables: the LP relaxation is integral
                           on trees); no e where o -> w has no boxing (S -> P), and for parameters
                           and buffers none but o = w (consumers take them as stored)
    s[d,o,w] >= e[j,o,w]   the boxing o -> w runs (once for every use j that needs it); its backward
                           dual likewise, over the uses the gradient flows back through
    k[d,w] >= v[j,w]       the value is kept in layout w for the backward (uses that save it); for a
                           view (Demand.view) k[d,w] >= v[j,w] - e[j,w,w]: taken in the layout it was
                           made in, it is its base's storage, counted at the base
    c[d,w] >= e[j,w,w] - sum_i e[b,i,i]
                           ...unless the base was boxed for the view (its use b, Demand.base; i over the
                           layouts the view reads the base in to make w): then the view keeps that boxed
                           copy of the whole base; without the e[b] term where no use of the base keeps
                           it (Demand.base_kept), as the view alone then keeps it
    y[q] in [0,1]          gradient bucket key or gather group q (passes/buckets.py,
                           passes/gather_groups.py) is used: y >= sum_k x[g,k] over the candidates of
                           each group g whose gradient joins (or that gathers in) q
    z[q] integer >= 0      a bucket key's buckets beyond the first: z*width >= sum count*clipped(bytes)*x
                           - width*y (each gradient at most half the bucket width), so at an optimum
                           y + z = ceil(S' / width), the count passes/buckets.py fills (``bucket_count``)

    minimise   sum count*time[k]*x + sum count*move(o,w)*s + sum count*dual(o,w)*s_dual
               + sum latency[q]*(y[q] + z[q])                        (modelled step seconds)
    subject to sum count*memory[k]*x + sum count*saved(w)*k + sum count*base(w)*c + A
               <= device memory  (one row: the memory model's per-device bytes;
               A >= sum_k peak[k] x[g,k] for every g, inference)

At an optimum e, s, k and y are 0/1 because x is, and y + z is the exact bucket count (a parameter's
gradient bandwidth is in its candidate's time; only the latency is per bucket, as the plan pays
it). The x and z columns are the integer ones: an LP optimum fractional in either goes to branch
and cut (passes/search_ilp.py).

Rows marked ``exact`` have slack 0 or 1 at the program's own completion of an assignment (e, s, k,
y at their least values): the tie-break's ``search_bnb.optimal_face`` may pin those by their duals.
"""

from __future__ import annotations

import math

import highspy

from .buckets import clipped
from .search_model import Buckets, Demand, Group, Problem, Use

SCALE = 1e6  # seconds -> microseconds inside the solver: its absolute tolerances are ~1e-6..1e-9
GIB = 2.0**30  # the memory row in GiB, for the same reason


class Lp:
    """Columns and rows collected in plain lists, handed to HiGHS at once."""

    def __init__(self) -> None:
        self.cost: list[float] = []
        self.upper: list[float] = []
        self.integer: list[int] = []
        self.rows: list[tuple[float, float, dict[int, float]]] = []
        self.exact: list[int] = []  # rows whose slack is 0 or 1 at the program's completion of an assignment
        self.counts: list[int] = []  # the integer bucket-count columns (z), beside the one-hot x
        self.memory_row = -1  # the device-memory row's index (build sets it)
        self.edges: dict[tuple[int, int], dict[tuple[int, int], int]] = {}  # (demand, use) -> e columns by (o, w)

    def col(self, cost: float, upper: float = 1.0, integer: bool = False) -> int:
        self.cost.append(cost)
        self.upper.append(upper)
        if integer:
            self.integer.append(len(self.cost) - 1)
        return len(self.cost) - 1

    def row(self, lower: float, upper: float, terms: dict[int, float], exact: bool = False) -> None:
        if exact:
            self.exact.append(len(self.rows))
        self.rows.append((lower, upper, terms))


def _add(terms: dict[int, float], col: int, coef: float) -> None:
    terms[col] = terms.get(col, 0.0) + coef


def build(problem: Problem) -> tuple[Lp, list[list[int]], dict[int, float]]:
    """The model of the module docstring: (lp, x columns per group, time objective by column)."""
    lp = Lp()
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
    for n, d in enumerate(problem.demands):
        base_use = problem.demands[d.base[0]].uses[d.base[1]] if d.base is not None else None
        assert base_use is None or base_use.group == d.producer, "a view's base is read by the view's own op"
        _demand(lp, n, d, problem.groups[d.producer], x, memory, base_use)
    for b in problem.buckets:
        _buckets(lp, b, problem.groups, x)
    lp.memory_row = len(lp.rows)
    lp.row(-inf, problem.capacity / GIB, memory)
    return lp, x, {i: c for i, c in enumerate(lp.cost) if c}


def _demand(lp: Lp, n: int, d: Demand, producer: Group, x: list[list[int]], memory: dict[int, float],
            base_use: Use | None) -> None:
    """The rows of demand ``n``: per use a joint (o, w) choice with both marginals (tight on trees, as
    Alpa's edge variables), and the boxing o -> w paid once however many uses run it; then what the
    uses keep for the backward, written over those edge columns (``_kept``)."""
    outs: dict[int, list[int]] = {}
    for k, o in enumerate(producer.out):
        outs.setdefault(o, []).append(x[d.producer][k])
    paid: dict[tuple[str, int, int], int] = {}
    single = sum(use.moves for use in d.uses) == 1
    for j, use in enumerate(d.uses):
        if use.moves:
            _edges(lp, n, j, d, use, outs, x, single, paid)
    kept: dict[int, int] = {}
    copies: dict[int, int] = {}
    for j, use in enumerate(d.uses):
        if use.keeps:
            _kept(lp, lp.edges.get((n, j), {}), d, producer, use, outs, x, memory, kept, copies, base_use)


def _edges(lp: Lp, n: int, j: int, d: Demand, use: Use, outs: dict[int, list[int]], x: list[list[int]],
           single: bool, paid: dict[tuple[str, int, int], int]) -> None:
    """Use ``j``'s edge columns e[o,w] with both marginals, and the boxing o -> w each runs."""
    inf = highspy.kHighsInf
    pairs = {}
    by_out: dict[int, dict[int, float]] = {o: {c: -1.0 for c in cols} for o, cols in outs.items()}
    by_in: dict[int, dict[int, float]] = {w: {x[use.group][k]: -1.0 for k in ks} for w, ks in use.takes.items()}
    for o in outs:
        for w in use.takes:
            cost = d.move.get((o, w), 0.0)
            if cost is not None and not (d.state and o != w):
                e = pairs[o, w] = lp.col(0.0)
                by_out[o][e] = by_in[w][e] = 1.0
    lp.edges[n, j] = pairs
    for terms in (*by_out.values(), *by_in.values()):  # sum_w e[o,w] = u[o]; sum_o e[o,w] = v[w]
        lp.row(0.0, 0.0, terms)
    for (o, w), e in pairs.items():
        move, dual = d.move.get((o, w)) or 0.0, d.dual.get((o, w), 0.0) if use.grad else 0.0
        for kind, cost in (("move", move), ("dual", dual)):
            if cost > 0 and single:  # one reader: the boxing runs exactly when e does
                lp.cost[e] += d.count * cost * SCALE
            elif cost > 0:
                if (kind, o, w) not in paid:
                    paid[kind, o, w] = lp.col(d.count * cost * SCALE)
                lp.row(0.0, inf, {paid[kind, o, w]: 1.0, e: -1.0}, exact=True)


def _kept(lp: Lp, pairs: dict[tuple[int, int], int], d: Demand, producer: Group, use: Use,
          outs: dict[int, list[int]], x: list[list[int]], memory: dict[int, float], kept: dict[int, int],
          copies: dict[int, int], base_use: Use | None) -> None:
    """What a use keeps for the backward, in each layout w it takes the value in. A view kept in its own
    layout is its base's storage: counted at the base, unless the base was boxed for the view, whose
    copy of the whole base it then keeps. Both written over the use's diagonal edge e[w,w] (the view
    taken in the layout it was made in) rather than v[j,w] + u[p,w] - 1, its bound from the one-hot
    columns: equal at every assignment, and far tighter in the LP relaxation (with the one-hot bound
    the relaxation of ultramem-v2-1b-7b on 2x4 at batch 64 lay 8% below the optimum)."""
    inf = highspy.kHighsInf
    for w, ks in use.takes.items():
        if w not in kept:
            kept[w] = lp.col(0.0)
            _add(memory, kept[w], d.count * d.saved[w] / GIB)
        taken = {x[use.group][k]: -1.0 for k in ks}
        if not d.view:  # kept[w] >= v[j,w]
            lp.row(0.0, inf, {kept[w]: 1.0} | taken, exact=True)
            continue
        # kept[w] >= v[j,w] - e[w,w] (a use with no edges, the producer keeping its output: v[j,w] - u[p,w])
        own = {pairs[w, w]: 1.0} if (w, w) in pairs else {c: 1.0 for c in outs.get(w, ())}
        lp.row(0.0, inf, {kept[w]: 1.0} | taken | own, exact=True)
        if d.base is None or not own or not d.base_saved.get(w):
            continue
        if w not in copies:
            copies[w] = lp.col(0.0)
            _add(memory, copies[w], d.count * d.base_saved[w] / GIB)
        # copy[w] >= e[w,w] - sum_i e_b[i,i], i over the layouts the view reads the base in when it makes
        # layout w (the base's use b by the view, Demand.base: unboxed); without the e_b term where no
        # use of the base keeps it (Demand.base_kept): the view alone keeps it, boxed or not
        base_edges = lp.edges.get(d.base, {})
        reads = {i for i, ks_b in (base_use.takes.items() if base_use else ()) if any(producer.out[k] == w for k in ks_b)}
        unboxed = {base_edges[i, i]: 1.0 for i in reads if (i, i) in base_edges} if d.base_kept else {}
        if (w, w) in pairs and base_use is not None:
            lp.row(0.0, inf, {copies[w]: 1.0, pairs[w, w]: -1.0} | unboxed)
        else:  # copy[w] >= v[j,w] + u[p,w] + boxed - 2, boxed = 1 - sum_o e_b[o,o]
            unboxed = {e: 1.0 for (o, i), e in base_edges.items() if o == i} if d.base_kept else {}
            lp.row(-1.0, inf, {copies[w]: 1.0} | taken | {c: -1.0 for c in outs.get(w, ())} | unboxed)


def _buckets(lp: Lp, b: Buckets, groups: list[Group], x: list[list[int]]) -> None:
    """``bucket_count`` as columns: y in [0,1] is 1 when any member is chosen (a gather group's one
    collective, a bucket key's first bucket), the integer z >= 0 counts a key's buckets beyond the
    first: z * width >= sum count*clipped(bytes)*x - width*y, in 1/1024ths of the width (two bytes
    past a multiple of the width stay above the solver's feasibility tolerance, 1e-7; coefficients
    of whole widths would not, and of KiB ran the 120B search's LPs slower; ``buckets.clipped``: at
    most half the width)."""
    if b.latency <= 0:
        return
    inf = highspy.kHighsInf
    y = lp.col(b.latency * SCALE)
    per_group: dict[int, dict[int, float]] = {}
    for g, k, _ in b.members:
        per_group.setdefault(g, {})[x[g][k]] = 1.0
    for cols in per_group.values():  # one-hot: y >= the sum of a group's member columns
        lp.row(0.0, inf, {y: 1.0} | {c: -1.0 for c in cols}, exact=True)
    if math.isinf(b.cap):  # one collective per key (a gather group): no buckets beyond the first
        return
    z = lp.col(b.latency * SCALE, upper=inf, integer=True)
    lp.counts.append(z)
    width = round(b.cap)
    beyond = {z: 1024.0, y: 1024.0}
    for g, k, nbytes in b.members:
        _add(beyond, x[g][k], -groups[g].count * clipped(nbytes, width) * 1024.0 / width)
    lp.row(0.0, inf, beyond)
