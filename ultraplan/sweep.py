"""``ultraplan plan SPEC --sweep batch=1,8,64,512`` (or ``seq=``): plan at each value and say where the
chosen signatures change.

Each point is a whole plan (the search re-run under ``--strategy auto``); between consecutive
points the table lists what changed: an op's signature (its inputs' SBPs -> its output's) or a
parameter's placement (stored, used). Layers that change alike are folded into one line with
``*`` for the layer index and a count, so a 32-layer model's flip reads as one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ultraplan import api
from ultraplan.passes.context import PlanError
from ultraplan.passes.plan import Plan

SWEEPABLE = ("batch", "seq")


def parse_sweep(text: str) -> tuple[str, list[int]]:
    """``"batch=1,8,64"`` -> ("batch", [1, 8, 64]); ValueError naming the fix otherwise."""
    key, sep, values = str(text).partition("=")
    key = key.strip()
    if not sep or key not in SWEEPABLE:
        raise ValueError(f"--sweep takes batch=V1,V2,... or seq=V1,V2,... (e.g. batch=1,8,64,512), got {text!r}")
    try:
        numbers = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sweep {key}= takes whole numbers separated by commas, got {values!r}") from None
    if not numbers or any(n < 1 for n in numbers):
        raise ValueError(f"--sweep {key}= needs at least one value, each at least 1, got {values!r}")
    return key, numbers


def choices(plan: Plan) -> dict[str, str]:
    """What the plan chose, by node: each op's signature and each parameter's placement."""
    out = {p.node: f"stored [{p.sbp}] used [{p.used}]" for p in plan.params}
    for node in plan.nodes:
        if node.op in ("boxing", "param") or node.name in out:
            continue
        ins = ", ".join(f"[{s}]" for s in node.sbp_in)
        out[node.name] = f"{ins} -> [{node.sbp_out}]" if ins else f"[{node.sbp_out}]"
    return out


def changes(before: dict[str, str], after: dict[str, str]) -> list[tuple[str, str, str, int]]:
    """(node pattern, before, after, count): the nodes whose choice differs, layers folded by pattern."""
    folded: dict[tuple[str, str, str], int] = {}
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name, "(absent)"), after.get(name, "(absent)")
        if old != new:
            key = (re.sub(r"layers_\d+_", "layers_*_", name), old, new)
            folded[key] = folded.get(key, 0) + 1
    return [(name, old, new, count) for (name, old, new), count in folded.items()]


@dataclass
class Point:
    value: int
    plan: Plan | None
    error: str = ""


def sweep(spec: str, mesh: str, key: str, values: list[int], **plan_args) -> list[Point]:
    """Plan at each value of ``key``; a value that cannot be planned keeps its error."""
    points = []
    for value in values:
        try:
            points.append(Point(value, api.plan(spec, mesh, **(plan_args | {key: value}))))
        except PlanError as exc:
            points.append(Point(value, None, str(exc)))
    return points


def render(key: str, points: list[Point]) -> str:
    """The table: one row per point (step time, memory, fits), then the changes since the previous
    point that planned."""
    lines = [f"{key:>8s}  {'step_time':>12s}  {'memory/device':>14s}  fits  changes since the previous point"]
    previous: dict[str, str] | None = None
    for point in points:
        if point.plan is None:
            lines.append(f"{point.value:>8d}  {'-':>12s}  {'-':>14s}  -     not planned: {point.error}")
            continue
        totals = dict(point.plan.totals)
        now = choices(point.plan)
        diff = changes(previous, now) if previous is not None else []
        summary = ("(first point)" if previous is None else f"{len(diff)} change(s)" if diff else "none")
        lines.append(f"{point.value:>8d}  {totals['step_time'].value * 1e3:>10.4g}ms  "
                     f"{totals['memory_per_device'].value / 2**20:>11.4g}MiB  {point.plan.fits!s:5s} {summary}")
        for name, old, new, count in diff:
            lines.append(f"{'':>8s}    {name}{f' (x{count})' if count > 1 else ''}: {old}  ->  {new}")
        previous = now
    return "\n".join(lines)
