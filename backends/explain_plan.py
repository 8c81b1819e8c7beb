"""``ultraplan explain plan.json``: a plan's costs per layer and op group, and every node's candidates.

The first part reads the plan alone (backends/plan_summary.py): per layer and op kind, FLOPs and
compute time per device, memory traffic, collectives (kind, calls, bytes, time) and the memory of
parameter state. The second lists, per node (one entry for the same node of identical layers), the
candidate signatures the sharding search prices (passes/alternatives.py), each with the change of
the modelled step time and memory were it chosen alone, and why the plan's choice won: the
search's optimum for ``auto``, the strategy's pin or choose_sbp's propagation for a named strategy.
"""

from __future__ import annotations

from ..passes.alternatives import Choices, NodeChoices
from ..passes.plan import Plan
from .plan_summary import Row, fmt_bytes, fmt_seconds, headline, summarise


def _comm_text(row: Row) -> str:
    return "; ".join(f"{kind} x{c.calls} {fmt_bytes(c.payload_bytes)} {fmt_seconds(c.seconds)}"
                     for kind, c in sorted(row.comm.items())) or "-"


def layer_table(plan: Plan) -> list[str]:
    """Per layer and op group: what its nodes cost per device per step."""
    out = [f"{'layer':28s} {'group':22s} {'nodes':>5s} {'FLOP/device':>11s} {'compute':>9s} {'traffic':>10s} "
           f"{'memory':>10s}  communication (kind xcalls bytes time)"]
    for r in summarise(plan):
        if not (r.flops or r.comm or r.memory_bytes or r.traffic_bytes):
            continue
        out.append(f"{r.layer or '(model)':28s} {r.group:22s} {len(r.nodes):5d} {r.flops_per_device:11.4g} "
                   f"{fmt_seconds(r.compute_s):>9s} {fmt_bytes(r.traffic_bytes):>10s} {fmt_bytes(r.memory_bytes):>10s}"
                   f"  {_comm_text(r)}")
    return out


def _name(g: NodeChoices) -> str:
    if len(g.nodes) <= 3:
        return ", ".join(g.nodes)
    return f"{g.nodes[0]} (and the same node of {len(g.nodes) - 1} identical layers: one choice)"


def signed(seconds: float) -> str:
    return ("+" if seconds >= 0 else "-") + fmt_seconds(abs(seconds))


def why(g: NodeChoices, choices: Choices) -> str:
    """Why the plan's choice of ``g`` won, from its candidates' prices."""
    if not g.located:
        return "its layout is not among the search's candidates (not priced)"
    others = [a for a in g.alternatives if not a.chosen]
    if not others:
        return "the only candidate" + ("" if g.why in ("auto", "propagated") else f" (pinned by {g.why})")
    cheaper = [a for a in others if a.delta_time < -1e-12]
    fitting = [a for a in cheaper if a.valid and a.fits]
    tight = [a for a in cheaper if a.valid and not a.fits]
    alone = [a for a in cheaper if not a.valid]
    best = min((a for a in others if a.valid and a.fits), key=lambda a: a.delta_time, default=None)
    if g.why == "auto":
        text = "the search's optimum"
    elif g.why == "propagated":
        text = "choose_sbp's propagation: the cheapest signature given its inputs' layouts"
    else:
        text = f"pinned by {g.why}"
    if best is not None and abs(best.delta_time) <= 1e-12:
        text += f"; {best.signature} costs the same (a tie)"
    elif best is not None and best.delta_time > 0:
        text += f"; the next best, {best.signature}, costs {fmt_seconds(best.delta_time)} more per step"
    if fitting:
        a = min(fitting, key=lambda a: a.delta_time)
        text += f"; {a.signature} would save {fmt_seconds(-a.delta_time)} per step"
    if tight:
        a = min(tight, key=lambda a: a.delta_time)
        text += (f"; {a.signature} would save {fmt_seconds(-a.delta_time)} but need "
                 f"{fmt_bytes(choices.memory + a.delta_memory)} per device > {fmt_bytes(choices.capacity)}")
    if alone:
        text += f"; {len(alone)} cheaper one(s) only with their neighbours' layouts changed too"
    return text


def candidates(plan: Plan, choices: Choices, top: int | None = 4) -> list[str]:
    """Per group: the chosen candidate and up to ``top`` others (all when None), with why it won."""
    axes = ", ".join(map(str, choices.free_axes))
    step = plan.total("step_time").value
    out = [f"candidates per node, priced by the search's model on mesh axes {axes} (its objective at this plan: "
           f"step {fmt_seconds(choices.objective)}, {fmt_bytes(choices.memory)} per device; the plan's step_time "
           f"{fmt_seconds(step)}"
           + (": they differ, so this plan's model is not this ultraplan's" if abs(choices.objective - step) > 1e-9 * step
              else "")
           + "); each alternative: own seconds, then the change of the step and of memory per device were it chosen "
           "with every other choice kept"]
    gap = dict(plan.totals).get("search_gap")
    if gap is not None and gap.value > 0:
        out.append(f"the search stopped before proving its optimum (branch and cut's time limit): the optimum may be up "
                   f"to {fmt_seconds(gap.value)} faster than this plan")
    for g in choices.groups:
        chosen = next((a for a in g.alternatives if a.chosen), None)
        head = f"{_name(g)} ({g.op}, {g.why})"
        if chosen is None:
            out.append(f"{head}: {why(g, choices)}")
            continue
        out.append(f"{head}: {chosen.signature}, own {fmt_seconds(chosen.own_time)}")
        shown = [a for a in g.alternatives if not a.chosen]
        for a in shown if top is None else shown[:top]:
            state = "" if a.valid and a.fits else ("  (invalid alone)" if not a.valid else "  (does not fit)")
            out.append(f"    {a.signature:52s} own {fmt_seconds(a.own_time):>9s}  step {signed(a.delta_time):>9s}  "
                       f"memory {'+' if a.delta_memory >= 0 else '-'}{fmt_bytes(abs(a.delta_memory))}{state}")
        if top is not None and len(shown) > top:
            out.append(f"    ... {len(shown) - top} more (--all)")
        out.append(f"  why: {why(g, choices)}")
    return out


def explain_plan(plan: Plan, choices: Choices | None, top: int | None = 4) -> str:
    t = dict(plan.totals)
    memory = ", ".join(f"{k.removeprefix('memory_')} {fmt_bytes(v.value)}" for k, v in t.items()
                       if k.startswith("memory_") and k != "memory_per_device")
    out = [headline(plan), f"memory per device: {memory}", "",
           "per layer and op group, per device and step (memory: parameters with their gradients and AdamW "
           "moments, and kept fsdp gathers; activations are in the line above)", *layer_table(plan)]
    if choices is not None:
        out += ["", *candidates(plan, choices, top)]
    return "\n".join(out) + "\n"
