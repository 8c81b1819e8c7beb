"""``ultraplan diff A.json B.json``: where two plans differ, and what each difference costs.

Three kinds of difference, each priced from the plans' own numbers (backends/plan_summary.py's
per-node rows: compute time, collectives with their bytes and seconds, memory per device):

- a node's signature (an op's input and output layouts and per-axis splits; a parameter as stored
  and as used);
- a boxing (one value boxed to one layout, the collectives choose_sbp inserted on that edge, with
  their backward duals and, for a kept fsdp gather, its memory);
- the totals: step time, its compute and communication, bytes per collective kind, memory per device.

The same difference in identical layers (``layers_3_attention_wq`` and ``layers_4_...``) is shown
once, with its count and summed cost. The difference of a plan with itself is empty.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from ..passes.plan import NodePlan, Plan
from .plan_summary import Row, fmt_bytes, fmt_seconds, headline, node_rows

LAYER = re.compile(r"(?<=layers_)\d+(?=_)")


@dataclass
class Change:
    what: str  # "signature" or "boxing"
    name: str  # a node, or "value -> [layout]" for a boxing; "layers_*_..." when folded
    op: str
    a: str  # its layout (or collectives) in A, "-" when absent
    b: str
    count: int = 1  # identical layers it stands for
    delta_seconds: float = 0.0  # B - A: its compute and collectives per step
    delta_comm_bytes: float = 0.0  # B - A: bytes handed to collectives per device and step
    delta_memory: float = 0.0  # B - A: bytes per device


def _signature(n: NodePlan, params: dict) -> str:
    if n.op == "param":
        p = params[n.name]
        return f"stored [{p.sbp}]" + ("" if p.used == p.sbp else f", used [{p.used}]")
    if not n.sbp_in:
        return f"[{n.sbp_out}]"
    splits = "" if not any(n.splits) else f" (split {', '.join(s or '-' for s in n.splits)})"
    return ", ".join(f"[{s}]" for s in n.sbp_in) + f" -> [{n.sbp_out}]" + splits


def _collectives(n: NodePlan, row: Row | None) -> str:
    """Its forward steps, and what the step runs for it (with the backward duals; a layer's fsdp
    gathers run as one group collective, which its first boxing node holds)."""
    steps = [c for _, cs in n.boxing for c in cs]
    text = "; ".join(f"{c.collective} axis {c.axis} {fmt_bytes(c.payload_bytes.value)}" for c in steps) or "local"
    if row is not None and row.comm:
        runs = ", ".join(f"{k} x{c.calls} {fmt_bytes(c.payload_bytes)}" for k, c in sorted(row.comm.items()))
        text += f" (runs {runs})"
    return text


def _boxings(plan: Plan) -> dict[str, tuple[NodePlan, str]]:
    """Boxing nodes keyed by what they do (value -> layout), with the consumers they serve."""
    readers: dict[str, list[str]] = {}
    for n in plan.nodes:
        for a in n.args:
            readers.setdefault(a, []).append(n.name)
    return {f"{n.args[0]} -> [{n.sbp_out}]": (n, ", ".join(readers.get(n.name, [])) or "the loss")
            for n in plan.nodes if n.op == "boxing"}


def _delta(change: Change, ra: Row | None, rb: Row | None) -> Change:
    def get(r: Row | None, field: str) -> float:
        return 0.0 if r is None else getattr(r, field)

    change.delta_seconds = get(rb, "compute_s") + get(rb, "comm_s") - get(ra, "compute_s") - get(ra, "comm_s")
    change.delta_comm_bytes = get(rb, "comm_bytes") - get(ra, "comm_bytes")
    change.delta_memory = get(rb, "memory_bytes") - get(ra, "memory_bytes")
    return change


def _fold(changes: list[Change]) -> list[Change]:
    out: dict[tuple, Change] = {}
    for c in changes:
        key = (c.what, LAYER.sub("*", c.name), c.op, LAYER.sub("*", c.a), LAYER.sub("*", c.b))
        if key not in out:
            out[key] = Change(c.what, key[1], c.op, key[3], key[4], 0)
        f = out[key]
        f.count += 1
        f.delta_seconds += c.delta_seconds
        f.delta_comm_bytes += c.delta_comm_bytes
        f.delta_memory += c.delta_memory
    return list(out.values())


def diff(a: Plan, b: Plan) -> dict:
    """The differences of ``b`` from ``a``: ``nodes`` and ``boxings`` (lists of Change as dicts) and
    ``totals`` (key -> [A, B, B - A]); both lists are empty when the plans decide the same."""
    rows_a, rows_b = node_rows(a), node_rows(b)
    nodes_a, nodes_b = {n.name: n for n in a.nodes if n.op != "boxing"}, {n.name: n for n in b.nodes if n.op != "boxing"}
    params_a, params_b = {p.node: p for p in a.params}, {p.node: p for p in b.params}
    changes = []
    for name in [*nodes_a, *(n for n in nodes_b if n not in nodes_a)]:
        na, nb = nodes_a.get(name), nodes_b.get(name)
        sa = _signature(na, params_a) if na else "-"
        sb = _signature(nb, params_b) if nb else "-"
        if sa != sb:
            changes.append(_delta(Change("signature", name, (na or nb).op, sa, sb), rows_a.get(name), rows_b.get(name)))
    box_a, box_b = _boxings(a), _boxings(b)
    for key in [*box_a, *(k for k in box_b if k not in box_a)]:
        (na, fa), (nb, fb) = box_a.get(key, (None, "")), box_b.get(key, (None, ""))
        ra, rb = rows_a.get(na.name) if na else None, rows_b.get(nb.name) if nb else None
        ca, cb = _collectives(na, ra) if na else "-", _collectives(nb, rb) if nb else "-"
        if ca != cb or (ra and rb and ra.memory_bytes != rb.memory_bytes):
            changes.append(_delta(Change("boxing", f"{key} for {fb or fa}", "boxing", ca, cb), ra, rb))
    totals = {}
    ta, tb = dict(a.totals), dict(b.totals)
    for key in [k for k in ta if k in tb and k not in ("flops_per_token",)]:
        totals[key] = [ta[key].value, tb[key].value, tb[key].value - ta[key].value]
    pa, pb = a.step_collectives()[0], b.step_collectives()[0]
    for kind in sorted({*pa, *pb}):
        totals[f"{kind}_bytes"] = [pa.get(kind, 0.0), pb.get(kind, 0.0), pb.get(kind, 0.0) - pa.get(kind, 0.0)]
    folded = _fold(changes)
    return {"a": headline(a), "b": headline(b), "totals": totals,
            "nodes": [asdict(c) for c in folded if c.what == "signature"],
            "boxings": [asdict(c) for c in folded if c.what == "boxing"]}


def _amount(key: str, value: float) -> str:
    if key.endswith(("_time", "_objective", "_bound")):
        return fmt_seconds(value)
    if key.endswith("_flops"):
        return f"{value:.4g}"
    return fmt_bytes(value)


def _signed(key: str, value: float) -> str:
    return ("+" if value >= 0 else "-") + _amount(key, abs(value))


def render(d: dict) -> str:
    """The difference for a terminal: totals, then each node and boxing that differs, dearest first."""
    out = [f"A: {d['a']}", f"B: {d['b']}", ""]
    if not d["nodes"] and not d["boxings"] and not any(v[2] for v in d["totals"].values()):
        return "\n".join([*out, "no differences"]) + "\n"
    out.append(f"{'total':28s} {'A':>12s} {'B':>12s} {'B - A':>13s}")
    for key, (va, vb, dv) in d["totals"].items():
        out.append(f"{key:28s} {_amount(key, va):>12s} {_amount(key, vb):>12s} {_signed(key, dv):>13s}")
    for title, items in (("nodes whose signature differs", d["nodes"]), ("boxings that differ", d["boxings"])):
        out += ["", f"{title}: {sum(c['count'] for c in items)} ({len(items)} shown; B - A per step: time, "
                    "collective bytes per device, memory per device)"]
        for c in sorted(items, key=lambda c: -abs(c["delta_seconds"])):
            times = f" x{c['count']}" if c["count"] > 1 else ""
            out.append(f"  {c['name']}{times} ({c['op']}): {_signed('_time', c['delta_seconds'])}, "
                       f"{_signed('b', c['delta_comm_bytes'])} comm, {_signed('b', c['delta_memory'])} memory")
            out.append(f"      A {c['a']}")
            out.append(f"      B {c['b']}")
    return "\n".join(out) + "\n"


def to_json(d: dict) -> str:
    return json.dumps(d, indent=1) + "\n"
