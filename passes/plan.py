"""The Plan: a versioned, JSON-serialisable record of every decision, read by the backends.

Everything a backend needs is here and nothing it must decide: per node the op, its arguments,
its SBP signature, the call its shard runs (``call``, ``local_attrs``: heads / n, a vocabulary
offset, an expert range) and its costs; boxing nodes with their collectives; per parameter its
placement at rest and in use, init rule and gradient collectives; the gradient buckets that carry
those (``grad_buckets``: which gradients, in what order, one flat buffer each); the one list of every
collective a training step runs (``collectives``), which the emitter, the comm totals and the
tests all read; totals. Every cost is kept twice: the sympy
expression (as text, in the symbols of ``symbols.py``) and its value at the plan's B, T, mesh
and hardware. ``Plan.from_json(plan.to_json()) == plan`` holds exactly.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any

PLAN_VERSION = 4
FLOAT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


@dataclass(frozen=True)
class Cost:
    """A symbolic cost and its value at the plan's point."""

    expr: str
    value: float


@dataclass(frozen=True)
class CollectivePlan:
    """One collective the program runs, and why."""

    collective: str  # all_reduce, all_gather, reduce_scatter, all_to_all, local
    axis: int
    group_size: int
    src: str
    dst: str
    payload_bytes: Cost  # bytes of the local tensor handed over (what the runtime counts)
    wire_bytes: Cost  # bytes each device sends, ring model
    time: Cost  # seconds: messages * latency + wire / bandwidth
    reason: str
    phase: str = "forward"  # forward, backward (a forward collective's dual), gradient_sync, loss_logging
    node: str = ""  # the graph node (or parameter node) it belongs to
    data_dependent: bool = False  # payload depends on routing: the value is the mean over devices
    dtype: str = "float32"  # what it carries (a float64 run hands twice the bytes of float values)


@dataclass(frozen=True)
class FusionPlan:
    """A fusion the fuse pass made (passes/fuse.py): the node that now runs ``fused``, the nodes it
    replaced, the bytes of memory traffic it saves and the FLOPs it adds per step (whole model)."""

    node: str
    rule: str
    fused: str
    replaced: tuple[str, ...]
    bytes_saved: Cost
    extra_flops: Cost
    why: str


@dataclass(frozen=True)
class NodePlan:
    name: str
    op: str
    layer: str
    args: tuple[str, ...]  # names of the tensor inputs, in call order
    attrs: tuple[tuple[str, Any], ...]  # non-tensor arguments, in call order
    shape: tuple[str, ...]  # global (logical) shape, sympy text
    local_shape: tuple[str, ...]  # the shape on one device
    dtype: str
    sbp_in: tuple[str, ...]
    sbp_out: str
    partial_scale: str  # the factor a local result is multiplied by to form a P value ("1" if none)
    boxing: tuple[tuple[str, tuple[CollectivePlan, ...]], ...]  # boxing nodes: (input, forward steps)
    call: str  # what the shard runs: "ops.linear", "runtime.vocab_parallel_cross_entropy", ...
    local_attrs: tuple[tuple[str, Any], ...]  # its non-tensor arguments on a shard (see backends/program.py)
    splits: tuple[str, ...]  # per mesh axis, the dim letter (or variant) the op's work is split by
    flops: Cost
    backward_flops: Cost
    bytes_read: Cost
    bytes_written: Cost


@dataclass(frozen=True)
class ParamPlan:
    name: str  # canonical name, as in the eager model's state_dict
    node: str  # the graph node that reads it
    shape: tuple[int, ...]
    init: str
    std: float
    sbp: str  # as stored (at rest): what the optimizer and the gradient see
    used: str  # as its consumers see it (fsdp gathers a stored shard to B)
    bytes_per_device: Cost
    grad_sync: tuple[CollectivePlan, ...]  # what its gradient needs; run inside bucket ``bucket``
    group: str  # optimizer group: "default" or "values" (memory value tables)
    bucket: int = -1  # the index in Plan.grad_buckets of the bucket carrying its gradient (-1: none)


@dataclass(frozen=True)
class GradBucketPlan:
    """Gradients synchronised as one flat buffer (passes/buckets.py decides which, in what order):
    launched, step after step, once every gradient in it is ready in the backward."""

    params: tuple[str, ...]  # canonical names, in flat-buffer order (the order they are expected ready)
    nodes: tuple[str, ...]  # their parameter nodes
    dtype: str
    cap_bytes: int  # the width of its key's buckets on the byte line (passes/buckets.py)
    steps: tuple[CollectivePlan, ...]  # one collective per mesh axis its gradients are P on; also in collectives


@dataclass(frozen=True)
class GatherGroupPlan:
    """fsdp gathers of one layer run as one flat all-gather (passes/gather_groups.py decides which):
    its backward is one reduce-scatter of the concatenated gradients."""

    layer: int  # the layer (``layers.i``) whose forward runs it, before its members' first use; -1: the Model's
    params: tuple[str, ...]  # canonical names, in flat-buffer order
    nodes: tuple[str, ...]  # their boxing nodes (each node's own boxing is what the group replaces)
    dims: tuple[int, ...]  # the dimension each parameter is split on
    steps: tuple[CollectivePlan, ...]  # the all-gather and, in training, the reduce-scatter; also in collectives
    prefetch_after: int = -1  # a Model's group used after the layers: the layer whose forward starts it; else -1


@dataclass(frozen=True)
class BufferPlan:
    """Non-parameter state on every device: a seeded ``permutation``, or ``derived`` as
    ``op(source parameter)`` at start and after every optimizer step."""

    name: str
    node: str
    shape: tuple[int, ...]
    dtype: str
    init: str
    op: str
    source: str


@dataclass(frozen=True)
class BlockPlan:
    """One distinct block: layers whose shard-local computation is the same up to the layer index
    (the same ops, attributes, local shapes, SBPs, collectives and parameter placements), which the
    program writes once as a class. ``passes/blocks.py`` decides which layers share one."""

    name: str  # the program's class name ("WideBlock")
    spec_blocks: tuple[str, ...]  # the spec's block names its layers come from
    layers: tuple[int, ...]  # the layer indices that run it
    nodes: tuple[str, ...]  # the first layer's nodes, in order: what the block's forward runs
    params: tuple[str, ...]  # the first layer's parameters (canonical names), in order
    buffers: tuple[str, ...]  # the first layer's buffers (canonical names)
    inputs: tuple[str, ...]  # the forward's arguments, as named inside the block ("x" for the stream)
    outputs: tuple[str, ...]  # the first layer's nodes the forward returns, in order
    output_names: tuple[str, ...]  # what a caller names them: "x" for the residual stream, else the node's name
    # number attributes that differ between its layers (a ring table's row offset): (node of the
    # first layer, attribute, one value per layer of ``layers``), passed to each layer's constructor
    constants: tuple[tuple[str, str, tuple[Any, ...]], ...]


@dataclass(frozen=True)
class LayerCallPlan:
    """One layer as a call of its block: what it reads from outside and what it hands on."""

    index: int
    block: str  # its BlockPlan's name
    prefix: str  # the canonical names' prefix of its parameters ("layers.3.")
    nodes: tuple[str, ...]  # its nodes, position by position the block's
    inputs: tuple[str, ...]  # the values passed in (plan nodes), in the block's argument order
    outputs: tuple[str, ...]  # its nodes the block returns, in order


@dataclass(frozen=True)
class LayerRunPlan:
    """Consecutive layers the program runs as one loop, ``period`` layers per iteration (a dense
    layer and a memory layer in turn: period 2). An iteration reads the same values as the one
    before, except where ``carry`` feeds its output ``k`` to the next iteration's input ``j``;
    outputs in ``collected`` are read elsewhere (a balance loss, a skip-layer delivery) and kept in
    a list per position. An iteration's inputs are the values its layers read from outside it, in
    first-read order; its outputs are its layers' outputs, layer after layer, in each layer's order."""

    start: int
    stop: int
    carry: tuple[tuple[int, int], ...]  # (output position, input position)
    collected: tuple[int, ...]
    period: int = 1  # layers per iteration
    # where each layer of an iteration takes each argument from, layer after layer: (-1, j) the
    # iteration's input j, (m, k) output k of its layer m (m < this layer)
    wiring: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class TrainingPlan:
    steps: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    seed: int
    task: str
    value_lr_multiplier: float  # LR factor of the "values" group, decaying linearly to 1 over:
    value_lr_decay_steps: int  # (0: constant) see compiler.build.value_lr_factor


@dataclass(frozen=True)
class PrecisionPlan:
    """The dtype of each class of tensor a training step holds (passes/precision.py; docs/precision.md).
    Per value, ``NodePlan.dtype`` and ``CollectivePlan.dtype`` say the same in detail."""

    compute: str = "float32"  # compute copies of the weights, activations, saved tensors, activation collectives
    master: str = "float32"  # parameters as stored and updated (bytes_per_device)
    gradients: str = "float32"  # gradients of the master weights, and their all-reduce after backward
    optimizer_state: str = "float32"  # AdamW's moments
    loss: str = "float32"  # the losses compute in at least this dtype


@dataclass(frozen=True)
class Plan:
    version: int
    spec_name: str
    spec_source: str
    spec_sha256: str
    spec_text: str  # the spec itself, so a compiled directory can be checked against eager
    model: tuple[tuple[str, int | bool], ...]  # vocab_size, hidden_size, seq_len, num_layers, tie_embeddings
    mesh: tuple[int, ...]
    hardware: str
    mode: str
    batch: int
    seq: int
    strategy: str  # one per mesh axis, comma separated: "dp", "fsdp,tp"
    forces: tuple[tuple[str, str], ...]  # --force pins: (glob, nd-SBP)
    training: TrainingPlan
    nodes: tuple[NodePlan, ...]
    params: tuple[ParamPlan, ...]
    buffers: tuple[BufferPlan, ...]
    output: str
    output_boxing: tuple[CollectivePlan, ...]
    collectives: tuple[CollectivePlan, ...]  # every collective one training step runs, in order
    totals: tuple[tuple[str, Cost], ...]
    blocks: tuple[BlockPlan, ...] = ()  # passes/blocks.py: the distinct blocks
    layer_calls: tuple[LayerCallPlan, ...] = ()  # every layer as a call of its block
    layer_runs: tuple[LayerRunPlan, ...] = ()  # the layers in order, grouped into loops
    grad_buckets: tuple[GradBucketPlan, ...] = ()  # gradient synchronisation, in launch order
    gather_groups: tuple[GatherGroupPlan, ...] = ()  # fsdp gathers run as one collective per layer
    fits: bool = True  # memory_per_device <= device_memory
    device_memory: float = 0.0  # bytes of memory one device of the hardware has
    precision: PrecisionPlan = PrecisionPlan()  # the dtype of each class of tensor
    fusions: tuple[FusionPlan, ...] = ()  # passes/fuse.py: each fusion and the bytes it saves

    def to_json(self) -> str:
        return json.dumps(_encode(self), indent=1, sort_keys=False) + "\n"

    @staticmethod
    def from_json(text: str) -> Plan:
        data = json.loads(text)
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {data.get('version')} is not {PLAN_VERSION}; recompile the spec")
        return _decode(Plan, data)

    def node(self, name: str) -> NodePlan:
        return next(n for n in self.nodes if n.name == name)

    def total(self, key: str) -> Cost:
        return dict(self.totals)[key]

    def step_collectives(self, run_dtype: str | None = None) -> tuple[dict[str, float], dict[str, int]]:
        """Bytes handed to each kind of collective per step and device, and calls, from the one list.
        The payloads are planned in each collective's dtype; ``run_dtype`` ``"float64"`` gives those of
        a ``--dtype float64`` run, where every floating value is float64 (int64 values, such as
        indices and counts, keep their size)."""
        payload: dict[str, float] = {}
        calls: dict[str, int] = {}
        for c in self.collectives:
            factor = FLOAT_BYTES[run_dtype] / FLOAT_BYTES[c.dtype] if run_dtype and c.dtype in FLOAT_BYTES else 1
            payload[c.collective] = payload.get(c.collective, 0) + c.payload_bytes.value * factor
            calls[c.collective] = calls.get(c.collective, 0) + 1
        return payload, calls


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    return value


def _decode(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: _decode(hints[f.name], value[f.name]) for f in dataclasses.fields(tp)
                     if f.name in value or f.default is dataclasses.MISSING})
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v) for v in value)
        return tuple(_decode(a, v) for a, v in zip(args, value))
    if origin in (typing.Union, types.UnionType) or tp is Any:
        return tuple(value) if isinstance(value, list) else value
    if tp is float:
        return float(value)
    return value
