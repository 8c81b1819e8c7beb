"""build_plan: read the records of every node into a ``Plan`` (stored as gm.meta["ultraplan.plan"]).

It chooses nothing: signatures, boxing nodes and parameter placements come from choose_sbp, shard
calls from localize. What it adds follows from them: each forward collective's dual in the
backward (the gradient of a ``B`` value is ``P``, of ``P`` is ``B``, of ``S(d)`` is ``S(d)``:
all_gather <-> reduce_scatter, all_reduce <-> all_reduce, all_to_all <-> its inverse), and one
list of every collective a training step runs, in order: forward boxings and collectives inside
variant calls (a layer's fsdp gathers as one per group: passes/gather_groups.py), their backward
duals, gradient synchronisation (one collective per gradient bucket
and mesh axis: passes/buckets.py packs the gradients), the loss's logging all-reduce. It
evaluates every sympy cost at the context's point and adds the step totals:

    compute_time   = sum over ops of (forward + backward FLOPs) / (devices its work is split
                     over: axes whose signature splits a dim or runs a variant) / peak
    comm_time      = sum over the step's collectives of messages * latency + wire bytes / bandwidth
                     (gradient sync: per bucket, so latency is paid once per bucket, not per parameter)
    step_time      = compute_time + comm_time                        (no overlap assumed)
                     (+ a calibrated spec's memory_time and overhead_time, passes/host_cost.py, and
                     sync_drift_time for one with collective_drift, passes/sync_drift.py)
    memory_*       = train: parameters, gradients, optimizer (4 + 4 + 8 bytes per stored fp32
                     element), gathered parameters, weight compute copies (mixed precision) and
                     activations autograd saves for the backward, in the dtypes passes/precision.py
                     gave them (passes/memory.py gives the rule); memory_per_device is their sum;
                     infer: 4 bytes per parameter element in use + the largest single activation
                     (a lower bound: two live activations overlap at each op)
    fits           = memory_per_device <= the hardware's device memory (HardwareSpec.memory_bytes)

In ``infer`` mode backward FLOPs are zero.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import sympy
from torch import fx

from ..compiler.lower import tensor_args
from ..compiler.node_info import info
from ..compiler.op_table import OP_TABLE
from ..compiler.schema import HardwareSpec
from ..compiler.shapes import numel
from .buckets import GradEntry, assign_buckets
from .context import PassReport, PlanContext
from .fuse import fusion_plans
from .gather_groups import gather_groups, group_plan
from .host_cost import BACKWARD_TRAFFIC, host_times, launch_time, loop_passes, optimizer_time, traffic_time, wire_factor
from .localize import internal_collectives, localize
from .memory import saved_bytes
from .plan import PLAN_VERSION, BufferPlan, CollectivePlan, Cost, GradBucketPlan, NodePlan, ParamPlan, Plan, TrainingPlan
from .precision import MASTER, precision_plan
from .sbp import Boxing, box, dual_sbp, local_dims, nd_str, parse_sbp
from .symbols import BYTES_PER_ELEMENT, PEAK, B, T, axis_bandwidth, axis_latency, axis_size, evaluate, readable
from .sync_drift import Schedule, drift_time

ZERO = sympy.Integer(0)


class Values(dict):
    """The numbers of every symbol at the plan's point, remembering each expression's Cost: a plan
    evaluates the same few shapes hundreds of times, and sympy substitution is the slow part."""

    def __init__(self, values: dict) -> None:
        super().__init__(values)
        self.memo: dict[sympy.Expr, Cost] = {}
        self.scales: dict[object, str] = {}


def cost(expr: sympy.Expr, values: dict, *, simplify: bool = False) -> Cost:
    """The expression and its value at ``values``; ``simplify`` puts a total in readable form
    (``symbols.readable``, much cheaper than ``sympy.simplify``)."""
    expr = sympy.sympify(expr)
    if simplify:
        expr = readable(expr)
    memo = getattr(values, "memo", None)
    if memo is not None and expr in memo:
        return memo[expr]
    result = Cost(str(expr), evaluate(expr, values))
    if memo is not None:
        memo[expr] = result
    return result


@functools.lru_cache(maxsize=4096)
def _text(dim: object) -> str:
    """A dim as text; cached, as printing sympy is slow and a graph has few distinct dims."""
    return str(dim)


def _scale_text(scale: object, values: dict) -> str:
    """A partial-sum scale at the plan's point, as text ("1/2"); memoised like ``cost``."""
    memo = getattr(values, "scales", None)
    if memo is None:
        return str(sympy.sympify(scale).xreplace(values))
    if scale not in memo:
        memo[scale] = str(sympy.sympify(scale).xreplace(values))
    return memo[scale]


def collective_time(b: Boxing, hardware: HardwareSpec | None = None) -> sympy.Expr:
    """Latency per message plus wire bytes over bandwidth, on the axis's link, the wire bytes weighed by
    the kind's factor where ``hardware`` lists them (host_cost.wire_factor); a group spanning several
    axes lies on one node exactly when each of its axes' groups does (every member reaches every other
    through one group per axis), so it takes the slowest of their links."""
    wire = b.wire * (wire_factor(hardware, b.collective) if hardware is not None else 1)
    if b.span:
        latency = sympy.Max(*(axis_latency(a) for a in b.span))
        return b.messages * latency + wire / sympy.Min(*(axis_bandwidth(a) for a in b.span))
    return b.messages * axis_latency(b.axis) + wire / axis_bandwidth(b.axis)


def dual_of(b: Boxing) -> Boxing | None:
    """The collective the backward runs on the gradient of a forward step ``b`` (None if local)."""
    if b.collective == "local":
        return None
    n = axis_size(b.axis)
    nbytes = b.payload * n if b.collective in ("all_gather", "all_to_all") else b.payload
    return box(dual_sbp(parse_sbp(b.dst)), dual_sbp(parse_sbp(b.src)), axis=b.axis, nbytes=nbytes, n=n)


class _Collectives:
    """Accumulates the step's collectives as plans, with their time and wire-byte totals."""

    def __init__(self, ctx: PlanContext, values: dict) -> None:
        self.ctx, self.values = ctx, values
        self.forward: list[CollectivePlan] = []
        self.backward: list[CollectivePlan] = []
        self.sync: list[CollectivePlan] = []
        self.logging: list[CollectivePlan] = []
        self.times: list[sympy.Expr] = []  # summed once at the end (sympy re-flattens a sum on every +)
        self.calls: dict[tuple[str, int], int] = {}  # the step's calls by (kind, group size): each its calibrated wait
        self.wires: list[sympy.Expr] = []
        # the step's nodes and blocking calls in order, for a spec that prices sync drift (passes/sync_drift.py)
        self.schedule = Schedule() if ctx.hardware.collective_drift else None

    def describe(self, b: Boxing, phase: str, node: str, reason: str, data_dependent: bool = False,
                 dtype: str = "float32") -> CollectivePlan:
        """The collective as a plan, not counted in the step (a parameter's gradient needs, which its
        bucket carries)."""
        devices = math.prod(self.ctx.mesh.shape[a] for a in b.span or (b.axis,))
        return CollectivePlan(b.collective, b.axis, devices, b.src, b.dst,
                              cost(b.payload, self.values), cost(b.wire, self.values),
                              cost(collective_time(b, self.ctx.hardware), self.values), reason, phase, node,
                              data_dependent, dtype)

    def add(self, b: Boxing, phase: str, node: str, reason: str, data_dependent: bool = False,
            dtype: str = "float32", blocking: bool = True) -> CollectivePlan:
        """The collective as a plan, counted in the step; ``blocking``: the program waits for it where it
        calls it, a sync point of sync_drift.py (``add_gather`` says which of a gather group's are)."""
        plan = self.describe(b, phase, node, reason, data_dependent, dtype)
        if b.collective != "local":
            {"forward": self.forward, "backward": self.backward, "gradient_sync": self.sync,
             "loss_logging": self.logging}[phase].append(plan)
            self.times.append(collective_time(b, self.ctx.hardware))
            key = (b.collective, plan.group_size)  # priced at its kind's wait on groups of this size
            self.calls[key] = self.calls.get(key, 0) + 1
            self.wires.append(b.wire)
            if self.schedule is not None and blocking and phase in ("forward", "backward"):
                self.schedule.sync(phase, plan.group_size)
        return plan

    def add_gather(self, b: Boxing, phase: str, node: str, reason: str, dtype: str = "float32") -> CollectivePlan:
        """A gather group's collective (``add``): its forward all-gather is waited for where the layer
        first uses it, its backward reduce-scatter at the step's end (sync_drift.py)."""
        return self.add(b, phase, node, reason, dtype=dtype, blocking=phase == "forward")

    @property
    def time(self) -> sympy.Expr:
        return sympy.Add(*self.times)

    @property
    def wire(self) -> sympy.Expr:
        return sympy.Add(*self.wires)

    def step(self) -> tuple[CollectivePlan, ...]:
        return tuple(self.forward + self.backward[::-1] + self.sync + self.logging)


def _split_factor(splits: tuple[str, ...]) -> sympy.Expr:
    factor = sympy.Integer(1)
    for axis, split in enumerate(splits):
        if split:
            factor *= axis_size(axis)
    return factor


def _needs_grad(gm: fx.GraphModule) -> dict[fx.Node, bool]:
    """Does the backward reach this value? It must be differentiable and feed, through ops that pass
    gradients on, the loss: a score read only by a top-k gets none, so its boxing has no dual."""
    out: dict[fx.Node, bool] = {}
    for node in reversed(gm.graph.nodes):
        rec = info(node)
        passes_on = [u for u in node.users if u.op == "output" or
                     ((info(u).op == "boxing" or OP_TABLE[info(u).op].differentiable) and out.get(u, False))]
        out[node] = rec.differentiable and bool(passes_on)
    return out


def memory_terms(gm: fx.GraphModule, sizes: list, param_bytes: sympy.Expr, largest: sympy.Expr,
                 train: bool) -> dict[str, sympy.Expr]:
    """The memory totals: each term, then their sum (passes/memory.py says what each holds)."""
    if not train:
        terms = {"memory_parameters": param_bytes, "memory_activations": largest}
    else:
        activations, gathered, copies = saved_bytes(gm, sizes, MASTER)
        terms = {"memory_parameters": param_bytes, "memory_gradients": param_bytes,
                 "memory_optimizer": 2 * param_bytes, "memory_gathered_parameters": gathered,
                 "memory_activations": activations}
        if copies != 0:  # mixed precision: the weights' compute copies a linear keeps
            terms["memory_param_copies"] = copies
    return terms | {"memory_per_device": sympy.Add(*terms.values())}


def _bucket_gradients(comms: _Collectives, params: list[ParamPlan], entries: list[GradEntry],
                      ctx: PlanContext) -> tuple[list[ParamPlan], tuple[GradBucketPlan, ...]]:
    """Pack the gradient syncs into buckets (passes/buckets.py decides); each bucket's collectives
    join the step's list, and each parameter learns its bucket."""
    buckets = assign_buckets(entries, lambda e: cost(e, comms.values).value, ctx.bucket_cap_bytes)
    index: dict[str, int] = {}
    out = []
    for i, bucket in enumerate(buckets):
        names = ", ".join(e.name for e in bucket.entries)
        why = (f"gradient bucket {i} of {len(buckets)} ({len(bucket.entries)} parameters, "
               f"{bucket.cap_bytes / 2**20:g} MiB wide), launched when its last gradient is ready: {names}")
        steps = tuple(comms.add(b, "gradient_sync", f"bucket {i}", why, dtype=bucket.dtype) for b in bucket.steps)
        out.append(GradBucketPlan(tuple(e.name for e in bucket.entries), tuple(e.node for e in bucket.entries),
                                  bucket.dtype, bucket.cap_bytes, steps))
        index.update((e.name, i) for e in bucket.entries)
    return [dataclasses.replace(p, bucket=index.get(p.name, -1)) for p in params], tuple(out)


def build_plan(gm: fx.GraphModule, ctx: PlanContext) -> PassReport:
    start = time.perf_counter()
    values = Values(ctx.values())
    sizes = [axis_size(a) for a in range(len(ctx.mesh.shape))]
    train = ctx.mode == "train"
    comms = _Collectives(ctx, values)
    nodes, params, buffers = [], [], []
    param_terms: list[sympy.Expr] = []  # sums are built once at the end: sympy re-flattens on every +
    fwd_terms: list[sympy.Expr] = []
    bwd_terms: list[sympy.Expr] = []
    compute_terms: list[sympy.Expr] = []
    largest_terms: list[sympy.Expr] = []
    traffic_terms: list[sympy.Expr] = []  # bytes each op moves on a device, and op launches (passes/host_cost.py)
    launches = passes = 0
    output, output_boxing = "", ()
    needs_grad = _needs_grad(gm)
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    grad_entries: list[GradEntry] = []
    group_of = {name: g for g in gather_groups(gm) for name in g.nodes}
    group_plans = []
    for node in gm.graph.nodes:
        rec = info(node)
        sig = rec.sbp
        if rec.op == "buffer":
            b = rec.buffer
            buffers.append(BufferPlan(b.name, node.name, b.shape, b.dtype, b.init, b.op, b.source))
        if rec.op == "param":
            p = rec.param
            why = f"stored [{nd_str(rec.at_rest)}] ({rec.reason}); its gradient arrives P on the axes it is B"
            grads = tuple(comms.describe(b, "gradient_sync", node.name, why) for b in rec.grad_boxing)
            grad_entries.append(GradEntry(p.name, node.name, tuple(rec.grad_boxing), MASTER,
                                          min((position[u] for u in node.users), default=position[node])))
            local = numel(local_dims(rec.shape, rec.at_rest, sizes, mesh=ctx.mesh.shape)) * BYTES_PER_ELEMENT[MASTER]
            param_terms.append(local)
            used = next((u for u in node.users if info(u).op == "boxing"), None)  # fsdp's gather
            used_sbp = info(used).sbp.output if used is not None else rec.at_rest
            params.append(ParamPlan(p.name, node.name, p.shape, p.init, p.std, nd_str(rec.at_rest), nd_str(used_sbp),
                                    cost(local, values), grads, p.group))
        if node.op == "output":
            output = node.args[0].name
            output_boxing = tuple(comms.add(b, "loss_logging", node.name, "the loss is P; sum it for logging")
                                  for b in rec.boxing)
            continue
        boxing: tuple = ()
        if rec.op == "boxing" and node.name in group_of:  # the group's collectives run at its first member
            boxing = ((node.args[0].name, tuple(comms.describe(b, "forward", node.name, rec.reason, dtype=rec.dtype)
                                                for b in rec.boxing)),)
            if node.name == group_of[node.name].nodes[0]:
                group_plans.append(group_plan(group_of[node.name], comms.add_gather, train and needs_grad[node]))
        elif rec.op == "boxing":
            arg = node.args[0].name
            steps = tuple(comms.add(b, "forward", node.name, rec.reason, dtype=rec.dtype) for b in rec.boxing)
            boxing = ((arg, steps),)
            if train and needs_grad[node]:
                for b in rec.boxing:
                    dual = dual_of(b)
                    if dual is not None:
                        comms.add(dual, "backward", node.name, f"the dual of {b.collective} on {arg}'s gradient",
                                  dtype=rec.dtype)
        call, local_attrs = (localize(node, ctx.mesh.shape) if node.op == "call_function" and rec.op != "boxing"
                             else ("", ()))
        if node.op == "call_function" and rec.op != "boxing":
            for phase, b, dependent, dtype in internal_collectives(node, ctx.mesh.shape, train):
                comms.add(b, phase, node.name, f"inside {call}: {b.src}", dependent, dtype)
        c = rec.cost
        if c is not None:
            split = _split_factor(rec.splits)
            fwd_terms.append(c.flops)
            if train:
                bwd_terms.append(c.backward_flops)
            compute_terms.append((c.flops + (c.backward_flops if train else ZERO)) / split)
            traffic_terms.append((c.bytes_read + c.bytes_written) / split)
            runs = 1 + (train and needs_grad[node])  # forward, and again backward
            loops = loop_passes(rec.op, [info(a).shape for a in tensor_args(node)], sig.inputs, sizes)
            launches += runs
            passes += runs * loops
            if comms.schedule is not None:  # this node's modelled seconds, forward and backward
                traffic = traffic_terms[-1]
                comms.schedule.busy(c.flops / split / PEAK + traffic_time(traffic, False) + launch_time(1, loops),
                                    (c.backward_flops / split / PEAK + traffic_time(traffic, False) * BACKWARD_TRAFFIC
                                     + (launch_time(1, loops) if runs == 2 else ZERO)) if train else ZERO)
            if not train:
                largest_terms.append(c.bytes_written / split)
        zero = Cost("0", 0.0)
        nodes.append(NodePlan(
            name=node.name, op=rec.op, layer=rec.layer,
            args=tuple(a.name for a in tensor_args(node)), attrs=tuple(rec.attrs.items()),
            shape=tuple(_text(d) for d in rec.shape),
            local_shape=tuple(_text(d) for d in local_dims(rec.shape, sig.output, ctx.mesh.shape)),
            dtype=rec.dtype,
            sbp_in=tuple(nd_str(s) for s in sig.inputs), sbp_out=nd_str(sig.output),
            partial_scale=_scale_text(sig.partial_scale, values), boxing=boxing,
            call=call, local_attrs=local_attrs, splits=tuple(rec.splits),
            flops=cost(c.flops, values) if c else zero, backward_flops=cost(c.backward_flops, values) if c else zero,
            bytes_read=cost(c.bytes_read, values) if c else zero,
            bytes_written=cost(c.bytes_written, values) if c else zero))
    params, buckets = _bucket_gradients(comms, params, grad_entries, ctx)
    param_bytes, fwd, bwd = sympy.Add(*param_terms), sympy.Add(*fwd_terms), sympy.Add(*bwd_terms)
    compute_time = sympy.Add(*compute_terms) / PEAK
    # unevaluated: sympy 1.14 "simplifies" Max(x, x/(n0*n1)) to x/(n0*n1) for positive x and integers n
    largest = sympy.Max(*dict.fromkeys(largest_terms), evaluate=False) if largest_terms else ZERO
    host = host_times(ctx.hardware, sympy.Add(*traffic_terms), launches, passes, comms.calls,
                      param_bytes / BYTES_PER_ELEMENT[MASTER], len(params), train)
    if comms.schedule is not None:  # passes/sync_drift.py
        optimizer = optimizer_time(len(params), param_bytes / BYTES_PER_ELEMENT[MASTER]) if train else None
        host["sync_drift_time"] = drift_time(comms.schedule.stretches(ctx.mesh.size, optimizer))
    totals = {
        "forward_flops": fwd, "backward_flops": bwd, "flops_per_token": fwd / (B * T),
        "compute_time": compute_time, "comm_wire_bytes": comms.wire, "comm_time": comms.time, **host,
        "step_time": sympy.Add(compute_time, comms.time, *host.values()),
    }
    totals.update(memory_terms(gm, sizes, param_bytes, largest, train))
    t = ctx.spec.train
    plan = Plan(
        version=PLAN_VERSION, spec_name=ctx.spec.name, spec_source=ctx.spec.source, spec_sha256=ctx.spec.sha256,
        spec_text=ctx.spec_text,
        model=(("vocab_size", ctx.spec.vocab_size), ("hidden_size", ctx.spec.hidden_size),
               ("seq_len", ctx.spec.seq_len), ("num_layers", ctx.spec.num_layers),
               ("tie_embeddings", ctx.spec.tie_embeddings)),
        mesh=ctx.mesh.shape, hardware=ctx.hardware.name, mode=ctx.mode, batch=ctx.batch, seq=ctx.seq,
        strategy=",".join(ctx.strategies), forces=tuple(ctx.forces),
        training=TrainingPlan(t.steps, t.lr, t.beta1, t.beta2, t.eps, t.weight_decay, t.seed, "permutation_walk",
                              t.value_lr_multiplier, t.value_lr_decay_steps),
        nodes=tuple(nodes), params=tuple(params), buffers=tuple(buffers), output=output, output_boxing=output_boxing,
        collectives=comms.step(), precision=precision_plan(ctx.spec), grad_buckets=buckets,
        gather_groups=tuple(group_plans),
        totals=tuple((k, cost(v, values, simplify=True)) for k, v in totals.items()))
    plan = dataclasses.replace(plan, fits=plan.total("memory_per_device").value <= ctx.hardware.memory_bytes,
                               device_memory=float(ctx.hardware.memory_bytes))
    plan = dataclasses.replace(plan, fusions=fusion_plans(gm, values))
    gm.meta["ultraplan.plan"] = plan
    return PassReport("build_plan", time.perf_counter() - start,
                      [f"{len(nodes)} nodes, {len(params)} parameters, {len(plan.collectives)} collectives per step"],
                      {k: totals[k] for k in ("step_time",)})
