"""Per value table (or expert group): where it is placed, what that moves and holds, and where it flips.

For each table of a plan (parameters of the ``values`` optimizer group and MoE expert weights,
grouped by the module that owns them: ``memory_tables.ring.*``, ``layers.1.peer.*``), the plan is
made again with the table placed each way (``--place GROUP=number|dim|replicate``, the rest of the
question unchanged) and the report gives, per placement:

- the bytes per step and device of the collectives that serve the table (sympy in B, T and the mesh,
  from the plans' one list of collectives): replicated, its gradients' synchronisation; placed
  otherwise, that plus the change of the whole plan's communication (the boxings into and out of its
  lookups, the collectives inside a routed lookup, the backward duals, a partial sum carried through
  linear ops before it is reduced);
- the table's memory per device (parameters, gradients and AdamW's two moments in training) and
  whether the whole plan fits;
- the modelled step time of the whole plan (the plan's ``step_time``, sympy in B);

and, against each other placement, the batch size at which the two step times cross (``sympy.solve``
of their difference in B, every other symbol at the plan's value): the batch at which the choice
would flip. Lookup traffic grows with B while a replicated table's gradient all-reduce does not, so
replicated against split placements flips at one batch; number-wise against dimension-wise both
grow with B, so they flip (if at all) with the value dim or the mesh, not the batch.

The value dim is a number of the spec, not a symbol of the plan, so its flip point is solved from
plans: each placement is planned again with every table's ``value_dim`` doubled, its step time
written as a line in the symbol ``D_v`` through the two (every term of the step time that depends on
the value width is proportional to it: lookup and gradient bytes, the lookups' and pooling's FLOPs)
and checked on a third plan at triple width, and the crossing solved by ``sympy.solve`` in ``D_v``
(``value_dim_flips``; tests/unit/test_placement.py compares it with a scan of re-planned widths).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import sympy

from ..compiler.schema import ModelSpec
from ..compiler.shapes import B, T
from .context import Mesh, PlanError
from .pipeline import make_context, make_plan
from .placement import EXPERT_DIMS, PLACEMENTS
from .plan import Plan
from .symbols import PEAK, axis_bandwidth, axis_latency, axis_size

SYMBOLS = {str(s): s for s in (B, T, PEAK, *(f(a) for a in range(4) for f in (axis_size, axis_bandwidth, axis_latency)))}
STATE_COPIES = {"train": 4, "infer": 1}  # parameter, gradient and AdamW's two moments (float32) in training


@dataclasses.dataclass(frozen=True)
class Option:
    """One placement of one table, as planned."""

    placement: str  # per axis, comma separated: "number", "dim,number", ...
    comm_bytes: sympy.Expr  # bytes per step and device that serve the table
    comm_bytes_value: float
    table_memory: float  # the table's bytes per device (with gradients and optimizer state in training)
    plan_memory: float  # the whole plan's memory per device
    fits: bool
    step_time: sympy.Expr
    step_time_value: float
    error: str = ""  # the placement is not possible here (sizes do not divide): why


@dataclasses.dataclass(frozen=True)
class TableReport:
    table: str  # the glob naming the group: "memory_tables.ring.*"
    params: tuple[str, ...]
    chosen: Option
    options: tuple[Option, ...]
    flips: tuple[tuple[str, str], ...]  # (other placement, "B = 1234.5" or why it never flips)
    dim_flips: tuple[tuple[str, str], ...] = ()  # (other placement, "D_v = 40.5" or why it never flips)


def table_groups(plan: Plan) -> dict[str, tuple[str, ...]]:
    """Glob of each table's owning module -> its placed parameters' canonical names."""
    out: dict[str, list[str]] = {}
    for p in plan.params:
        owner, _, own = p.name.rpartition(".")
        expert = (owner.rsplit(".", 1)[-1], own) in EXPERT_DIMS
        if p.group == "values" or expert:
            out.setdefault(owner + (".w_*" if expert else ".*"), []).append(p.name)
    return {k: tuple(v) for k, v in out.items()}


def placement_of(plan: Plan, params: tuple[str, ...]) -> str:
    """The words a plan's storage of ``params`` amounts to (the first parameter's, per axis)."""
    sbp = next(p.sbp for p in plan.params if p.name == params[0])
    return ",".join("replicate" if e == "B" else "number" if e == "S(0)" else "dim" for e in sbp.split(","))


def _expr(text: str) -> sympy.Expr:
    """A plan's cost text back in the named symbols (with their assumptions: ``n0`` a positive integer)."""
    return sympy.sympify(text, locals=SYMBOLS)


def table_comm_bytes(plan: Plan, params: tuple[str, ...]) -> sympy.Expr:
    """Wire bytes per step and device of the collectives serving these parameters' lookups: boxings of
    the lookups' inputs and outputs, collectives inside their calls, and the gradients' sync."""
    nodes = {p.node for p in plan.params if p.name in params}
    boxes = {n.name: n for n in plan.nodes if n.op == "boxing"}
    stored = {b for b, n in boxes.items() if n.args and n.args[0] in nodes}  # fsdp-style gathers of the table
    lookups = {n.name for n in plan.nodes if n.op != "boxing" and set(n.args) & (nodes | stored)}
    serving = lookups | stored | {b for b, n in boxes.items() if n.args[0] in lookups}
    serving |= {a for n in plan.nodes if n.name in lookups for a in n.args if a in boxes}
    exprs = [_expr(c.wire_bytes.expr) for c in plan.collectives if c.node in serving]
    exprs += [_expr(c.wire_bytes.expr) for p in plan.params if p.name in params for c in p.grad_sync]
    return sympy.Add(*exprs)


def _option(plan: Plan, params: tuple[str, ...], words: str, mode: str, values: dict, comm: sympy.Expr) -> Option:
    memory = sum(p.bytes_per_device.value for p in plan.params if p.name in params) * STATE_COPIES[mode]
    totals = dict(plan.totals)
    return Option(words, comm, float(comm.xreplace(values)), memory, totals["memory_per_device"].value, plan.fits,
                  _expr(totals["step_time"].expr), totals["step_time"].value)


def _flip(a: Option, b: Option, values: dict) -> str:
    """The batch at which ``a``'s and ``b``'s step times cross, or why they never do."""
    others = {k: v for k, v in values.items() if k != B}
    diff = sympy.expand((a.step_time - b.step_time).xreplace(others))
    if diff.free_symbols - {B}:
        return f"not solved: the difference holds {sorted(map(str, diff.free_symbols - {B}))}"
    if B not in diff.free_symbols:
        return "never: the difference does not depend on the batch (it flips with the value dim or the mesh)"
    if diff.is_polynomial(B):
        roots = [r for r in sympy.solve(sympy.Eq(diff, 0), B) if r.is_real and r > 0]
        return f"B = {float(min(roots)):.6g}" if roots else "never for B > 0"
    return _numeric_root(diff)


def _numeric_root(diff: sympy.Expr) -> str:
    """The smallest positive B where ``diff`` changes sign, for differences sympy cannot solve in closed
    form (an MoE's expected distinct experts, E (1 - (1 - k/E)^(B T))): scanned over powers of two up
    to 2^30, then bisected."""
    f = sympy.lambdify(B, diff, "math")
    grid = [2.0**k for k in range(-4, 31)]
    signs = [f(b) for b in grid]
    for lo, hi, a in zip(grid, grid[1:], signs):
        if a == 0:
            return f"B = {lo:.6g}"
        if a * f(hi) < 0:
            for _ in range(100):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if f(mid) * a > 0 else (lo, mid)
            return f"B ~ {(lo + hi) / 2:.6g} (numeric)"
    return "never for 1/16 <= B <= 2^30"


D_V = sympy.Symbol("D_v", positive=True)
WIDTHS = (2, 3)  # value-dim factors re-planned: the line's second point, and its check


def with_value_dim(spec: ModelSpec, factor: int) -> ModelSpec | None:
    """``spec`` with every memory sublayer's value width (``value_dim``) times ``factor``; None when no
    sublayer has one (PKM's values default to the residual width: no width of their own to vary)."""
    changed, layers = False, []
    for layer in spec.layers:
        subs = []
        for sub in layer.sublayers:
            width = getattr(sub.config, "value_dim", None)
            if isinstance(width, int):
                sub = dataclasses.replace(sub, config=dataclasses.replace(sub.config, value_dim=width * factor))
                changed = True
            subs.append(sub)
        layers.append(dataclasses.replace(layer, sublayers=tuple(subs)))
    return dataclasses.replace(spec, layers=tuple(layers)) if changed else None


def value_dim_of(spec: ModelSpec) -> int | None:
    """The first memory sublayer's value width (the one ``with_value_dim`` scales), if any."""
    return next((s.config.value_dim for layer in spec.layers for s in layer.sublayers
                 if isinstance(getattr(s.config, "value_dim", None), int)), None)


def step_time_line(times: dict[int, float], width: int) -> sympy.Expr | str:
    """The step time as a line in ``D_v`` through its values at ``width`` times each factor (1 and
    WIDTHS[0]), or why not: a third factor's value off the line (relative 1e-6). Far beyond those
    widths the line is an extrapolation: a table's gradient may add a bucket there (passes/buckets.py),
    a step of one all-reduce's latency."""
    (f1, t1), (f2, t2), (f3, t3) = sorted(times.items())
    slope = sympy.nsimplify((t2 - t1) / ((f2 - f1) * width), rational=True)
    line = sympy.nsimplify(t1, rational=True) + slope * (D_V - f1 * width)
    if abs(float(line.subs(D_V, f3 * width)) - t3) > 1e-6 * max(abs(t3), 1e-30):
        return f"not solved: the step time is not linear in the value dim ({t1:.6g}, {t2:.6g}, {t3:.6g} s)"
    return line


def _dim_flip(a: sympy.Expr | str, b: sympy.Expr | str) -> str:
    """The value dim at which two step-time lines cross, or why not."""
    if isinstance(a, str) or isinstance(b, str):
        return a if isinstance(a, str) else b
    diff = sympy.expand(a - b)
    if not diff.has(D_V):
        return "never: the difference does not depend on the value dim"
    roots = [r for r in sympy.solve(sympy.Eq(diff, 0), D_V) if r.is_real and r > 0]
    return f"value_dim = {float(min(roots)):.6g}" if roots else "never for value_dim > 0"


def value_dim_flips(spec: ModelSpec, words: list[str], chosen: str, plan_at: Callable[[ModelSpec, str], Plan]
                    ) -> tuple[tuple[str, str], ...]:
    """Against the ``chosen`` placement, the value dim at which each other placement of ``words`` would
    be faster or slower: ``plan_at(spec, placement)`` plans the table placed so."""
    width = value_dim_of(spec)
    if width is None:
        return tuple((w, "not solved: the model's tables have no value_dim of their own") for w in words if w != chosen)
    lines: dict[str, sympy.Expr | str] = {}
    for w in words:
        try:
            times = {f: plan_at(with_value_dim(spec, f) if f != 1 else spec, w).total("step_time").value
                     for f in (1, *WIDTHS)}
            lines[w] = step_time_line(times, width)
        except PlanError as exc:
            lines[w] = f"not solved: {exc}"
    return tuple((w, _dim_flip(lines[chosen], lines[w])) for w in words if w != chosen)


def table_reports(spec: ModelSpec, hardware, mesh: Mesh, *, batch: int | None = None, seq: int | None = None,
                  mode: str = "train", strategies: tuple[str, ...] = (), forces: tuple[tuple[str, str], ...] = (),
                  fuse: bool = True, spec_text: str = "", value_dims: bool = True) -> list[TableReport]:
    """The per-table report of the plan these arguments make (one re-plan per table and placement;
    ``value_dims``: two more per placement at wider values, for the value-dim flip points)."""
    args = dict(batch=batch, seq=seq, mode=mode, strategies=strategies, fuse=fuse, spec_text=spec_text)
    base, _, _ = make_plan(spec, hardware, mesh, forces=forces, **args)
    values = make_context(spec, hardware, mesh, batch=batch, seq=seq, mode=mode).values()
    reports = []
    for glob, params in table_groups(base).items():
        chosen_words = placement_of(base, params)
        plans: dict[str, Plan | str] = {chosen_words: base}
        for word in PLACEMENTS:
            words = ",".join([word] * len(mesh.shape))
            if words not in plans:
                try:
                    plans[words] = make_plan(spec, hardware, mesh, forces=(*forces, (glob, words)), **args)[0]
                except PlanError as exc:
                    plans[words] = str(exc)
        comm = _table_comm(plans, params, ",".join(["replicate"] * len(mesh.shape)))
        options = {w: _option(p, params, w, mode, values, comm[w]) if isinstance(p, Plan) else
                   Option(w, sympy.Integer(0), math.nan, math.nan, math.nan, False, sympy.Integer(0), math.nan, p)
                   for w, p in plans.items()}
        chosen = options[chosen_words]
        flips = tuple((o.placement, _flip(chosen, o, values)) for o in options.values()
                      if o is not chosen and not o.error)
        dim_flips = ()
        if value_dims:
            def plan_at(s: ModelSpec, words: str, glob: str = glob) -> Plan:
                return make_plan(s, hardware, mesh, forces=(*forces, (glob, words)), **args)[0]
            dim_flips = value_dim_flips(spec, [o.placement for o in options.values() if not o.error], chosen_words,
                                        plan_at)
        reports.append(TableReport(glob, params, chosen, tuple(options.values()), flips, dim_flips))
    return reports


def _table_comm(plans: dict, params: tuple[str, ...], replicated: str) -> dict[str, sympy.Expr]:
    """Bytes serving the table under each placement: the replicated plan's own (its gradients' sync,
    attributed directly) plus how much the whole plan's communication changes when the table is placed
    otherwise, so that a partial sum carried on through linear ops before it is reduced still counts."""
    base = plans.get(replicated)
    if not isinstance(base, Plan):  # no replicated plan to compare with: attribute directly
        return {w: table_comm_bytes(p, params) for w, p in plans.items() if isinstance(p, Plan)}
    own = table_comm_bytes(base, params)
    total = _expr(dict(base.totals)["comm_wire_bytes"].expr)
    return {w: sympy.expand(own + _expr(dict(p.totals)["comm_wire_bytes"].expr) - total)
            for w, p in plans.items() if isinstance(p, Plan)}


def render(reports: list[TableReport]) -> str:
    """The report as text, one block per table."""
    lines = []
    for r in reports:
        lines.append(f"{r.table} ({len(r.params)} parameter(s)): placed {r.chosen.placement}")
        for o in r.options:
            mark = "*" if o is r.chosen else " "
            if o.error:
                lines.append(f"  {mark} {o.placement:18s} not possible: {o.error}")
                continue
            lines.append(f"  {mark} {o.placement:18s} moves {o.comm_bytes_value:12.6g} B/step/device "
                         f"(= {o.comm_bytes}); table {o.table_memory:11.5g} B/device; plan {o.plan_memory:11.5g} "
                         f"B/device{'' if o.fits else ' (does not fit)'}; step {o.step_time_value:.6g} s")
        for other, where in r.flips:
            lines.append(f"    step time crosses {other}: {where}")
        for other, where in r.dim_flips:
            lines.append(f"    in the value dim, crosses {other}: {where}")
    return "\n".join(lines)
