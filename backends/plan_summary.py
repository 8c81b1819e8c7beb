"""A plan's numbers per layer and op group, read from the plan alone (``explain``, ``viz``, ``diff``).

Each row is one (layer, op kind) pair of the plan's nodes: its FLOPs (forward and, in training,
backward), per device (over the devices its work is split across) and as time (its share of the
plan's ``compute_time``, which build_plan sums from the same terms); its memory traffic per device
(bytes read and written); its collectives per kind (calls, bytes handed over per device, seconds:
the forward steps, their backward duals and the collectives inside variant calls, listed by node
in ``Plan.collectives``; a parameter's gradient sync from its own ``grad_sync``: its bytes, and
its bucket's time in proportion to them, so the rows add up to the plan's ``comm_time``); and the
bytes per device of its parameters' state (the stored shard, and in training its gradient and
two AdamW moments: ``ParamPlan.bytes_per_device`` times 4) and of the gathered copies a fsdp
boxing keeps for the backward. Boxing nodes form their own group, ``boxing``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..passes.memory import SAVES
from ..passes.plan import FLOAT_BYTES, CollectivePlan, NodePlan, Plan
from .text import layer_group

INT_BYTES = {"int64": 8, "int32": 4, "bool": 1}


@dataclass
class Comm:
    calls: int = 0
    payload_bytes: float = 0.0
    seconds: float = 0.0

    def add(self, c: CollectivePlan) -> None:
        self.calls += 1
        self.payload_bytes += c.payload_bytes.value
        self.seconds += c.time.value


@dataclass
class Row:
    layer: str
    group: str  # an op kind, "param" or "boxing"
    nodes: list[str] = field(default_factory=list)
    flops: float = 0.0  # forward + backward (training), whole model
    flops_per_device: float = 0.0
    compute_s: float = 0.0
    traffic_bytes: float = 0.0  # read + written, per device
    comm: dict[str, Comm] = field(default_factory=dict)  # collective kind -> what it runs per step
    memory_bytes: float = 0.0  # per device: parameter state and kept gathered copies

    @property
    def comm_bytes(self) -> float:
        return sum(c.payload_bytes for c in self.comm.values())

    @property
    def comm_s(self) -> float:
        return sum(c.seconds for c in self.comm.values())


def split_factor(splits: tuple[str, ...], mesh: tuple[int, ...]) -> int:
    """The devices an op's work is divided over: the axes whose signature splits a dim or runs a variant."""
    return math.prod(n for n, s in zip(mesh, splits) if s)


def element_bytes(dtype: str) -> int:
    return FLOAT_BYTES.get(dtype) or INT_BYTES.get(dtype, 4)


def node_rows(plan: Plan) -> dict[str, Row]:
    """One row per node of ``plan`` (its own FLOPs, time, traffic, collectives and memory), and one per
    phase of the collectives no node holds (the loss's logging all-reduce), keyed by name."""
    train = plan.mode == "train"
    rows: dict[str, Row] = {}
    kept = kept_gathers(plan)
    work = []
    for n in plan.nodes:
        row = rows[n.name] = Row(layer_group(n.layer), n.op, [n.name])
        flops = n.flops.value + (n.backward_flops.value if train else 0.0)
        split = split_factor(n.splits, plan.mesh)
        row.flops, row.flops_per_device = flops, flops / split
        row.traffic_bytes = (n.bytes_read.value + n.bytes_written.value) / split
        work.append((row, flops / split))
        if n.name in kept:
            row.memory_bytes += _local_bytes(n)
    total_work = sum(w for _, w in work)
    compute = plan.total("compute_time").value
    for row, w in work:
        row.compute_s = compute * w / total_work if total_work else 0.0
    for c in plan.collectives:
        if c.phase == "gradient_sync":  # counted per parameter below
            continue
        row = rows.get(c.node) or rows.setdefault(c.phase, Row("", c.phase.replace("_", " ")))
        row.comm.setdefault(c.collective, Comm()).add(c)
    for p in plan.params:
        row = rows[p.node]
        row.memory_bytes += p.bytes_per_device.value * (4 if train else 1)
        bucket = {s.axis: s for s in plan.grad_buckets[p.bucket].steps} if p.bucket >= 0 else {}
        for c in p.grad_sync:  # its share of its bucket's collective: bytes, and time in proportion to them
            comm = row.comm.setdefault(c.collective, Comm())
            whole = bucket.get(c.axis)
            comm.calls += 1
            comm.payload_bytes += c.payload_bytes.value
            comm.seconds += (whole.time.value * c.payload_bytes.value / whole.payload_bytes.value
                             if whole is not None and whole.payload_bytes.value else c.time.value)
    return rows


def summarise(plan: Plan) -> list[Row]:
    """The nodes' rows summed per (layer, op group), in graph order of their first node."""
    out: dict[tuple[str, str], Row] = {}
    for r in node_rows(plan).values():
        row = out.setdefault((r.layer, r.group), Row(r.layer, r.group))
        row.nodes += r.nodes
        row.flops += r.flops
        row.flops_per_device += r.flops_per_device
        row.compute_s += r.compute_s
        row.traffic_bytes += r.traffic_bytes
        row.memory_bytes += r.memory_bytes
        for kind, c in r.comm.items():
            mine = row.comm.setdefault(kind, Comm())
            mine.calls, mine.payload_bytes, mine.seconds = (mine.calls + c.calls, mine.payload_bytes + c.payload_bytes,
                                                            mine.seconds + c.seconds)
    return list(out.values())


def _local_bytes(n: NodePlan) -> float:
    return math.prod(int(d) for d in n.local_shape) * element_bytes(n.dtype)


def kept_gathers(plan: Plan) -> set[str]:
    """The fsdp gathers (boxing nodes of a parameter) a consumer saves for its backward
    (passes/memory.py's rule: the plan's ``memory_gathered_parameters``)."""
    if plan.mode != "train":
        return set()
    kinds = {n.name: n.op for n in plan.nodes}
    gathers = {n.name for n in plan.nodes if n.op == "boxing" and n.args and kinds.get(n.args[0]) == "param"}
    return {a for n in plan.nodes if n.op in SAVES for i, a in enumerate(n.args)
            if a in gathers and i in SAVES[n.op].inputs}


def gathered_bytes(plan: Plan) -> float:
    """Bytes per device of the gathered parameter copies the rows count."""
    return sum(_local_bytes(plan.node(name)) for name in kept_gathers(plan))


def fmt_bytes(value: float) -> str:
    """Bytes in binary units: ``16.0 KiB``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def fmt_seconds(value: float) -> str:
    for unit, size in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value * 1e9:.3g} ns" if value else "0"


def headline(plan: Plan) -> str:
    """One line: the plan, its step time and memory per device."""
    mesh = "x".join(map(str, plan.mesh))
    t = dict(plan.totals)
    return (f"{plan.spec_name}: {plan.strategy} on mesh {mesh} ({plan.hardware}), {plan.mode}, B={plan.batch}, "
            f"T={plan.seq}: step {fmt_seconds(t['step_time'].value)} (compute {fmt_seconds(t['compute_time'].value)}, "
            f"comm {fmt_seconds(t['comm_time'].value)}), memory {fmt_bytes(t['memory_per_device'].value)} per device "
            f"of {fmt_bytes(plan.device_memory)}" + ("" if plan.fits else " (does not fit)"))
