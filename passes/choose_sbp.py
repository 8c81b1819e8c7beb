"""choose_sbp: give every node an SBP signature; record the boxing each edge needs.

Strategy ``data_parallel`` (the only one so far): the batch dim is split on every mesh axis.

- inputs (tokens, targets): ``S(0)`` on every axis;
- parameters: ``B`` on every axis (each device holds the whole model);
- every op maps ``S(0)`` activations and ``B`` parameters to an ``S(0)`` output: each op here
  acts on one sequence at a time, so splitting the batch commutes with it; an op that reads only
  parameters and state (normalising a key table) is computed whole on every device (``B``);
- the loss is a mean over the batch: each device's local mean, scaled by its share
  ``1/devices``, is a partial sum ``P`` of the global mean (``partial_scale``);
- backward: a ``B`` weight used by ``S(0)`` activations gets a ``P`` gradient, so each parameter
  gradient is boxed ``P -> B`` with an all-reduce on every axis, in axis order from the last
  (inside a node) to the first (across nodes);
- the loss is boxed ``P -> B`` for logging;
- whole-batch statistics (the MoE balance loss): per-device sums over the batch are ``P``; the op
  that reads them wants ``B``, so they are all-reduced in the forward (an all-reduce of their
  gradient in the backward); its ``B`` result joins the ``P`` loss as ``P`` (divided by the
  devices, ``B -> P`` local).

In ``infer`` mode there is no loss and no backward: the logits stay ``S(0)`` and parameters get
no gradient collectives.

Requires ``ultraplan.shape`` and ``ultraplan.op`` on every node. Promises ``ultraplan.sbp`` on
every node, ``ultraplan.boxing`` (per input, possibly empty) on every op and the output, and
``ultraplan.grad_boxing`` on every parameter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import sympy
from torch import fx

from ..compiler.lower import tensor_args
from ..compiler.shapes import numel
from .context import PassReport, PlanContext
from .sbp import Boxing, Broadcast, NdSbp, PartialSum, Split, box, local_dims, nd_str
from .symbols import BYTES_PER_ELEMENT, axis_size, device_count

ONE = sympy.Integer(1)
BATCH_SUMS = {"expert_counts", "column_sums"}
WHOLE_BATCH = {"balance_loss"}


class PlanError(Exception):
    """A plan that cannot be made as asked (e.g. a batch that does not divide over the mesh)."""


@dataclass(frozen=True)
class Signature:
    inputs: tuple[NdSbp, ...]
    output: NdSbp
    partial_scale: sympy.Expr = ONE

    def __str__(self) -> str:
        ins = ", ".join(f"[{nd_str(s)}]" for s in self.inputs)
        return f"{ins} -> [{nd_str(self.output)}]" if ins else f"[{nd_str(self.output)}]"


def boxings(src: NdSbp, dst: NdSbp, shape, dtype: str) -> list[Boxing]:
    """Per-axis collectives turning ``src`` into ``dst``, innermost axis first; each step is sized by
    the layout the steps before it left (an all-gather on axis 1 has already grown the tensor)."""
    out = []
    sizes = [axis_size(a) for a in range(len(src))]
    layout = list(src)
    for axis in reversed(range(len(src))):
        nbytes = numel(local_dims(shape, tuple(layout), sizes, skip_axis=axis)) * BYTES_PER_ELEMENT[dtype]
        step = box(layout[axis], dst[axis], axis=axis, nbytes=nbytes, n=axis_size(axis))
        if step is not None:
            out.append(step)
        layout[axis] = dst[axis]
    return out


def choose_sbp(gm: fx.GraphModule, ctx: PlanContext) -> PassReport:
    start = time.perf_counter()
    axes = len(ctx.mesh.shape)
    if ctx.batch % ctx.mesh.size:
        raise PlanError(f"batch {ctx.batch} does not split evenly over the {ctx.mesh.size} devices of mesh "
                        f"{ctx.mesh}; use a batch that is a multiple of {ctx.mesh.size} (--batch)")
    split: NdSbp = (Split(0),) * axes
    bcast: NdSbp = (Broadcast(),) * axes
    partial: NdSbp = (PartialSum(),) * axes
    devices = device_count(axes)
    num_boxed = 0
    for node in gm.graph.nodes:
        kind = node.meta["ultraplan.op"]
        if node.op == "placeholder":
            node.meta["ultraplan.sbp"] = Signature((), split)
        elif node.op == "get_attr":  # parameters and state: whole on every device
            node.meta["ultraplan.sbp"] = Signature((), bcast)
            train_param = kind == "param" and ctx.mode == "train"
            node.meta["ultraplan.grad_boxing"] = (
                boxings(partial, bcast, node.meta["ultraplan.shape"], "float32") if train_param else [])
        elif node.op == "call_function":
            # each input as it comes (nothing is boxed); the output is split when any input is,
            # broadcast when the op only reads parameters and state (e.g. normalising keys)
            wanted = tuple(a.meta["ultraplan.sbp"].output for a in tensor_args(node))
            if kind == "cross_entropy":
                node.meta["ultraplan.sbp"] = Signature(wanted, partial, 1 / devices)
            elif kind in BATCH_SUMS:  # a sum over this device's share of the batch: a partial sum
                node.meta["ultraplan.sbp"] = Signature(wanted, partial)
            elif kind in WHOLE_BATCH:  # reads whole-batch statistics: P inputs are all-reduced first
                node.meta["ultraplan.sbp"] = Signature(tuple(bcast for _ in wanted), bcast)
            elif partial in wanted:  # adding to a partial sum (the loss): every term must be P
                node.meta["ultraplan.sbp"] = Signature(tuple(partial for _ in wanted), partial)
            else:
                node.meta["ultraplan.sbp"] = Signature(wanted, split if split in wanted else bcast)
        if node.op in ("call_function", "output"):
            if node.op == "call_function":
                wanted = node.meta["ultraplan.sbp"].inputs
            else:  # training logs the loss everywhere; inference leaves each rank its rows of logits
                wanted = (bcast,) if ctx.mode == "train" else (node.args[0].meta["ultraplan.sbp"].output,)
            node.meta["ultraplan.boxing"] = {}
            inputs = tensor_args(node) if node.op == "call_function" else [node.args[0]]
            for arg, want in zip(inputs, wanted, strict=True):
                have = arg.meta["ultraplan.sbp"].output
                steps = boxings(have, want, arg.meta["ultraplan.shape"], arg.meta["ultraplan.dtype"])
                node.meta["ultraplan.boxing"][arg.name] = steps
                num_boxed += bool(steps) and node.op != "output"
            if node.op == "output":
                node.meta["ultraplan.sbp"] = Signature(wanted, bcast)
    assert all("ultraplan.sbp" in n.meta for n in gm.graph.nodes), "choose_sbp left a node without SBP"
    params = [n for n in gm.graph.nodes if n.meta["ultraplan.op"] == "param"]
    grad_bytes = sum((b.wire for n in params for b in n.meta["ultraplan.grad_boxing"]), sympy.Integer(0))
    return PassReport("choose_sbp", time.perf_counter() - start, [
        f"data parallel over {ctx.mesh.size} devices (mesh {ctx.mesh}): batch S(0) on every axis, "
        f"{len(params)} parameters B, gradients P -> B by all-reduce",
        f"{num_boxed} forward edges need boxing",
    ], {"gradient_wire_bytes_per_device": sympy.simplify(grad_bytes)})
