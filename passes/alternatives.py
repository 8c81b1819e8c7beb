"""Every node's candidate signatures, and what each would cost, for a plan already made (``explain``).

The candidates are the sharding search's (passes/search_costs.py) and so are the prices: for an
``auto`` plan the integer program the search solved (its named axes and ``--force`` pins kept);
for a named strategy the same program with every axis free, so the alternatives the strategy ruled
out are priced as well. The plan's own choice is read back from the plan (each op's input and
output layouts and per-axis splits, each parameter as stored and as used) and located among the
candidates; every other candidate is priced by changing that one group with every other choice
fixed (``local_change``: its own time and memory, the boxings, duals and saved bytes of the values it
produces or reads, its gradient bucket key's latency). Nothing is decided here: the plan is
recomputed from the spec it carries only as far as the fuse pass, as the search sees the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ..compiler.node_info import info
from ..compiler.schema import HardwareSpec
from ..compiler.validate import load_model_spec
from .context import Mesh, PlanContext
from .pipeline import lower_spec, make_context, prepare_spec, run_pipeline
from .plan import Plan
from .sbp import nd_str
from .search import build_problem
from .search_costs import Cand
from .search_explain import bucket_keys, describe, local_change, touching
from .search_ilp import evaluate
from .strategies import AxisPins, forced_pins, pin_axes


@dataclass(frozen=True)
class Alternative:
    """One candidate of a group: ``delta_*`` is the change of the whole step were it chosen instead."""

    index: int
    signature: str  # search_explain.describe's words: "[S(0)], [B] -> [S(0)]", "stored [S(0)], gathered to [B]"
    own_time: float  # seconds per step of the group's own terms (count nodes)
    delta_time: float
    delta_memory: float
    valid: bool  # every other choice kept, the plan is still one choose_sbp can make (parameters taken as stored)
    fits: bool  # ... and it fits the device memory
    chosen: bool


@dataclass(frozen=True)
class NodeChoices:
    """The candidates of one group (a node, or the same node of ``len(nodes)`` identical layers)."""

    nodes: tuple[str, ...]
    op: str
    why: str  # what fixed it: "fsdp on axis 0", "--force", "auto", "propagated"
    alternatives: tuple[Alternative, ...]  # the chosen one first, then by delta_time
    located: bool  # the plan's choice is among the candidates (else alternatives are not priced)


@dataclass(frozen=True)
class Choices:
    groups: tuple[NodeChoices, ...]
    free_axes: tuple[int, ...]  # the axes whose candidates were enumerated
    objective: float  # the search's objective at the plan's choice (modelled step seconds)
    memory: float  # bytes per device in the search's memory row at the plan's choice
    capacity: float


def _key_of_cand(node: fx.Node, c: Cand) -> tuple:
    rec = info(node)
    if rec.op == "param":
        return (nd_str(tuple(a[0] for a in c.axes)), nd_str(tuple(a[1] for a in c.axes)))
    if not c.ins:
        return (nd_str(c.out),)
    splits = tuple(a.variant.name if a.variant else a.split for a in c.axes)
    return (tuple(nd_str(s) for s in c.ins), nd_str(c.raw), splits)


def _key_of_plan(plan: Plan) -> dict[str, tuple]:
    params = {p.node: p for p in plan.params}
    out = {}
    for n in plan.nodes:
        if n.op == "param":
            out[n.name] = (params[n.name].sbp, params[n.name].used)
        elif n.op in ("input", "buffer") or not n.sbp_in:
            out[n.name] = (n.sbp_out,)
        else:
            out[n.name] = (tuple(n.sbp_in), n.sbp_out, tuple(n.splits))
    return out


def context_of(plan: Plan, hardware: HardwareSpec) -> tuple[PlanContext, fx.GraphModule]:
    """The plan's question again and its graph after the fuse pass (what choose_sbp and the search see)."""
    spec, _ = prepare_spec(load_model_spec(plan.spec_source, text=plan.spec_text))
    # the buckets' cap: --bucket-mb's, or the default (the same cap, so the same program either way)
    cap = plan.grad_buckets[0].cap_bytes if plan.grad_buckets else None
    ctx = make_context(spec, hardware, Mesh(tuple(plan.mesh)), batch=plan.batch, seq=plan.seq, mode=plan.mode,
                       spec_text=plan.spec_text, strategies=tuple(plan.strategy.split(",")), forces=tuple(plan.forces),
                       bucket_cap_bytes=cap, fuse=bool(plan.fusions))
    gm = lower_spec(spec, plan.mode)
    run_pipeline(gm, ctx, stop_after="fuse")
    return ctx, gm


def _why(node: fx.Node, pins: list[AxisPins], forced: dict, strategies: tuple[str, ...]) -> str:
    if node.name in forced:
        return "--force"
    named = [f"{p.strategy} on axis {p.axis}" for p in pins if node.name in p.outputs or node.name in p.at_rest]
    if named:
        return ", ".join(named)
    return "auto" if "auto" in strategies else "propagated"


def plan_choices(plan: Plan, hardware: HardwareSpec) -> Choices:
    """The candidates of every group of ``plan``'s graph with their prices (see the module's docstring).
    ValueError when the plan's graph is not the one its spec makes today (another ultraplan made it)."""
    ctx, gm = context_of(plan, hardware)
    names = {n.name for n in gm.graph.nodes if n.op != "output"}
    planned = {n.name for n in plan.nodes if n.op != "boxing"}
    if names != planned:
        missing = sorted(planned ^ names)[:3]
        raise ValueError(f"the plan's graph differs from the one its spec makes now (e.g. {', '.join(missing)}); "
                         "re-plan the spec with this ultraplan")
    pins = pin_axes(gm, ctx)
    forced = forced_pins(gm, ctx)
    auto = "auto" in ctx.strategies
    named = {p.axis: p for p in pins} if auto else {}
    wanted = _key_of_plan(plan)
    for cluster in (True, False):
        problem, cands, group_of, _ = build_problem(gm, ctx, named, forced, cluster=cluster)
        members: dict[int, list[fx.Node]] = {}
        for node, g in group_of.items():
            members.setdefault(g, []).append(node)
        choice: list[int | None] = []
        tied = True
        for g, options in enumerate(cands):
            ks = {next((k for k, c in enumerate(options) if _key_of_cand(n, c) == wanted[n.name]), None)
                  for n in members[g]}
            tied &= len(ks) == 1
            choice.append(min(ks, key=lambda k: -1 if k is None else k))
        if tied:
            break
    located = [k is not None for k in choice]
    full = [k if k is not None else 0 for k in choice]
    objective, memory, _ = evaluate(problem, full)
    near, keys = touching(problem), bucket_keys(problem)
    groups = []
    for g, options in enumerate(cands):
        nodes = members[g]
        alts = []
        if located[g]:
            for k, c in enumerate(options):
                dt, dm, ok = ((0.0, 0.0, True) if k == full[g]
                              else local_change(problem, full, g, k, near.get(g, []), keys.get(g, [])))
                alts.append(Alternative(k, describe(c), problem.groups[g].count * problem.groups[g].time[k], dt, dm,
                                        ok, memory + dm <= problem.capacity, k == full[g]))
            alts.sort(key=lambda a: (not a.chosen, not (a.valid and a.fits), a.delta_time, a.index))
        groups.append(NodeChoices(tuple(n.name for n in nodes), info(nodes[0]).op,
                                  _why(nodes[0], pins, forced, ctx.strategies), tuple(alts), located[g]))
    free = tuple(a for a, s in enumerate(ctx.strategies) if s == "auto") if auto else tuple(range(len(ctx.mesh.shape)))
    return Choices(tuple(groups), free, objective, memory, problem.capacity)
