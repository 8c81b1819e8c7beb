"""The search's problem, solver-free: groups of candidates, the demands between them, gradient
buckets, and ``evaluate``, which prices one assignment directly (no linearisation).

The graph has been reduced (passes/search.py, passes/clusters.py) to *groups*: one group per graph
node, or per class of identical nodes in repeated layers (``count`` nodes sharing one choice).
Group g has candidates k (its nd-SBP signatures), each with a modelled time ``time[k]`` (compute,
collectives inside the call, a parameter's gather and gradient sync), bytes per device
``memory[k]`` and, for inference, the activation it holds at once ``peak[k]``. Values move between
groups through *demands*, one per value (or class of identical values): each of its uses (a
consumer's input position) takes it in a layout w that depends on the consumer's candidate, and
choose_sbp boxes a value once per layout however many consumers want it. passes/search_ilp.py
states the integer program over these and solves it; ``evaluate`` is its objective computed
directly, for brute-force checks, reasons and the tie-break's shortcuts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .buckets import bucket_index, clipped


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
    # a view of its producer's input (memory.py's ``view_of``: pair_part, leading_features): kept in the
    # producer's layout it is the base's storage, which memory.py counts at the base; kept in another,
    # the boxing made a tensor of its own, counted here
    view: bool = False
    # a view's base: (its demand's index, the use by this view); where the base was boxed for the view,
    # the view kept in its own layout keeps that copy of the whole base: base_saved[w] bytes per device
    base: tuple[int, int] | None = None
    base_saved: dict[int, float] = field(default_factory=dict)
    base_kept: bool = True  # a use of the base keeps it (in its own layout): else only this view keeps it


@dataclass
class Buckets:
    """The gradients of one bucket key (passes/buckets.py: the same collectives, the same dtype),
    packed into buckets ``cap`` bytes wide on a line (passes/buckets.py), each paying ``latency``
    seconds. ``members`` are (group, candidate, bytes per node) of the candidates whose gradient
    joins this key. With ``cap = inf``
    it is one collective per key however many join it: a layer's gather group
    (passes/gather_groups.py), whose latency is paid once when any of its parameters is gathered."""

    latency: float
    cap: float
    members: list[tuple[int, int, float]]


@dataclass
class Problem:
    groups: list[Group]
    demands: list[Demand]
    capacity: float  # bytes per device
    constant: float = 0.0  # seconds every plan pays (the loss's logging all-reduce)
    buckets: list[Buckets] = field(default_factory=list)


def bucket_count(b: Buckets, choice: list[int], groups: list[Group]) -> int:
    """The number of buckets of one key, as passes/buckets.py fills them: 0 when no gradient joins
    it, else ceil(S' / cap), S' the sum of the members' bytes each clipped to half the width ``cap``
    (``buckets.clipped``); 1 for a gather group, whose width is unbounded."""
    chosen = [(g, nbytes) for g, k, nbytes in b.members if choice[g] == k]
    if not chosen:
        return 0
    if math.isinf(b.cap):
        return 1
    width = round(b.cap)
    total = sum(groups[g].count * clipped(nbytes, width) for g, nbytes in chosen)
    return bucket_index(total, width) + 1  # the bucket the key's last clipped byte ends in


@dataclass
class Solution:
    choice: list[int]
    time: float
    memory: float
    status: str
    memory_binds: bool = False  # the relaxation fills the device memory (passes/search.py splits ties then)
    gap: float = 0.0  # seconds the optimum may lie below ``time`` (0: proven optimal; search_bnb.MIP_SECONDS)
    untied: float = 0.0  # seconds no assignment of the program untied (passes/search.py's split) can beat


def _base_boxed(problem: Problem, base: tuple[int, int], choice: list[int]) -> bool:
    """The view's base (``Demand.base``) was boxed for it: the view reads another layout than the base's."""
    d = problem.demands[base[0]]
    use = d.uses[base[1]]
    o = problem.groups[d.producer].out[choice[d.producer]]
    return not any(choice[use.group] in ks for w, ks in use.takes.items() if w == o)


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
        memory += sum(d.count * d.saved[w] for w in taken["keeps"] if not (d.view and w == o))
        if d.base is not None and o in taken["keeps"] and (not d.base_kept or _base_boxed(problem, d.base, choice)):
            memory += d.count * d.base_saved.get(o, 0.0)
        for w in taken["moves"]:
            cost = d.move.get((o, w), 0.0)
            if cost is None or (d.state and w != o):
                ok = False
            else:
                time += d.count * cost
        time += sum(d.count * (d.dual.get((o, w)) or 0.0) for w in taken["grad"])
    return time, memory, ok and (demands is not None or memory <= problem.capacity)
