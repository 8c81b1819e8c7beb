"""Sync drift: a blocking collective waits longer the longer its ranks computed apart before it.

Ranks that leave a sync point together do not reach the next one together: each is held up by its
host (the scheduler time-slicing ranks that share a core, other work, a page fault) at random
moments, and a blocking collective ends only when its last member arrives. A sum of independent
delays spreads as the square root of its length, so the wait a call adds grows as the square root
of the compute since the ranks last synced. Measured here with ``bench/collective_stretch.py`` (a
1 KiB all_reduce after chains of tiny ops, docs/cost-model.md "Session 20"): on 4 gloo ranks
sharing 2 cores a call after 1.1, 2.5, 10 and 45 ms of compute added 0.8, 1.9, 3.2 and 8.3 ms more
than one after 0.06 ms: 0.8 to 1.2 ms per square root of a millisecond, where a line through them
would need a slope falling from 0.7 to 0.2. calibrate measures ``collective_drift`` per group size
(the spread of the slowest of n grows with n); a spec that lists it gets one more step-time term:

    sync_drift_time = sum over the step's sync points of drift_n * sqrt(busy since the previous one)

- sync points: each blocking collective of the forward and of the backward (a boxing and its dual,
  a variant's inner collective, an fsdp gather group's all-gather, where the layer waits for it)
  on its group of n ranks; the end of the backward, where the gradient buckets are waited for and
  the loss is all-reduced (the world); in training the end of the step after the optimizer (the
  program's clock barrier, the world). The gradient buckets and the gather groups' reduce-scatters,
  launched during the backward and waited for at its end, are not.
- busy: what the plan models a device spending on each node between them: its FLOPs over peak,
  its traffic over memory bandwidth, its launches and loop passes (passes/host_cost.py's terms),
  the forward's in graph order, the backward's in reverse; AdamW's after the backward.

Each stretch between sync points pays once, whatever its length, so where a plan puts its
blocking calls matters, not only how many it has: two calls back to back add almost nothing, a
call in the middle of a long stretch splits one square root into two larger in sum. A plan
without blocking calls (data parallel) pays its stretches at the step's two ends. The search
(passes/search_costs.py) cannot see a stretch (it depends on every other node's choice): it leaves
this term out, and docs/search.md states what that can cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from ..compiler.schema import HardwareSpec
from .host_cost import nearest_group

DRIFT_SYMBOLS: dict[sympy.Symbol, int] = {}  # drift_symbol's group size of each it made


def drift_symbol(group: int) -> sympy.Symbol:
    """The drift of a sync on ``group`` ranks, seconds per square root of a second (``drift_4``)."""
    symbol = sympy.Symbol(f"drift_{group}", nonnegative=True)
    DRIFT_SYMBOLS[symbol] = group
    return symbol


def drift_figure(hardware: HardwareSpec, group: int) -> float:
    """``collective_drift`` of a group of ``group`` ranks: calibrate's figure for that size, else the
    nearest size's (by ratio; the larger of two as near); 0 for a group of one (no peer to wait for)
    or a spec without the field."""
    if group <= 1 or not hardware.collective_drift:
        return 0.0
    return nearest_group(hardware.collective_drift, group)


def drift_values(hardware: HardwareSpec, groups: tuple[int, ...]) -> dict[sympy.Symbol, float]:
    """The drift symbols' numbers for a plan whose syncs run on groups of the sizes ``groups``."""
    if not hardware.collective_drift:
        return {}
    return {drift_symbol(n): drift_figure(hardware, n) for n in groups}


@dataclass
class Schedule:
    """A step's nodes and blocking calls in graph order, as build_plan meets them: ``busy`` for each
    node's forward and backward seconds, ``sync`` for each blocking call of the forward or backward."""

    events: list[tuple] = field(default_factory=list)

    def busy(self, forward: sympy.Expr, backward: sympy.Expr) -> None:
        self.events.append(("busy", forward, backward))

    def sync(self, phase: str, group: int) -> None:
        self.events.append((phase, group))

    def stretches(self, world: int, optimizer: sympy.Expr | None) -> list[tuple[sympy.Expr, int]]:
        """(busy seconds since the previous sync point, ranks that sync) for each sync point of a step:
        the forward's calls in graph order, the backward's in reverse, the end of the backward (of the
        forward in inference), and with ``optimizer`` (training) the step's end after it."""
        out: list[tuple[sympy.Expr, int]] = []
        terms: list[sympy.Expr] = []
        for walk, phase, index in ((self.events, "forward", 1), (reversed(self.events), "backward", 2)):
            if phase == "backward" and optimizer is None:
                break
            for event in walk:
                if event[0] == "busy":
                    terms.append(event[index])
                elif event[0] == phase:
                    out.append((sympy.Add(*terms), event[1]))
                    terms = []
        out.append((sympy.Add(*terms), world))
        if optimizer is not None:
            out.append((optimizer, world))
        return out


def drift_time(stretches: list[tuple[sympy.Expr, int]]) -> sympy.Expr:
    """``sync_drift_time`` of a step's stretches (module docstring)."""
    return sympy.Add(*(drift_symbol(group) * sympy.sqrt(busy) for busy, group in stretches if group > 1))
