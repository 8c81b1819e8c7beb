"""``--strategy auto``: the cheapest signature per node that fits, as pins for choose_sbp.

``search`` builds the integer program of passes/search_ilp.py from the graph: one group per class
of identical nodes (passes/clusters.py: a node, or the same node of every identical layer), its
candidates and their costs (passes/search_costs.py), and one set of demands per value (how its
consumers take it: boxings run once per layout, their duals where the gradient flows, bytes
autograd keeps). HiGHS solves it exactly (ties broken by the second solve described there). The
answer becomes per-axis pins (``AxisPins``: inputs' layout, each parameter stored and used, and
each op's signature in ``signatures``), so the plan is made by the same propagation and boxing
insertion as a named strategy's, and the backends see nothing new. Each decision gets a reason:
its time per step, the next best candidate and what it would cost, and the cheaper ones that do
not fit the device memory. ``record_search`` (run by make_plan after build_plan) writes the optimum
into the plan's totals as ``search_objective``.
"""

from __future__ import annotations

import dataclasses
import time

from torch import fx

from ..compiler.lower import tensor_args
from ..compiler.node_info import info
from ..compiler.op_table import OP_TABLE
from .clusters import block_of, classes, count_blocks
from .context import PassReport, PlanContext, PlanError
from .memory import SAVES
from .plan import Cost
from .sbp import Broadcast, NdSbp, PartialSum, Split, nd_str
from .search_costs import Cand, Costing
from .search_ilp import Demand, Group, Infeasible, Problem, Use, evaluate, leanest, solve
from .strategies import AxisPins

KEY = "ultraplan.search"


@dataclasses.dataclass
class Search:
    """The search's answer: one chosen candidate per graph node, and what it reports."""

    problem: Problem
    choice: list[int]
    cands: list[list[Cand]]
    group_of: dict[fx.Node, int]
    objective: float
    memory: float
    seconds: float
    blocks: dict[str, int]
    fits: bool = True


def build_problem(gm: fx.GraphModule, ctx: PlanContext, named: dict[int, AxisPins], forced: dict[str, NdSbp],
                  *, cluster: bool = True) -> tuple[Problem, list[list[Cand]], dict[fx.Node, int], Costing]:
    costing = Costing(gm, ctx, named, forced)

    def pins(node: fx.Node) -> tuple:
        return (forced.get(node.name), tuple(p.outputs.get(node.name) for p in named.values()),
                tuple(p.at_rest.get(node.name) for p in named.values()), costing.needs_grad[node])

    cls = classes(gm, pins, cluster=cluster)
    reps: dict[int, fx.Node] = {}
    counts: dict[int, int] = {}
    for node, c in cls.items():
        reps.setdefault(c, node)
        counts[c] = counts.get(c, 0) + 1
    layouts: dict[NdSbp, int] = {}
    cands, groups = [], []
    for c in range(len(reps)):
        node = reps[c]
        options = costing.candidates(node)
        if not options:
            raise PlanError(f"{node.name} ({info(node).op}): no signature fits mesh {ctx.mesh} with the pins given "
                            "(auto found no way to run it)")
        if ctx.mode == "train" and any(u.op == "output" for u in node.users):  # the loss is made P everywhere
            options = _loss_options(costing, node, options)
        cands.append(options)
        groups.append(Group(node.name, counts[c], [o.time for o in options], [o.memory for o in options],
                            [layouts.setdefault(o.out, len(layouts)) for o in options],
                            [o.peak for o in options] if ctx.mode != "train" else []))
    for o in [o for options in cands for o in options]:
        for nd in (*o.ins, o.raw):
            layouts.setdefault(nd, len(layouts))
    demands = _demands(gm, costing, cls, cands, layouts)
    problem = Problem(groups, demands, float(ctx.hardware.memory_bytes), _logging(costing, gm))
    return problem, cands, cls, costing


def _loss_options(costing: Costing, node: fx.Node, options: list[Cand]) -> list[Cand]:
    partial = (PartialSum(),) * len(costing.mesh)
    out = []
    for o in options:
        move = costing.box_time(o.out, partial, node)
        if move is not None:
            out.append(dataclasses.replace(o, time=o.time + move[0] + move[1]))
    return out


def _logging(costing: Costing, gm: fx.GraphModule) -> float:
    if costing.train:
        loss = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        axes = len(costing.mesh)
        return costing.box_time((PartialSum(),) * axes, (Broadcast(),) * axes, loss)[0]
    return 0.0


def _demands(gm, costing: Costing, cls, cands, layouts) -> list[Demand]:
    """One demand per class of values read by the same classes of consumers (at the same positions)."""
    train = costing.train
    keys: dict[tuple, list] = {}
    for v in gm.graph.nodes:
        if v.op == "output" or not v.users:
            continue
        uses = [(u, i) for u in v.users if u.op != "output" for i, a in enumerate(tensor_args(u)) if a is v]
        key = (cls[v], tuple(sorted((cls[u], i) for u, i in uses)))
        entry = keys.setdefault(key, [v, uses, 0, False])
        entry[2] += 1
        entry[3] |= any(block_of(u) != block_of(v) and (block_of(u) or block_of(v)) for u, _ in uses)
    out = []
    lid = layouts.__getitem__
    for (producer, _), (v, uses, count, boundary) in keys.items():
        rec = info(v)
        state = rec.op in ("param", "buffer")
        found = []
        for u, i in uses:
            g = cls[u]
            takes: dict[int, list[int]] = {}
            for k, c in enumerate(cands[g]):
                takes.setdefault(lid(c.ins[i]), []).append(k)
            grad = train and rec.differentiable and OP_TABLE[info(u).op].differentiable and costing.needs_grad[u]
            keeps = train and not state and costing.saves(u, v) and i in SAVES[info(u).op].inputs
            found.append(Use(g, takes, bool(grad), bool(keeps)))
        rule = SAVES.get(rec.op)
        if train and rule is not None and rule.output and any(info(a).differentiable for a in tensor_args(v)):
            own: dict[int, list[int]] = {}
            for k, c in enumerate(cands[producer]):
                own.setdefault(lid(c.raw), []).append(k)
            found.append(Use(producer, own, keeps=True, moves=False))
        nds = {lid(c.out): c.out for c in cands[producer]}
        outs = dict(nds)
        for c in cands[producer]:
            nds[lid(c.raw)] = c.raw
        for u, i in uses:
            for c in cands[cls[u]]:
                nds[lid(c.ins[i])] = c.ins[i]
        wanted = {w for use in found if use.moves for w in use.takes}
        boxes = {(o, w): costing.box_time(outs[o], nds[w], v) for o in outs for w in wanted}
        saved = {w: costing.local_bytes(v, nds[w]) for use in found if use.keeps for w in use.takes}
        out.append(Demand(producer, count, found, {k: b and b[0] for k, b in boxes.items()},
                          {k: b[1] for k, b in boxes.items() if b}, saved, state, boundary))
    return out


def boundary_bound(problem: Problem) -> float:
    """What tying identical layers can lose at most, in modelled seconds (docs/search.md): every
    value read across a layer boundary paying, for each of its uses, its dearest boxing and dual."""
    total = 0.0
    for d in problem.demands:
        if d.boundary:
            dearest = max((m + d.dual.get(k, 0.0) for k, m in d.move.items() if m is not None), default=0.0)
            total += d.count * sum(u.moves for u in d.uses) * dearest
    return total


def search(gm: fx.GraphModule, ctx: PlanContext, named: dict[int, AxisPins], forced: dict[str, NdSbp],
           *, cluster: bool = True) -> Search:
    start = time.perf_counter()
    problem, cands, cls, _ = build_problem(gm, ctx, named, forced, cluster=cluster)
    fits = True
    try:
        solution = solve(problem)
    except Infeasible:  # nothing fits: plan the leanest anyway, which build_plan marks "fits": false
        fits = False
        solution = leanest(problem)
    return Search(problem, solution.choice, cands, cls, solution.time, solution.memory, time.perf_counter() - start,
                  count_blocks(gm, cls), fits)


def _replicated_memory(problem: Problem, cands: list[list[Cand]]) -> float:
    """Bytes per device of every parameter stored whole (its first candidate, (B, B) on every axis)."""
    return sum(g.count * g.memory[0] for g, options in zip(problem.groups, cands) if isinstance(options[0].axes[0], tuple))


def pins_from(found: Search, gm: fx.GraphModule, ctx: PlanContext, named: dict[int, AxisPins]) -> list[AxisPins]:
    """The chosen candidates as per-axis pins (named axes keep their own, gaining op signatures)."""
    axes = len(ctx.mesh.shape)
    pins = [named.get(a) or AxisPins(a, "auto") for a in range(axes)]
    for node, g in found.group_of.items():
        chosen = found.cands[g][found.choice[g]]
        rec = info(node)
        for a in range(axes):
            if node.op == "placeholder":
                pins[a].outputs[node.name] = chosen.axes[a]
            elif rec.op == "param":
                pins[a].at_rest[node.name], pins[a].outputs[node.name] = chosen.axes[a]
            elif node.op == "call_function":
                pins[a].signatures[node.name] = chosen.axes[a]
    return pins


def describe(c: Cand) -> str:
    if not c.ins and c.axes and isinstance(c.axes[0], tuple):
        rest, used = nd_str(tuple(a[0] for a in c.axes)), nd_str(tuple(a[1] for a in c.axes))
        return f"stored [{rest}]" + ("" if rest == used else f", gathered to [{used}] for use")
    if not c.ins:
        return f"[{nd_str(c.out)}]"
    return ", ".join(f"[{nd_str(s)}]" for s in c.ins) + f" -> [{nd_str(c.raw)}]"


def reasons(found: Search) -> dict[int, str]:
    """Per group: why its choice won (local change of the objective with every other choice fixed)."""
    problem, choice = found.problem, list(found.choice)
    touching: dict[int, list[Demand]] = {}
    for d in problem.demands:
        for g in {d.producer, *(u.group for u in d.uses)}:
            touching.setdefault(g, []).append(d)
    out = {}
    for g, group in enumerate(problem.groups):
        options = found.cands[g]
        if len(options) < 2:
            continue
        base = _local(problem, touching.get(g, []), choice)
        alts = []
        for k in range(len(options)):
            if k == choice[g]:
                continue
            trial = [*choice[:g], k, *choice[g + 1:]]
            t, m, ok = _local(problem, touching.get(g, []), trial)
            dt = t - base[0] + group.count * (group.time[k] - group.time[choice[g]])
            dm = m - base[1] + group.count * (group.memory[k] - group.memory[choice[g]])
            alts.append((dt, dm, ok, k))
        text = f"auto: {describe(options[choice[g]])}, {group.count * group.time[choice[g]] * 1e3:.4g} ms of its own"
        feasible = sorted(a for a in alts if a[2] and found.memory + a[1] <= problem.capacity)
        if feasible:
            dt, _, _, k = feasible[0]
            text += f"; next best {describe(options[k])} costs {dt * 1e3:+.4g} ms per step"
        tight = [a for a in alts if a[0] < 0 and found.memory + a[1] > problem.capacity]
        if tight:
            dt, dm, _, k = min(tight)
            text += (f"; {describe(options[k])} would save {-dt * 1e3:.4g} ms but need "
                     f"{(found.memory + dm) / 2**30:.1f} GiB per device > {problem.capacity / 2**30:.1f} GiB")
        out[g] = text + (f" (one choice for {group.count} identical nodes of repeated layers)" if group.count > 1 else "")
    return out


def _local(problem: Problem, demands: list[Demand], choice: list[int]) -> tuple[float, float, bool]:
    return evaluate(problem, choice, demands)


def block_summary(found: Search, gm: fx.GraphModule, axes: int) -> dict[str, str]:
    """Per class of layers: per axis, how its parameters are held and how its residual stream is laid."""
    out: dict[str, str] = {}
    for block in found.blocks:
        nodes = [n for n in found.group_of if block_of(n) == block]
        parts = []
        for a in range(axes):
            kinds = {"B": 0, "split": 0, "gathered": 0}
            stream = set()
            for n in nodes:
                c = found.cands[found.group_of[n]][found.choice[found.group_of[n]]]
                if info(n).op == "param":
                    rest, used = c.axes[a]
                    kinds["B" if isinstance(rest, Broadcast) else "gathered" if rest != used else "split"] += 1
                elif info(n).stream:
                    stream.add(str(c.out[a]))
            name = ("tp" if kinds["split"] else "fsdp" if kinds["gathered"] else "dp")
            if kinds["split"] and Split(1) in {Split(int(s[2:-1])) for s in stream if s.startswith("S(")}:
                name = "sp"
            parts.append(f"axis {a} {name}-like (params {kinds['B']} B, {kinds['gathered']} stored split and gathered, "
                         f"{kinds['split']} used split; stream {'/'.join(sorted(stream)) or '-'})")
        out[block] = f"x{found.blocks[block]}: " + "; ".join(parts)
    return out


def record_search(gm: fx.GraphModule, ctx: PlanContext) -> PassReport:
    """After build_plan: the plan says it was chosen by the search, with the modelled optimum."""
    start = time.perf_counter()
    found: Search | None = gm.meta.get(KEY)
    plan = gm.meta.get("ultraplan.plan")
    if found is None or plan is None:
        return PassReport("record_search", time.perf_counter() - start)
    objective = Cost("the search's optimum: modelled step seconds (passes/search_ilp.py)", found.objective)
    gm.meta["ultraplan.plan"] = dataclasses.replace(plan, totals=(*plan.totals, ("search_objective", objective)))
    return PassReport("record_search", time.perf_counter() - start,
                      [f"chosen by the search: objective {found.objective:.6g} s, plan step_time "
                       f"{plan.total('step_time').value:.6g} s"])


def annotate(found: Search, gm: fx.GraphModule, ctx: PlanContext) -> list[str]:
    """Write each node's reason (NodeInfo.reason) and return the search's decisions for the report."""
    why = reasons(found)
    for node, g in found.group_of.items():
        if g in why:
            info(node).reason = why[g]
    problem = found.problem
    cap = problem.capacity / 2**30
    out = [f"auto: {len(problem.groups)} groups ({sum(len(c) for c in found.cands)} candidates, "
           f"{len(problem.demands)} demands) for {len(found.group_of)} nodes, solved exactly by HiGHS in "
           f"{found.seconds:.3f} s: modelled step {found.objective:.6g} s, {found.memory / 2**30:.2f} GiB of "
           f"{cap:.1f} GiB per device"]
    if not found.fits:
        out.append(f"auto: no plan fits {cap:.1f} GiB per device (the leanest needs {found.memory / 2**30:.1f} GiB); "
                   "that one is planned: use more devices, a smaller batch or a shorter sequence")
    params = [g for g, options in enumerate(found.cands) if isinstance(options[0].axes[0], tuple)]
    chosen = sum(problem.groups[g].count * problem.groups[g].memory[found.choice[g]] for g in params)
    replicated = _replicated_memory(problem, found.cands)
    whole = found.memory - chosen + replicated
    if whole > problem.capacity:
        out.append(f"auto: parameters stored whole would take {replicated / 2**30:.1f} GiB per device (with their "
                   f"gradients and AdamW moments), {whole / 2**30:.1f} GiB with this plan's activations > {cap:.1f} GiB: "
                   "they must be sharded to fit at all")
        for node, g in found.group_of.items():
            if g in params and found.choice[g] != 0:
                info(node).reason += (f"; sharded because, stored whole with every other parameter, the plan would "
                                      f"need {whole / 2**30:.1f} GiB per device > {cap:.1f} GiB")
    out += [f"auto block {b} {text}" for b, text in block_summary(found, gm, len(ctx.mesh.shape)).items()]
    return out
