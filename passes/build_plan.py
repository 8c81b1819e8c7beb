"""build_plan: read the annotations of every node into a ``Plan`` (stored as gm.meta["ultraplan.plan"]).

It chooses nothing: signatures and boxings come from choose_sbp; what it adds follows from them
(a forward all-reduce's backward dual is an all-reduce of the gradient) or is the only option so
far (the data-parallel strategy, the permutation-walk task). It evaluates every sympy cost at
the context's point and adds the step totals:

    compute_time   = (forward + backward FLOPs) / (devices * peak)   (batch split over devices)
    comm_time      = sum over collectives of messages * latency + wire bytes / bandwidth
    step_time      = compute_time + comm_time                        (no overlap assumed)
    memory         = train: 16 bytes per local parameter element (fp32 weight, gradient, two
                     AdamW moments) + forward activations kept for backward (bytes written / devices);
                     infer: 4 bytes per local parameter element + the largest single activation
                     (a lower bound: two live activations overlap at each op)

In ``infer`` mode backward FLOPs are zero.
"""

from __future__ import annotations

import time

import sympy
from torch import fx

from ..compiler.lower import tensor_args
from ..compiler.shapes import numel
from .context import PassReport, PlanContext
from .plan import PLAN_VERSION, BufferPlan, CollectivePlan, Cost, NodePlan, ParamPlan, Plan, TrainingPlan
from .sbp import Boxing, local_dims, nd_str
from .symbols import BYTES_PER_ELEMENT, PEAK, B, T, axis_bandwidth, axis_latency, axis_size, device_count, evaluate


def cost(expr: sympy.Expr, values: dict, *, simplify: bool = False) -> Cost:
    expr = sympy.sympify(expr)
    if simplify:
        expr = sympy.simplify(expr)
    return Cost(str(expr), evaluate(expr, values))


def collective_time(b: Boxing) -> sympy.Expr:
    return b.messages * axis_latency(b.axis) + b.wire / axis_bandwidth(b.axis)


def collective_plan(b: Boxing, ctx: PlanContext, values: dict, reason: str, backward: str = "") -> CollectivePlan:
    return CollectivePlan(b.collective, b.axis, ctx.mesh.shape[b.axis], b.src, b.dst, cost(b.payload, values),
                          cost(b.wire, values), cost(collective_time(b), values), reason, backward)


def backward_dual(b: Boxing, differentiable: bool, train: bool) -> str:
    """The backward of a forward all-reduce (P -> B) is an all-reduce of the gradient; local
    boxings have local duals; nothing runs backward through a value without gradient."""
    return "all_reduce" if train and differentiable and b.collective == "all_reduce" else ""


def build_plan(gm: fx.GraphModule, ctx: PlanContext) -> PassReport:
    start = time.perf_counter()
    values = ctx.values()
    devices = device_count(len(ctx.mesh.shape))
    sizes = [axis_size(a) for a in range(len(ctx.mesh.shape))]
    nodes, params, buffers = [], [], []
    param_bytes = sympy.Integer(0)
    fwd = bwd = written = comm_time = comm_wire = sympy.Integer(0)
    largest: sympy.Expr = sympy.Integer(0)
    train = ctx.mode == "train"
    for node in gm.graph.nodes:
        meta = node.meta
        sig = meta["ultraplan.sbp"]
        if meta["ultraplan.op"] == "buffer":
            b = meta["ultraplan.buffer"]
            buffers.append(BufferPlan(b.name, node.name, b.shape, b.dtype, b.init, b.op, b.source))
        if meta["ultraplan.op"] == "param":
            info = meta["ultraplan.param"]
            grads = tuple(collective_plan(b, ctx, values, "the weight is B and the batch S(0), so its gradient arrives as P")
                          for b in meta["ultraplan.grad_boxing"])
            comm_time += sum((collective_time(b) for b in meta["ultraplan.grad_boxing"]), sympy.Integer(0))
            comm_wire += sum((b.wire for b in meta["ultraplan.grad_boxing"]), sympy.Integer(0))
            local = numel(local_dims(meta["ultraplan.shape"], sig.output, sizes)) * BYTES_PER_ELEMENT["float32"]
            param_bytes += local
            params.append(ParamPlan(info.name, node.name, info.shape, info.init, info.std, nd_str(sig.output),
                                    cost(local, values), grads, info.group))
        if node.op == "output":
            out_steps = [b for steps in meta["ultraplan.boxing"].values() for b in steps]
            output_boxing = tuple(collective_plan(b, ctx, values, "the loss is P; sum it for logging")
                                  for b in out_steps)
            comm_time += sum((collective_time(b) for b in out_steps), sympy.Integer(0))  # it runs every step
            comm_wire += sum((b.wire for b in out_steps), sympy.Integer(0))
            output = node.args[0].name
            continue
        c = meta.get("ultraplan.cost")
        if c is not None:
            fwd, written = fwd + c.flops, written + c.bytes_written
            bwd = bwd + c.backward_flops if train else bwd
            largest = sympy.Max(largest, c.bytes_written)
        zero = Cost("0", 0.0)
        arg_nodes = {a.name: a for a in tensor_args(node)} if node.op == "call_function" else {}
        boxing = []
        for arg, steps in meta.get("ultraplan.boxing", {}).items():
            dual = [backward_dual(b, arg_nodes[arg].meta["ultraplan.differentiable"], train) for b in steps]
            boxing.append((arg, tuple(collective_plan(b, ctx, values, f"{node.name} needs {arg} as {b.dst}", d)
                                      for b, d in zip(steps, dual))))
            for b, d in zip(steps, dual):
                comm_time += collective_time(b) * (2 if d else 1)
                comm_wire += b.wire * (2 if d else 1)
        boxing = tuple(boxing)
        nodes.append(NodePlan(
            name=node.name, op=meta["ultraplan.op"], layer=meta["ultraplan.layer"],
            args=tuple(a.name for a in tensor_args(node)), attrs=tuple(meta["ultraplan.attrs"].items()),
            shape=tuple(str(d) for d in meta["ultraplan.shape"]),
            local_shape=tuple(str(d) for d in local_dims(meta["ultraplan.shape"], sig.output, ctx.mesh.shape)),
            dtype=meta["ultraplan.dtype"],
            sbp_in=tuple(nd_str(s) for s in sig.inputs), sbp_out=nd_str(sig.output),
            partial_scale=str(sympy.sympify(sig.partial_scale).subs(values)), boxing=boxing,
            flops=cost(c.flops, values) if c else zero, backward_flops=cost(c.backward_flops, values) if c else zero,
            bytes_read=cost(c.bytes_read, values) if c else zero,
            bytes_written=cost(c.bytes_written, values) if c else zero))
    compute_time = (fwd + bwd) / (devices * PEAK)
    totals = {
        "forward_flops": fwd, "backward_flops": bwd, "flops_per_token": fwd / (B * T),
        "compute_time": compute_time, "comm_wire_bytes": comm_wire, "comm_time": comm_time,
        "step_time": compute_time + comm_time,
        "memory_per_device": (4 * param_bytes + written / devices) if train else (param_bytes + largest / devices),
    }
    t = ctx.spec.train
    plan = Plan(
        version=PLAN_VERSION, spec_name=ctx.spec.name, spec_source=ctx.spec.source, spec_sha256=ctx.spec.sha256,
        spec_text=ctx.spec_text,
        model=(("vocab_size", ctx.spec.vocab_size), ("hidden_size", ctx.spec.hidden_size),
               ("seq_len", ctx.spec.seq_len), ("num_layers", ctx.spec.num_layers),
               ("tie_embeddings", ctx.spec.tie_embeddings)),
        mesh=ctx.mesh.shape, hardware=ctx.hardware.name, mode=ctx.mode, batch=ctx.batch, seq=ctx.seq,
        strategy="data_parallel",
        training=TrainingPlan(t.steps, t.lr, t.beta1, t.beta2, t.eps, t.weight_decay, t.seed, "permutation_walk",
                              t.value_lr_multiplier, t.value_lr_decay_steps),
        nodes=tuple(nodes), params=tuple(params), buffers=tuple(buffers), output=output, output_boxing=output_boxing,
        totals=tuple((k, cost(v, values, simplify=True)) for k, v in totals.items()))
    gm.meta["ultraplan.plan"] = plan
    return PassReport("build_plan", time.perf_counter() - start,
                      [f"{len(nodes)} nodes, {len(params)} parameters"], {k: totals[k] for k in ("step_time",)})
