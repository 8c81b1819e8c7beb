"""``--strategy auto``: the cheapest signature per node that fits, as pins for choose_sbp.

``search`` builds the integer program of passes/search_ilp.py from the graph: one group per class
of identical nodes (passes/clusters.py: a node, or the same node of every identical layer), its
candidates and their costs (passes/search_costs.py), and one set of demands per value (how its
consumers take it: boxings run once per layout, their duals where the gradient flows, bytes
autograd keeps). HiGHS solves it exactly (ties broken by the second solve described there). The
answer becomes per-axis pins (``AxisPins``: inputs' layout, each parameter stored and used, and
each op's signature in ``signatures``), so the plan is made by the same propagation and boxing
insertion as a named strategy's, and the backends see nothing new. Each decision gets a reason
(passes/search_explain.py):
its time per step, the next best candidate and what it would cost, and the cheaper ones that do
not fit the device memory. ``record_search`` (run by make_plan after build_plan) writes the optimum
into the plan's totals as ``search_objective``.
"""

from __future__ import annotations

import dataclasses
import math
import time

from torch import fx

from ..compiler.lower import tensor_args
from ..compiler.node_info import info
from ..compiler.op_table import OP_TABLE
from .buckets import DEFAULT_BUCKET_BYTES
from .clusters import block_of, classes, count_blocks
from .context import PassReport, PlanContext, PlanError
from .gather_groups import LAYER
from .memory import SAVES
from .plan import Cost
from .sbp import Broadcast, NdSbp, PartialSum
from .search_costs import Cand, Costing
from .search_ilp import Buckets, Demand, Group, Infeasible, Problem, Use, leanest, solve
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
    gap: float = 0.0  # seconds the optimum may lie below ``objective`` (0: proven; search_bnb.MIP_SECONDS)


def build_problem(gm: fx.GraphModule, ctx: PlanContext, named: dict[int, AxisPins], forced: dict[str, NdSbp],
                  *, cluster: bool = True, split: bool = False
                  ) -> tuple[Problem, list[list[Cand]], dict[fx.Node, int], Costing]:
    costing = Costing(gm, ctx, named, forced)

    def pins(node: fx.Node) -> tuple:
        return (forced.get(node.name), tuple(p.outputs.get(node.name) for p in named.values()),
                tuple(p.at_rest.get(node.name) for p in named.values()), costing.needs_grad[node])

    cls = classes(gm, pins, cluster=cluster, split=split)
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
    members: dict[int, list[fx.Node]] = {}
    for node, c in cls.items():
        members.setdefault(c, []).append(node)
    problem = Problem(groups, demands, float(ctx.hardware.memory_bytes), _logging(costing, gm),
                      _buckets(costing, cands, ctx) + _gathers(cands, members))
    return problem, cands, cls, costing


def _buckets(costing: Costing, cands: list[list[Cand]], ctx: PlanContext) -> list[Buckets]:
    """One set of gradient buckets per bucket key (passes/buckets.py's width: 50 MiB, or
    ``--bucket-mb``), its members the candidates whose gradient joins it."""
    cap = float(DEFAULT_BUCKET_BYTES if ctx.bucket_cap_bytes is None else ctx.bucket_cap_bytes)
    keys: dict[tuple, Buckets] = {}
    for g, options in enumerate(cands):
        for k, o in enumerate(options):
            if o.grad is not None:
                key, nbytes = o.grad
                if key not in keys:
                    keys[key] = Buckets(costing.bucket_latency(key), cap, [])
                keys[key].members.append((g, k, nbytes))
    return list(keys.values())


def _gathers(cands: list[list[Cand]], members: dict[int, list[fx.Node]]) -> list[Buckets]:
    """One set per gather group (passes/gather_groups.py: a layer's fsdp gathers on one axis in one
    dtype run as one all-gather and one reduce-scatter): its latency is paid once per layer when any
    member gathers, like a bucket key that fits one bucket (``cap = inf``). A class of
    identical layers shares one choice, so its groups are one key paying once per layer it stands for."""
    keys: dict[tuple, Buckets] = {}
    for g, options in enumerate(cands):
        for k, o in enumerate(options):
            if o.gather is not None:
                axis, dtype, latency = o.gather
                layers = tuple(sorted({int(LAYER.match(info(n).param.name).group(1)) for n in members[g]}))
                key = (layers, axis, dtype)
                if key not in keys:
                    keys[key] = Buckets(latency * len(layers), math.inf, [])
                keys[key].members.append((g, k, 0.0))
    return list(keys.values())


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
    key_of: dict[fx.Node, tuple] = {}
    for v in gm.graph.nodes:
        if v.op == "output" or not v.users:
            continue
        uses = [(u, i) for u in v.users if u.op != "output" for i, a in enumerate(tensor_args(u)) if a is v]
        key = key_of[v] = (cls[v], tuple(sorted((cls[u], i) for u, i in uses)))
        entry = keys.setdefault(key, [v, uses, 0, False])
        entry[2] += 1
        entry[3] |= any(block_of(u) != block_of(v) and (block_of(u) or block_of(v)) for u, _ in uses)
    out = []
    lid = layouts.__getitem__
    index = {key: n for n, key in enumerate(keys)}
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
            # a kept parameter is its stored copy (memory.py: parameters are not activations); a kept
            # buffer (a fixed tensor, such as UltraMem's rank-one factor) is counted as memory.py counts it
            keeps = train and rec.op != "param" and costing.saves(u, v) and i in SAVES[info(u).op].inputs
            found.append(Use(g, takes, bool(grad), bool(keeps)))
        rule = SAVES.get(rec.op)
        # a view (pair_part, leading_features) shares its base's storage, which memory.py counts once at
        # the base (exact when the base is kept, as add_rms_norm's is); a boxing of it is a tensor of its own
        view = rule is not None and rule.view_of is not None
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
        shape, dtype, memo = rec.concrete_shape, rec.dtype, costing.pair_memo
        boxes = {}
        for o in outs:  # memoised by layout ids: hashing the layouts themselves was most of this loop
            for w in wanted:
                key = (o, w, shape, dtype)
                if key not in memo:
                    memo[key] = costing.box_time(outs[o], nds[w], v)
                boxes[o, w] = memo[key]
        saved = {w: costing.local_bytes(v, nds[w]) for use in found if use.keeps for w in use.takes}
        demand = Demand(producer, count, found, {k: b and b[0] for k, b in boxes.items()},
                        {k: b[1] for k, b in boxes.items() if b}, saved, state, boundary, view)
        if view and saved:
            _link_base(demand, v, rule.view_of, key_of, keys, index, cls, cands[producer], costing, lid, out)
        out.append(demand)
    return out


def _link_base(demand: Demand, v: fx.Node, position: int, key_of, keys, index, cls, options: list[Cand],
               costing: Costing, lid, built: list[Demand]) -> None:
    """A view kept in its own layout keeps its base's storage, which is the base itself where the view
    read it as laid, and a boxed copy of the whole base where the base was boxed for it (memory.py's
    ``_storage``: add_rms_norm's pair gathered whole for its normed half): ``demand.base`` names the
    base's demand and its use by the view, ``base_saved`` the base's bytes per layout of the view,
    ``base_kept`` whether a use of the base keeps it too (else the view alone keeps it, copy or not:
    UltraMemV2's query read by ``leading_features``). ``built``: the demands so far (the base's first)."""
    base = tensor_args(v)[position]
    key = key_of.get(base)
    if key is None:
        return
    uses = keys[key][1]  # the first of its class: every node of it is read alike
    mine = [j for j, (u, i) in enumerate(uses) if cls[u] == cls[v] and i == position]
    if not mine:
        return
    demand.base = (index[key], mine[0])
    demand.base_kept = any(use.keeps for use in built[index[key]].uses)
    for c in options:
        w = lid(c.out)
        demand.base_saved[w] = max(demand.base_saved.get(w, 0.0), costing.local_bytes(base, c.ins[position]))


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
        if (cluster and solution.memory_binds and solution.time > solution.untied * (1 + 1e-9) + 1e-12
                and any(g.count > 1 for g in problem.groups)):
            # A knapsack: tying identical layers to one choice would leave them all in the leaner
            # layout where some could afford the faster one. Tied in binary runs instead (clusters.runs),
            # any number of them can; every tied assignment is still one of these, so this is no worse.
            # Not where the tied answer reaches the relaxation's bound (``untied``): untied layers are
            # a weighted average of tied ones there (docs/search.md "Repeated layers"), none is faster.
            tied = {node: solution.choice[g] for node, g in cls.items()}
            tied_cands = {node: cands[g] for node, g in cls.items()}
            split = build_problem(gm, ctx, named, forced, split=True)
            untied = solve(split[0], _hint(split[2], split[1], tied, tied_cands), proven_only=True)
            if untied.gap == 0 and untied.time <= solution.time:
                (problem, cands, cls, _), solution = split, untied
            else:  # not proven in time: the tied answer, not an incumbent that depends on the machine's
                # load (the same question gets the same plan), with what untying may still gain as its gap
                solution = dataclasses.replace(solution, gap=max(solution.gap, solution.time - solution.untied))
    except Infeasible:  # nothing fits: plan the leanest anyway, which build_plan marks "fits": false
        fits = False
        solution = leanest(problem)
    return Search(problem, solution.choice, cands, cls, solution.time, solution.memory, time.perf_counter() - start,
                  count_blocks(gm, cls), fits, solution.gap)


def _hint(cls: dict[fx.Node, int], cands: list[list[Cand]], tied: dict[fx.Node, int],
          tied_cands: dict[fx.Node, list[Cand]]) -> list[int] | None:
    """The tied answer as an assignment of the untied program (its branch and cut's start: no worse
    than the tied optimum from the first node on), where each group's candidates are its tied class's."""
    hint: dict[int, int] = {}
    for node, g in cls.items():
        k = tied[node]
        if (g in hint and hint[g] != k) or [c.axes for c in cands[g]] != [c.axes for c in tied_cands[node]]:
            return None
        hint[g] = k
    return [hint[g] for g in range(len(cands))] if len(hint) == len(cands) else None


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


def record_search(gm: fx.GraphModule, ctx: PlanContext) -> PassReport:
    """After build_plan: the plan says it was chosen by the search, with the modelled optimum."""
    start = time.perf_counter()
    found: Search | None = gm.meta.get(KEY)
    plan = gm.meta.get("ultraplan.plan")
    if found is None or plan is None:
        return PassReport("record_search", time.perf_counter() - start)
    objective = Cost("the search's optimum: modelled step seconds (passes/search_ilp.py)", found.objective)
    gap = Cost("how far below search_objective the optimum may lie: 0 when proven optimal, else what HiGHS's "
               "branch and cut left at its time limit (search_bnb.MIP_SECONDS), or what untying identical "
               "layers may still gain where that was not proven in time", found.gap)
    gm.meta["ultraplan.plan"] = dataclasses.replace(
        plan, totals=(*plan.totals, ("search_objective", objective), ("search_gap", gap)))
    return PassReport("record_search", time.perf_counter() - start,
                      [f"chosen by the search: objective {found.objective:.6g} s, plan step_time "
                       f"{plan.total('step_time').value:.6g} s"
                       + (f", not proven optimal: the optimum may be up to {found.gap:.3g} s lower (branch and cut "
                          "stopped at its time limit)" if found.gap > 0 else "")])
