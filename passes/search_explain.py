"""Why the search chose what it chose: a reason per decided node and the report's decisions.

For each group (a node, or a class of identical nodes), every other candidate is tried with every
other choice fixed (only the terms it touches are re-evaluated, ``search_ilp.evaluate``): the
reason names the choice, its own time per step, the next best candidate that fits and what it
would cost, and the cheaper candidates that would not fit the device memory. The report adds what
was solved, and whether parameters stored whole would fit at all; per class of layers, how its
parameters are held on each axis (a dp-, fsdp-, tp- or sp-like reading of the choice).
"""

from __future__ import annotations

from torch import fx

from ..compiler.node_info import info
from .clusters import block_of
from .context import PlanContext
from .sbp import Broadcast, Split, nd_str
from .search import Search
from .search_costs import Cand
from .search_ilp import Buckets, Demand, Problem, bucket_count, evaluate


def _replicated_memory(problem: Problem, cands: list[list[Cand]]) -> float:
    """Bytes per device of every parameter stored whole (its first candidate, (B, B) on every axis)."""
    return sum(g.count * g.memory[0] for g, options in zip(problem.groups, cands) if isinstance(options[0].axes[0], tuple))


def touching(problem: Problem) -> dict[int, list[Demand]]:
    """Per group, the demands whose terms its choice changes (it produces or reads the value)."""
    out: dict[int, list[Demand]] = {}
    for d in problem.demands:
        for g in {d.producer, *(u.group for u in d.uses)}:
            out.setdefault(g, []).append(d)
    return out


def bucket_keys(problem: Problem) -> dict[int, list[Buckets]]:
    """Per group, the bucket keys and gather groups its candidates may join."""
    out: dict[int, list[Buckets]] = {}
    for b in problem.buckets:
        for g in dict.fromkeys(member[0] for member in b.members):
            out.setdefault(g, []).append(b)
    return out


def local_change(problem: Problem, choice: list[int], g: int, k: int, demands: list[Demand],
                 keys: list[Buckets] | None = None) -> tuple[float, float, bool]:
    """(seconds, bytes, valid) the step changes by when group ``g`` takes candidate ``k`` and every
    other group keeps ``choice``: the terms ``g`` touches, evaluated before and after (``keys``: the
    bucket keys ``g`` may join, ``bucket_keys``; found here when not given)."""
    group = problem.groups[g]
    trial = [*choice[:g], k, *choice[g + 1:]]
    t0, m0, _ = evaluate(problem, choice, demands)
    t1, m1, ok = evaluate(problem, trial, demands)
    dt = t1 - t0 + group.count * (group.time[k] - group.time[choice[g]])
    dm = m1 - m0 + group.count * (group.memory[k] - group.memory[choice[g]])
    for b in keys if keys is not None else bucket_keys(problem).get(g, []):
        dt += b.latency * (bucket_count(b, trial, problem.groups) - bucket_count(b, choice, problem.groups))
    return dt, dm, ok


def describe(c: Cand) -> str:
    """A candidate in words: an op's input and output layouts, a parameter as stored and used."""
    if not c.ins and c.axes and isinstance(c.axes[0], tuple):
        rest, used = nd_str(tuple(a[0] for a in c.axes)), nd_str(tuple(a[1] for a in c.axes))
        return f"stored [{rest}]" + ("" if rest == used else f", gathered to [{used}] for use")
    if not c.ins:
        return f"[{nd_str(c.out)}]"
    return ", ".join(f"[{nd_str(s)}]" for s in c.ins) + f" -> [{nd_str(c.raw)}]"


def reasons(found: Search) -> dict[int, str]:
    """Per group: why its choice won (local change of the objective with every other choice fixed)."""
    problem, choice = found.problem, list(found.choice)
    near, keys = touching(problem), bucket_keys(problem)
    out = {}
    for g, group in enumerate(problem.groups):
        options = found.cands[g]
        if len(options) < 2:
            continue
        alts = []
        for k in range(len(options)):
            if k != choice[g]:
                alts.append((*local_change(problem, choice, g, k, near.get(g, []), keys.get(g, [])), k))
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
