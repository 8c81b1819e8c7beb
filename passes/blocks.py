"""find_blocks: which layers run the same block, so the program writes each distinct block once.

A layer is the nodes whose module path is ``layers.i`` or below it, its parameters and buffers
(canonical names ``layers.i.*``) and the fsdp gathers of those. Two layers run the same block when
their planned, shard-local computation is equal position by position, up to the layer index:

    signature(layer) = for each node in order: op, the call its shard runs, local attributes
                       (numbers masked, see below), global and local shape, dtype, SBP signature,
                       partial-sum scale, per-axis splits (variants), boxing steps (collective,
                       axis, SBPs, bytes) and its arguments as positions (a node of the layer, an
                       input, a parameter or buffer by its name below ``layers.i``);
                     + its parameters (name below ``layers.i``, shape, init, placement at rest and
                       in use, optimizer group, gradient collectives) and buffers;
                     + which of its nodes are read outside it (its outputs).

The spec's layer groups are not consulted: an override, a different SBP or a memory layer among
dense ones changes the signature and gives that layer its own block. Number attributes that
differ between layers of one signature (a ring-shared table's row offset, layer l at l n^2,
compiler/memory_tables.py) are the block's per-layer constants, passed to each layer's
constructor; a number that changes a shape changes the signature through that shape.

Values a layer reads from outside (the residual stream, a table shared by several layers,
tokens) are its inputs, passed as arguments; so a shared table stays one parameter. Consecutive
layers form a run (one loop in the program) when each reads the same inputs as the one before,
except those fed by the previous layer's outputs (``carry``), the same positions throughout. Layers
of different kinds that alternate (a memory layer every 4th layer, reading a shared table the
dense ones do not) loop by period: an iteration runs ``period`` consecutive layers, and the
iterations must match as single layers do (``LayerRunPlan.wiring`` says which argument of each
layer comes from outside the iteration and which from an earlier layer of it).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time

from torch import fx

from ..compiler.node_info import info
from .context import PassReport, PlanContext
from .plan import BlockPlan, LayerCallPlan, LayerRunPlan, NodePlan, Plan

LAYER = re.compile(r"^layers\.(\d+)(\.|$)")


def _layer_index(path: str) -> int | None:
    match = LAYER.match(path)
    return int(match.group(1)) if match else None


def _membership(plan: Plan) -> dict[str, int | None]:
    """Node name -> the layer it belongs to (None: the model's own nodes)."""
    state = {p.node: _layer_index(p.name) for p in plan.params}
    state.update({b.node: _layer_index(b.name) for b in plan.buffers})
    out: dict[str, int | None] = {}
    for node in plan.nodes:
        if node.op in ("param", "buffer"):
            out[node.name] = state[node.name]
        elif node.op == "input":
            out[node.name] = None
        elif node.op == "boxing" and node.args and node.args[0] in state:  # fsdp's gather goes with its parameter
            out[node.name] = state[node.args[0]]
        else:
            out[node.name] = _layer_index(node.layer)
    return out


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass
class _Layer:
    index: int
    nodes: list[NodePlan]
    params: list[str]  # canonical names
    buffers: list[str]
    inputs: list[str]
    outputs: list[str]
    key: str = ""
    numbers: list[tuple[str, str, object]] = dataclasses.field(default_factory=list)  # (node, attr, value)


def _layers(plan: Plan, member: dict[str, int | None]) -> list[_Layer]:
    readers: dict[str, set[int | None]] = {}
    for node in plan.nodes:
        for arg in node.args:
            readers.setdefault(arg, set()).add(member[node.name])
    readers.setdefault(plan.output, set()).add(None)
    layers: dict[int, _Layer] = {}
    for node in plan.nodes:
        i = member[node.name]
        if i is None or node.op in ("param", "buffer"):
            continue
        layer = layers.setdefault(i, _Layer(i, [], [], [], [], []))
        layer.nodes.append(node)
        for arg in node.args:
            if member[arg] != i and arg not in layer.inputs:
                layer.inputs.append(arg)
        if readers.get(node.name, set()) - {i}:
            layer.outputs.append(node.name)
    for p in plan.params:
        i = _layer_index(p.name)
        if i is not None:
            layers[i].params.append(p.name)
    for b in plan.buffers:
        i = _layer_index(b.name)
        if i is not None:
            layers[i].buffers.append(b.name)
    return [layers[i] for i in sorted(layers)]


def _signature(layer: _Layer, plan: Plan) -> None:
    """Fill ``layer.key`` (its signature as text) and ``layer.numbers`` (the masked number attributes)."""
    prefix = f"layers.{layer.index}."
    params = {p.node: p for p in plan.params}
    buffers = {b.node: b for b in plan.buffers}
    position = {n.name: k for k, n in enumerate(layer.nodes)}
    inputs = {name: k for k, name in enumerate(layer.inputs)}

    def ref(arg: str) -> list:
        if arg in position:
            return ["node", position[arg]]
        if arg in inputs:
            return ["input", inputs[arg]]
        state = params.get(arg) or buffers.get(arg)
        assert state is not None and state.name.startswith(prefix), f"{arg}: read by layer {layer.index}, not in it"
        return ["state", state.name.removeprefix(prefix)]

    nodes = []
    for node in layer.nodes:
        attrs = []
        for key, value in node.local_attrs:
            if _is_number(value):
                layer.numbers.append((node.name, key, value))
                value = "<number>"
            attrs.append([key, value])
        steps = [[c.collective, c.axis, c.group_size, c.src, c.dst, c.payload_bytes.value, c.dtype]
                 for _, cs in node.boxing for c in cs]
        nodes.append([node.op, node.call, attrs, node.shape, node.local_shape, node.dtype, node.sbp_in, node.sbp_out,
                      node.partial_scale, node.splits, steps, [ref(a) for a in node.args],
                      node.layer.removeprefix(prefix.rstrip("."))])
    state = []
    for p in plan.params:
        if p.name in layer.params:
            sync = [[c.collective, c.axis, c.src, c.dst] for c in p.grad_sync]
            state.append([p.name.removeprefix(prefix), p.shape, p.init, p.std, p.sbp, p.used, p.group, sync])
    for b in plan.buffers:
        if b.name in layer.buffers:
            assert b.source == "" or b.source.startswith(prefix), f"{b.name} derives from {b.source}, outside its layer"
            state.append([b.name.removeprefix(prefix), b.shape, b.dtype, b.init, b.op, b.source.removeprefix(prefix)])
    outputs = [position[o] for o in layer.outputs]
    layer.key = json.dumps([nodes, state, outputs, len(layer.inputs)], default=str)


def class_name(spec_blocks: list[str], taken: set[str]) -> str:
    """``wide`` -> ``WideBlock``; a second distinct block of the same spec block ``WideBlock2``."""
    camel = "".join(part[:1].upper() + part[1:] for name in spec_blocks for part in re.split(r"[^0-9A-Za-z]+", name))
    if not camel or camel[0].isdigit():
        camel = "Layer" + camel
    base = camel if camel.endswith("Block") else camel + "Block"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}{k}", k + 1
    taken.add(name)
    return name


def _local_names(values: list[str], plan: Plan, stream: set[str]) -> tuple[str, ...]:
    """Names of a block's arguments (or results): ``x`` for the residual stream (or a boxing of
    it), else the value's name without its layer prefix."""
    nodes = {n.name: n for n in plan.nodes}
    out: list[str] = []
    for name in values:
        base = name
        while base not in stream and nodes[base].op == "boxing":
            base = nodes[base].args[0]
        local = "x" if base in stream else re.sub(r"^layers_\d+_", "", name)
        candidate, k = local, 1
        while candidate in out:
            candidate, k = f"{local}_{k}", k + 1
        out.append(candidate)
    return tuple(out)


MAX_PERIOD = 8  # the longest repeating pattern of layers looked for (memory every 4th layer: 4)


@dataclasses.dataclass
class _Period:
    """``calls`` as one iteration of a loop: what it reads from outside, what its layers return."""

    calls: list[LayerCallPlan]
    inputs: list[str]  # values read from outside the iteration, in first-read order
    outputs: list[str]  # its layers' outputs, layer after layer
    wiring: tuple[tuple[int, int], ...]  # per layer argument: (-1, input) or (layer, output)
    shape: tuple[tuple[int, int], ...]  # (arguments, outputs) per layer

    @staticmethod
    def of(calls: list[LayerCallPlan]) -> _Period:
        made = {out: (m, k) for m, call in enumerate(calls) for k, out in enumerate(call.outputs)}
        inputs: list[str] = []
        wiring = []
        for m, call in enumerate(calls):
            for value in call.inputs:
                if value in made and made[value][0] < m:
                    wiring.append(made[value])
                    continue
                if value not in inputs:
                    inputs.append(value)
                wiring.append((-1, inputs.index(value)))
        return _Period(calls, inputs, [o for c in calls for o in c.outputs], tuple(wiring),
                       tuple((len(c.inputs), len(c.outputs)) for c in calls))


def _follows(prev: _Period, nxt: _Period) -> tuple[tuple[int, int], ...] | None:
    """The carry pairs (output of ``prev``, input of ``nxt``) when ``nxt`` can run as the loop
    iteration after ``prev``: the same wiring, and each input either ``prev``'s at the same position
    or one of ``prev``'s outputs; None when it cannot."""
    if prev.shape != nxt.shape or prev.wiring != nxt.wiring or len(prev.inputs) != len(nxt.inputs):
        return None
    pairs = []
    for j, value in enumerate(nxt.inputs):
        if value in prev.outputs:
            pairs.append((prev.outputs.index(value), j))
        elif value != prev.inputs[j]:
            return None
    return tuple(pairs)


def _extent(calls: list[LayerCallPlan], start: int, period: int) -> tuple[list[_Period], tuple[tuple[int, int], ...]]:
    """The iterations of ``period`` layers from ``start`` that form one loop (greedy), and its carry."""
    periods = [_Period.of(calls[start:start + period])]
    carry = None
    while start + (len(periods) + 1) * period <= len(calls):
        at = start + len(periods) * period
        nxt = _Period.of(calls[at:at + period])
        pairs = _follows(periods[-1], nxt)
        if pairs is None or (carry is not None and pairs != carry):
            break
        carry = pairs
        periods.append(nxt)
    return periods, carry or ()


def _runs(calls: list[LayerCallPlan], readers: dict[str, list[str]]) -> list[LayerRunPlan]:
    """Group consecutive layers into loops: from each layer on, the period (1 to MAX_PERIOD layers
    per iteration) whose loop covers the most layers, the shortest on a tie; a layer no loop of two
    iterations or more covers is a call of its own."""
    runs: list[LayerRunPlan] = []
    start = 0
    while start < len(calls):
        periods, carry = _extent(calls, start, 1)
        for period in range(2, min(MAX_PERIOD, (len(calls) - start) // 2) + 1):
            found, pairs = _extent(calls, start, period)
            if len(found) > 1 and len(found) * period > len(periods) * len(periods[0].calls):
                periods, carry = found, pairs
        carried = dict(carry)
        collected = []
        for k in range(len(periods[0].outputs)):
            for t, it in enumerate(periods):
                last = t == len(periods) - 1
                if last and k in carried:
                    continue  # the loop's variable after the loop
                inside = {f"call:{c.index}" for c in it.calls}
                if k in carried:
                    inside |= {f"call:{c.index}" for c in periods[t + 1].calls}
                if set(readers.get(it.outputs[k], ())) - inside:
                    collected.append(k)
                    break
        first, last = periods[0].calls[0], periods[-1].calls[-1]
        period = len(periods[0].calls)
        runs.append(LayerRunPlan(first.index, last.index + 1, carry, tuple(collected), period,
                                 periods[0].wiring if period > 1 else ()))
        start += len(periods) * period
    return runs


def find_blocks(gm: fx.GraphModule, ctx: PlanContext) -> PassReport:
    """Record the plan's distinct blocks, its layers as calls of them and the loops over them."""
    start = time.perf_counter()
    plan: Plan = gm.meta["ultraplan.plan"]
    stream = {n.name for n in gm.graph.nodes if info(n).stream}
    member = _membership(plan)
    layers = _layers(plan, member)
    for layer in layers:
        _signature(layer, plan)
    groups: dict[str, list[_Layer]] = {}
    for layer in layers:
        groups.setdefault(layer.key, []).append(layer)
    spec_block = {layer.index: layer.block for layer in ctx.spec.layers}
    taken: set[str] = set()
    blocks, block_of = [], {}
    for group in groups.values():
        first = group[0]
        names = list(dict.fromkeys(spec_block.get(layer.index, "layer") for layer in group))
        constants = []
        for k, (node, attr, _) in enumerate(first.numbers):
            values = tuple(layer.numbers[k][2] for layer in group)
            if len(set(values)) > 1:
                constants.append((node, attr, values))
        block = BlockPlan(class_name(names, taken), tuple(names), tuple(layer.index for layer in group),
                          tuple(n.name for n in first.nodes), tuple(first.params), tuple(first.buffers),
                          _local_names(first.inputs, plan, stream), tuple(first.outputs),
                          _local_names(first.outputs, plan, stream), tuple(constants))
        blocks.append(block)
        block_of.update({layer.index: block.name for layer in group})
    calls = [LayerCallPlan(layer.index, block_of[layer.index], f"layers.{layer.index}.",
                           tuple(n.name for n in layer.nodes), tuple(layer.inputs), tuple(layer.outputs))
             for layer in layers]
    call_of = {name: f"call:{c.index}" for c in calls for name in c.nodes}
    readers: dict[str, list[str]] = {}
    for node in plan.nodes:
        for arg in node.args:
            reader = call_of.get(node.name, node.name)
            if call_of.get(arg) != reader:
                readers.setdefault(arg, []).append(reader)
    readers.setdefault(plan.output, []).append("output")
    runs = _runs(calls, readers)
    gm.meta["ultraplan.plan"] = dataclasses.replace(plan, blocks=tuple(blocks), layer_calls=tuple(calls),
                                                    layer_runs=tuple(runs))
    return PassReport("find_blocks", time.perf_counter() - start,
                      [f"{len(layers)} layers, {len(blocks)} distinct blocks ("
                       + ", ".join(f"{b.name}: layers {list(b.layers)}" for b in blocks) + f"), {len(runs)} loops"],
                      {})
