"""``ultraplan explain SPEC --crossover 'NODE=SBP_A/SBP_B'``: the batch at which one decision flips.

The two candidates are two plans, each with the node pinned to one SBP (``--force``, beside the
strategy and pins given), so that they differ in that decision and what it brings (boxings,
gradient synchronisation). passes/crossover.py solves their ``step_time`` expressions for the
crossover, symbolically in the hardware's symbols and numerically at the plan's hardware.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from ultraplan import api
from ultraplan.passes.context import Mesh
from ultraplan.passes.crossover import Crossover, crossover, parse_cost
from ultraplan.passes.pipeline import make_context
from ultraplan.passes.plan import Plan
from ultraplan.passes.symbols import B, T

VARIABLES = {"batch": B, "seq": T}


def parse_decision(text: str) -> tuple[str, str, str]:
    """``"layers_*_ffn_w_up=S(0)/B"`` -> (glob, "S(0)", "B"); ValueError naming the form otherwise."""
    node, sep, sbps = str(text).partition("=")
    a, slash, b = sbps.partition("/")
    if not sep or not slash or not node.strip() or not a.strip() or not b.strip():
        raise ValueError(f"--crossover takes NODE=SBP_A/SBP_B (a glob over node names, two SBPs, one per mesh axis "
                         f"each, e.g. 'layers_*_ffn_w_up=S(0)/B'), got {text!r}")
    return node.strip(), a.strip(), b.strip()


@dataclass
class Decision:
    node: str
    sbps: tuple[str, str]
    plans: tuple[Plan, Plan]
    result: Crossover


def decide(spec: str, mesh: str, text: str, over: str = "batch", **plan_args) -> Decision:
    """Plan both candidates and solve where their modelled step times cross (in ``over``)."""
    node, a, b = parse_decision(text)
    if over not in VARIABLES:
        raise ValueError(f"--over takes {' or '.join(VARIABLES)}, got {over!r}")
    forces = list(plan_args.pop("force", None) or [])
    plans = tuple(api.plan(spec, mesh, force=[*forces, f"{node}={sbp}"], **plan_args) for sbp in (a, b))
    first = plans[0]
    ctx = make_context(api.load(spec), api.load_hardware(plan_args.get("hardware")), Mesh.parse(mesh),
                       batch=first.batch, seq=first.seq, mode=first.mode)
    values = ctx.values()
    exprs = [parse_cost(p.total("step_time").expr, list(values)) for p in plans]
    return Decision(node, (a, b), plans, crossover(exprs[0], exprs[1], values, VARIABLES[over]))


def render(d: Decision) -> str:
    """What each candidate costs, where they cross, and which is cheaper on each side."""
    plan = d.plans[0]
    var = d.result.var
    label = {"a": f"[{d.sbps[0]}]", "b": f"[{d.sbps[1]}]"}
    lines = [f"crossover of {d.node}: [{d.sbps[0]}] against [{d.sbps[1]}] ({plan.spec_name}, mesh "
             f"{Mesh(plan.mesh)}, {plan.strategy or 'dp'}, {plan.hardware}; B={plan.batch}, T={plan.seq})"]
    for sbp, p in zip(d.sbps, d.plans):
        lines.append(f"  [{sbp}] step_time = {p.total('step_time').expr}   ({p.total('step_time').value:.6g} s here)")
    lines.append(f"  difference [{d.sbps[0]}] - [{d.sbps[1]}] = {sympy.simplify(d.result.difference)}")
    if d.result.symbolic:
        lines.append(f"  solved for {var}: " + "; ".join(f"{var} = {root}" for root in d.result.symbolic))
    else:
        lines.append(f"  solved for {var}: no closed form (sympy); the points below are numeric")
    if not d.result.points:
        winner = label.get(d.result.cheaper_below, "neither")
        lines.append(f"  no crossover at positive {var}: {winner} is cheaper at every {var}"
                     if d.result.cheaper_below else f"  the two cost the same at every {var}")
        return "\n".join(lines)
    low = d.result.cheaper_below
    for point in d.result.points:
        other = "b" if low == "a" else "a"
        lines.append(f"  equal at {var} = {point:.6g}: below it {label[low]} is cheaper, above it {label[other]}")
        low = other
    return "\n".join(lines)
