"""The Model's forward: its own nodes (embedding, final norm, loss) around calls of the layers,
a loop wherever the plan's ``layer_runs`` groups consecutive layers.

The residual stream keeps one variable where it can: a call's stream result rebinds the variable
it read when nothing else reads that value (``x = self.layers[0](x)``); a loop carries it
(``for layer in self.layers[1:4]: x = layer(x)``) and keeps results read elsewhere (a balance
loss, a skip-layer delivery) in a list per position.
"""

from __future__ import annotations

import heapq

from ..passes.plan import GatherGroupPlan, LayerCallPlan, LayerRunPlan, Plan
from .emit_ops import Names, attr_path, block_local_names, node_lines, shape_text
from .text import comment, fmt_bytes, identifier, layer_group, literal


def shards_text(g: GatherGroupPlan, names: Names, nodes: dict) -> str:
    """The group's shards as the tuple ``runtime.gather_group`` takes."""
    shards = [names.values[nodes[m].args[0]] for m in g.nodes]
    return f"({shards[0]},)" if len(shards) == 1 else f"({', '.join(shards)})"


def gather_lines(g: GatherGroupPlan, names: Names, local: dict[str, str], nodes: dict) -> list[str]:
    """One ``runtime.gather_group`` call for a gather group (passes/gather_groups.py)."""
    out = []
    for c in g.steps:
        phase = "" if c.phase == "forward" else f" ({c.phase})"
        out.append(f"        # plan{phase}: {c.src} -> {c.dst} on mesh axis {c.axis} ({c.group_size} devices), "
                   f"{c.collective}, {fmt_bytes(c.payload_bytes.value)}: {names.text(c.reason)}")
    shards = shards_text(g, names, nodes)
    targets = [f"            {local[m]},  # {shape_text(nodes[m].local_shape)} [{nodes[m].sbp_out}]" for m in g.nodes]
    for m in g.nodes:
        names.values[m] = local[m]
    call = f"runtime.gather_group({shards}, self.mesh, axis={g.steps[0].axis}, dims={literal(g.dims)})"
    if len(g.nodes) == 1:
        (m,) = g.nodes
        return [*out, f"        ({local[m]},) = {call}  # {shape_text(nodes[m].local_shape)} [{nodes[m].sbp_out}]"]
    return [*out, "        (", *targets, f"        ) = {call}"]


def _order(plan: Plan, member: dict[str, int]) -> list[tuple[str, object]]:
    """The statements: the model's own nodes and the layer runs, in plan order where the data
    allows (a stable topological order: a run goes where its first node was)."""
    position = {n.name: k for k, n in enumerate(plan.nodes)}
    calls = {c.index: c for c in plan.layer_calls}
    items: list[tuple[int, str, object, set[str], set[str]]] = []
    for run in plan.layer_runs:
        run_calls = [calls[i] for i in range(run.start, run.stop)]
        made = {n for c in run_calls for n in c.nodes}
        reads = {i for c in run_calls for i in c.inputs if i not in made}
        items.append((position[run_calls[0].nodes[0]], "run", run, reads, made))
    for node in plan.nodes:
        if node.name not in member and node.op not in ("param", "buffer", "input"):
            items.append((position[node.name], "node", node, set(node.args), {node.name}))
    producer = {name: k for k, item in enumerate(items) for name in item[4]}
    waiting = {k: {producer[r] for r in item[3] if r in producer} - {k} for k, item in enumerate(items)}
    ready = [(item[0], k) for k, item in enumerate(items) if not waiting[k]]
    heapq.heapify(ready)
    out = []
    while ready:
        _, k = heapq.heappop(ready)
        out.append((items[k][1], items[k][2]))
        for j, deps in waiting.items():
            if k in deps:
                deps.discard(k)
                if not deps:
                    heapq.heappush(ready, (items[j][0], j))
    assert len(out) == len(items), "the layer calls and the model's own nodes form a cycle"
    return out


class _Vars:
    """The forward's variable names: fresh ones, and who still reads each value."""

    def __init__(self, names: Names, readers: dict[str, int], taken: set[str]) -> None:
        self.names, self.readers, self.taken = names, readers, taken

    def fresh(self, base: str) -> str:
        var, k = base, 2
        while var in self.taken:
            var, k = f"{base}_{k}", k + 1
        self.taken.add(var)
        return var

    def reusable(self, value: str, used: list[str]) -> str | None:
        """The variable of ``value`` when the call about to run is its only reader."""
        var = self.names.values[value]
        return var if self.readers.get(value, 0) == 1 and var.isidentifier() and var not in used else None


def _run_lines(plan: Plan, run: LayerRunPlan, v: _Vars) -> list[str]:
    calls: list[LayerCallPlan] = [c for c in plan.layer_calls if run.start <= c.index < run.stop]
    first = calls[0]
    block = next(b for b in plan.blocks if b.name == first.block)
    kinds = sorted({c.block for c in calls}, key=[b.name for b in plan.blocks].index)
    where = f"layer {run.start}" if len(calls) == 1 else f"layers {run.start}-{run.stop - 1}"
    lines = [f"        # ---- {where}: {', '.join(kinds)}"]
    loop = len(calls) > 1
    carried = dict(run.carry) if loop else {}
    stream_in = next((j for j, n in enumerate(block.inputs) if n == "x"), None)
    local = block_local_names(block, plan)
    out_vars: list[str] = []
    for k, base in enumerate(block.output_names):
        j = carried.get(k) if loop else (stream_in if base == "x" else None)
        start = first.inputs[j] if j is not None else None
        var = v.reusable(start, out_vars) if start is not None else None
        if var is None and loop and j is not None:
            var = v.fresh(base)
            lines.append(f"        {var} = {v.names.values[start]}")
        elif var is None:
            var = v.fresh(local[block.outputs[k]] if loop else ("x" if base == "x" else identifier(first.outputs[k])))
        out_vars.append(var)
    args = [v.names.values[i] for i in first.inputs]
    prefetching = bool(plan.gather_groups)  # each layer prefetches the next one's gather groups
    if not loop:
        following = [f"following=self.layers[{run.start + 1}]"] if prefetching and run.stop < len(plan.layer_calls) else \
            ["following=self"] if prefetching and _model_prefetches(plan) else []
        lines.append(f"        {', '.join(out_vars)} = self.layers[{run.start}]({', '.join(args + following)})")
        v.names.values.update(zip(first.outputs, out_vars))
        return lines
    lists = {k: v.fresh(f"{local[block.outputs[k]]}_per_layer") for k in run.collected}
    lines += [f"        {var} = []" for var in lists.values()]
    into = {j: k for k, j in run.carry}
    loop_args = [out_vars[into[j]] if j in into else args[j] for j in range(len(args))]
    sliced = "self.layers" if (run.start, run.stop) == (0, len(plan.layer_calls)) else \
        f"self.layers[{run.start}:{run.stop}]"
    if prefetching:
        after = ", after=self" if _model_prefetches(plan) else ""  # the last layer starts the Model's own
        lines.append(f"        for layer, following in runtime.with_following(self.layers, {run.start}, {run.stop}{after}):")
        loop_args.append("following=following")
    else:
        lines.append(f"        for layer in {sliced}:")
    lines.append(f"            {', '.join(out_vars)} = layer({', '.join(loop_args)})")
    lines += [f"            {var}.append({out_vars[k]})" for k, var in lists.items()]
    for pos, call in enumerate(calls):
        for k, name in enumerate(call.outputs):
            if k in lists:
                v.names.values[name] = f"{lists[k]}[{pos}]"
    for k, name in enumerate(calls[-1].outputs):
        if k in carried:
            v.names.values[name] = out_vars[k]
    return lines


def _model_prefetches(plan: Plan) -> bool:
    """Whether the Model has gather groups its last layer starts (``Model.prefetch``)."""
    return any(g.prefetch_after >= 0 for g in plan.gather_groups)


def _member(offsets: list[int], k: int) -> tuple[int, int]:
    """Output position ``k`` of an iteration as (its layer, that layer's output)."""
    m = max(n for n in range(len(offsets)) if offsets[n] <= k)
    return m, k - offsets[m]


def _period_lines(plan: Plan, run: LayerRunPlan, v: _Vars) -> list[str]:
    """A loop of ``run.period`` layers per iteration (``for i in range(0, 8, 2):``), each layer called
    as ``self.layers[i + m]`` with its arguments as ``run.wiring`` says. A variable is rebound when
    the value it holds is read by no later layer of the iteration (the residual stream stays ``x``)."""
    p = run.period
    calls: list[LayerCallPlan] = [c for c in plan.layer_calls if run.start <= c.index < run.stop]
    blocks = {b.name: b for b in plan.blocks}
    first = calls[:p]
    members = [blocks[c.block] for c in first]
    kinds = ", ".join(c.block for c in first)
    lines = [f"        # ---- layers {run.start}-{run.stop - 1}: {kinds} in turn"]
    slots = [(m, j) for m, c in enumerate(first) for j in range(len(c.inputs))]
    source = dict(zip(slots, run.wiring))  # (layer, argument) -> (-1, input) or (layer, output)
    inputs = {w[1]: first[m].inputs[j] for (m, j), w in source.items() if w[0] == -1}
    offsets = [sum(len(c.outputs) for c in first[:m]) for m in range(p)]
    position = {(m, k): offsets[m] + k for m, c in enumerate(first) for k in range(len(c.outputs))}
    carried = {j: k for k, j in run.carry}  # input -> output position feeding it
    into = {k: j for k, j in run.carry}

    def read_after(key: tuple[int, int], m: int) -> bool:
        """Whether a layer after layer ``m`` of the iteration reads ``key``, or the loop keeps it."""
        if key[0] >= 0 and position[key] in into:
            return True  # a carried output is the next iteration's input
        return any(w == key for (n, _), w in source.items() if n > m)

    holds: dict[str, tuple[int, int]] = {}  # loop variable -> what it holds: (-1, input) or (layer, output)
    var_of: dict[tuple[int, int], str] = {}
    for j in sorted(carried):
        k = carried[j]
        m, _ = _member(offsets, k)
        base = members[m].output_names[k - offsets[m]]
        var = v.reusable(inputs[j], list(holds))
        if var is None:
            var = v.fresh(base)
            lines.append(f"        {var} = {v.names.values[inputs[j]]}")
        holds[var], var_of[(-1, j)] = (-1, j), var
    for j, value in inputs.items():
        var_of.setdefault((-1, j), v.names.values[value])
    lists = {}
    for k in run.collected:
        m, out = _member(offsets, k)
        lists[k] = v.fresh(f"{block_local_names(members[m], plan)[members[m].outputs[out]]}_per_layer")
    lines += [f"        {var} = []" for var in lists.values()]
    lines.append(f"        for i in range({run.start}, {run.stop}, {p}):")
    prefetching = bool(plan.gather_groups)
    for m, (call, block) in enumerate(zip(first, members)):
        args = [var_of[source[(m, j)]] for j in range(len(call.inputs))]
        if prefetching:
            after = f"i + {m + 1}"
            args.append(f"following=self.layers[{after}]" if m + 1 < p else
                        f"following=self.layers[{after}] if {after} < len(self.layers) else "
                        + ("self" if _model_prefetches(plan) else "None"))
        targets: list[str] = []
        for k, base in enumerate(block.output_names):
            key, var = (m, k), None
            if position[key] in into:  # the loop's variable, unless what it holds is still to be read
                var = var_of[(-1, into[position[key]])]
                var = None if var in targets or read_after(holds[var], m) else var
            if var is None and base == "x":  # the residual stream rebinds a variable no later layer reads
                free = [var_of[source[(m, j)]] for j in range(len(call.inputs))]
                var = next((f for f in free if f in holds and f not in targets and not read_after(holds[f], m)), None)
            if var is None:
                var = v.fresh(block_local_names(block, plan)[block.outputs[k]])
            targets.append(var)
        lines.append(f"            {', '.join(targets)} = self.layers[i{f' + {m}' if m else ''}]({', '.join(args)})")
        for k, var in enumerate(targets):
            holds[var], var_of[(m, k)] = (m, k), var
            if position[(m, k)] in lists:
                lines.append(f"            {lists[position[(m, k)]]}.append({var})")
    late = [(var_of[(-1, j)], var_of[_member(offsets, k)]) for k, j in run.carry
            if var_of[(-1, j)] != var_of[_member(offsets, k)]]  # carried outputs whose variable was still needed
    if late:
        lines.append(f"            {', '.join(a for a, _ in late)} = {', '.join(b for _, b in late)}")
    for t in range(len(calls) // p):
        outs = [o for c in calls[t * p:(t + 1) * p] for o in c.outputs]
        for k, name in enumerate(outs):
            if k in lists:
                v.names.values[name] = f"{lists[k]}[{t}]"
    last = [o for c in calls[-p:] for o in c.outputs]
    for k, j in run.carry:
        v.names.values[last[k]] = var_of[(-1, j)]
    return lines


def forward_lines(plan: Plan) -> list[str]:
    """``def forward(self, tokens, targets)`` of the Model, returning the loss."""
    member = {n: c.index for c in plan.layer_calls for n in c.nodes}
    lines = ["    def forward(self, tokens, targets):"]
    values = {s.node: attr_path("self", s.name) for s in (*plan.params, *plan.buffers)}
    readers: dict[str, int] = {}
    for node in plan.nodes:
        if node.name not in member:
            for a in node.args:
                readers[a] = readers.get(a, 0) + 1
    for c in plan.layer_calls:
        for a in set(c.inputs):
            readers[a] = readers.get(a, 0) + 1
    for node in plan.nodes:
        if node.op == "input":
            values[node.name] = identifier(node.name)
            lines.append(f"        # {node.name}: {shape_text(node.local_shape)} [{node.sbp_out}]")
    names = Names(values)
    v = _Vars(names, readers, {identifier(n.name) for n in plan.nodes if n.name not in member})
    group = None
    own = {m: g for g in plan.gather_groups if g.layer < 0 for m in g.nodes}  # the Model's gather groups
    nodes = {n.name: n for n in plan.nodes}
    for kind, item in _order(plan, member):
        if kind == "node" and item.name in own:
            g = own[item.name]
            if item.name == g.nodes[0]:
                heading = layer_group(item.layer)
                if heading != group or group is None:
                    group = heading
                    lines.append(f"        # ---- {comment(heading or 'model')}")
                lines += gather_lines(g, names, {m: identifier(m) for m in g.nodes}, nodes)
            continue
        if kind == "run":
            lines += _period_lines(plan, item, v) if item.period > 1 else _run_lines(plan, item, v)
            group = None
            continue
        heading = layer_group(item.layer)
        if heading != group or group is None:
            group = heading
            lines.append(f"        # ---- {comment(heading or 'model')}")
        lines += node_lines(item, names, identifier(item.name), {}, "        ")
    lines.append(f"        return {names.values[plan.output]}")
    return lines
