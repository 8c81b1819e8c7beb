"""precision: the dtype of every value a training step holds, from the spec's ``train.precision``.

Mixed precision as FSDP2's ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` and
``torch.autocast`` do it (docs/precision.md says why each choice, with sources):

    master weights        float32 (what is stored, updated, checkpointed; ``ParamPlan.bytes_per_device``)
    optimizer state       float32 (AdamW's two moments, made like their parameter)
    gradients             float32 (of the master weights; all-reduced after backward in float32)
    compute copies        the compute dtype: each weight (and floating buffer) cast once per step at
                          the start of the forward; what the graph's ``param`` nodes hold, so an fsdp
                          gather moves the copy (and its backward reduce-scatter the copy's gradient)
    activations           the compute dtype, by torch's promotion from the copies: every op's output,
                          what autograd saves, the collectives on activations (tp, sp, ep)
    losses                float32: ops whose op-table ``result`` is ``fp32`` (cross entropy and the
                          MoE balance loss) compute in at least float32

This pass writes those dtypes into the node records (``NodeInfo.dtype``), in graph order, with the
op table's ``result_dtype`` (torch's promotion rule); shape_prop then checks each one against what
torch computes on meta tensors. Everything that counts bytes reads them: boxing payloads
(passes/sbp.py), the collectives inside variant calls (passes/localize.py), saved activations
(passes/memory.py), ``stats``' weight bytes per token. ``precision_plan`` is the per-class record
the Plan keeps (``Plan.precision``), which the emitter turns into the program's COMPUTE_DTYPE.
"""

from __future__ import annotations

import time

from torch import fx

from ..compiler.lower import tensor_args
from ..compiler.node_info import info
from ..compiler.op_records import FLOAT_WIDTH
from ..compiler.op_table import OP_TABLE
from ..compiler.schema import ModelSpec
from .context import PassReport, PlanContext
from .plan import PrecisionPlan

COMPUTE_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # train.precision -> the compute dtype
MASTER = "float32"  # master weights, their gradients and the optimizer state, in every precision


def precision_plan(spec: ModelSpec) -> PrecisionPlan:
    """The dtype of each class of tensor for ``spec``'s ``train.precision``."""
    return PrecisionPlan(compute=COMPUTE_DTYPES[spec.train.precision], master=MASTER, gradients=MASTER,
                         optimizer_state=MASTER, loss="float32")


def assign_dtypes(gm: fx.GraphModule, compute: str) -> int:
    """Give every node its dtype when the forward runs on ``compute`` copies of the weights; returns
    how many nodes hold ``compute`` values. Idempotent; in float32 it reproduces lowering's dtypes."""
    held = 0
    for node in gm.graph.nodes:
        rec = info(node)
        if rec.op == "param" or (rec.op == "buffer" and rec.dtype in FLOAT_WIDTH):
            rec.dtype = compute  # the compute copy (a buffer keeps its stored dtype in BufferInfo)
        elif node.op == "call_function" and rec.op != "boxing":
            rec.dtype = OP_TABLE[rec.op].result_dtype([info(a).dtype for a in tensor_args(node)])
        elif node.op == "output":
            rec.dtype = info(node.args[0]).dtype
        held += rec.dtype == compute
    return held


def precision(gm: fx.GraphModule, ctx: PlanContext) -> PassReport:
    """The pipeline pass: node dtypes for the context's spec (before shape_prop, which checks them)."""
    start = time.perf_counter()
    plan = precision_plan(ctx.spec)
    held = assign_dtypes(gm, plan.compute)
    losses = [n.name for n in gm.graph.nodes if n.op == "call_function" and info(n).op != "boxing"
              and OP_TABLE[info(n).op].result == "fp32"]
    decisions = [f"train.precision {ctx.spec.train.precision}: compute {plan.compute} ({held} values), "
                 f"master weights, gradients and optimizer state {plan.master}"]
    if plan.compute != MASTER:
        decisions.append(f"in float32 from {plan.compute} inputs: {', '.join(losses) or 'none'}")
    return PassReport("precision", time.perf_counter() - start, decisions)
