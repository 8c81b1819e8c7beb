"""The program's model: one class per distinct block, and the Model that loops over the layers.

Reads the Plan's ``blocks``, ``layer_calls`` and ``layer_runs`` (passes/blocks.py decides them) and
spells them: a block's class holds one layer's shards under the spec's names below ``layers.i``
and runs that layer's ops, each line commented with its local shape and SBP and each collective
with the plan decision behind it; the Model holds the model-level parameters and
``self.layers = torch.nn.ModuleList(...)``, so ``state_dict()`` keys are the canonical names
(``layers.0.attention.wq``), as in the eager module. A table shared by several layers is the
Model's, passed to each layer's forward: one tensor, not a copy per layer.
"""

from __future__ import annotations

import heapq
import keyword
import re

from ..passes.plan import BlockPlan, LayerCallPlan, LayerRunPlan, NodePlan, Plan
from ..passes.sbp import Split, parse_sbp
from .text import comment, fmt_bytes, identifier, layer_group, literal


def attr_path(root: str, dotted: str) -> str:
    """``model`` + ``layers.0.attention.wq`` -> ``model.layers[0].attention.wq``."""
    out = root
    for part in dotted.split("."):
        if part.isdigit():
            out += f"[{part}]"
        elif part.isidentifier() and not keyword.iskeyword(part):
            out += f".{part}"
        else:
            out = f"getattr({out}, {part!r})"
    return out


def _shape(dims: tuple[str, ...]) -> str:
    return "(" + ", ".join(dims) + ")"


def _step_call(c, value: str) -> str:
    """The runtime call of one forward boxing step (each with its dual in the backward)."""
    src, dst = parse_sbp(c.src), parse_sbp(c.dst)
    where = f"self.mesh, axis={c.axis}"
    if c.collective == "all_reduce":
        return f"runtime.all_reduce({value}, {where})"
    if c.collective == "all_gather":
        return f"runtime.all_gather({value}, {where}, dim={src.dim})"
    if c.collective == "reduce_scatter":
        return f"runtime.reduce_scatter({value}, {where}, dim={dst.dim})"
    if c.collective == "all_to_all":
        return f"runtime.all_to_all({value}, {where}, src_dim={src.dim}, dst_dim={dst.dim})"
    if isinstance(dst, Split):
        return f"runtime.slice_local({value}, {where}, dim={dst.dim})"
    return f"runtime.to_partial({value}, {where})"


def _attr_value(value) -> str:
    """A shard call's argument: rank-dependent values are spelled as mesh lookups, the rest as literals."""
    if isinstance(value, dict) and "mesh" in value:
        return "self.mesh"
    if isinstance(value, dict) and "shard_start" in value:
        size, axes = value["shard_start"]
        return f"self.mesh.shard_range({int(size)}, {literal(tuple(int(a) for a in axes))})[0]"
    return literal(value)


class _Names:
    """Variable names of one method, and the renaming of plan names in its comments."""

    def __init__(self, values: dict[str, str], rename: dict[str, str] | None = None) -> None:
        self.values = values
        self.rename = rename or {}
        words = sorted(self.rename, key=len, reverse=True)
        self.pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b") if words else None

    def text(self, s: str) -> str:
        s = comment(s)
        return self.pattern.sub(lambda m: self.rename[m.group(1)], s) if self.pattern else s


def _node_lines(node: NodePlan, names: _Names, var: str, constants: dict[str, str], indent: str) -> list[str]:
    names.values[node.name] = var
    if node.op == "boxing":
        ((arg, steps),) = node.boxing
        current, out = names.values[arg], []
        for c in steps:
            out.append(f"{indent}# plan: {c.src} -> {c.dst} on mesh axis {c.axis} ({c.group_size} devices), "
                       f"{c.collective}, {fmt_bytes(c.payload_bytes.value)}: {names.text(c.reason)}")
            out.append(f"{indent}{var} = {_step_call(c, current)}  # {_shape(node.local_shape)} [{node.sbp_out}]"
                       if c is steps[-1] else f"{indent}{var} = {_step_call(c, current)}")
            current = var
        return out or [f"{indent}{var} = {current}"]
    args = [names.values[a] for a in node.args]
    args += [f"{k}={constants.get(k) or _attr_value(v)}" for k, v in node.local_attrs]
    call = f"{node.call}({', '.join(args)})"
    note = f"  # {_shape(node.local_shape)} [{node.sbp_out}]"
    if node.call != f"ops.{node.op}":
        note += f" {comment(node.op)} as a shard ({', '.join(s for s in node.splits if s)})"
    if node.partial_scale != "1":
        call = f"{call} * ({node.partial_scale})"
        note = (f"  # [{node.sbp_out}]: this device's mean over its share of the batch, times that share, "
                "is a partial sum of the global mean")
    return [f"{indent}{var} = {call}{note}"]


def _submodules(root: str, dotted: str, made: set[str]) -> list[str]:
    """Lines making the plain containers above ``dotted`` (``attention``, ``attention.norm``)."""
    parts = dotted.split(".")[:-1]
    lines = []
    for k in range(1, len(parts) + 1):
        path = ".".join(parts[:k])
        if path not in made and path != "layers":
            made.add(path)
            lines.append(f"        {attr_path(root, path)} = torch.nn.Module()")
    return lines


def _state(plan: Plan, names: list[str], buffers: list[str], prefix: str, name_expr) -> list[str]:
    """__init__ lines of parameters ``names`` and buffers ``buffers`` (canonical names), stored under
    their names with ``prefix`` removed; ``name_expr`` spells a canonical name in the call."""
    params = {p.name: p for p in plan.params}
    bufs = {b.name: b for b in plan.buffers}
    made: set[str] = set()
    lines = []
    for name in names:
        p, local = params[name], name.removeprefix(prefix)
        used = "" if p.used == p.sbp else f", used as [{p.used}]"
        lines += _submodules("self", local, made)
        lines.append(f"        # {comment(local)} {_shape(tuple(map(str, p.shape)))}: stored [{p.sbp}]{used}, "
                     f"{fmt_bytes(p.bytes_per_device.value)} per device")
        lines.append(f"        {attr_path('self', local)} = runtime.param({name_expr(local)}, {literal(p.shape)}, "
                     f"{literal(p.init)}, {p.std!r}, seed, mesh, {literal(tuple(p.sbp.split(',')))}, "
                     "seeded.init_shard)")
    for name in buffers:
        b, local = bufs[name], name.removeprefix(prefix)
        lines += _submodules("self", local, made)
        if b.init == "permutation":
            lines.append(f"        # {comment(local)}: a fixed permutation, the same on every device (state, not trained)")
            value = f"seeded.init_full({name_expr(local)}, {literal(b.shape)}, 'permutation', 0.0, seed)"
        else:
            lines.append(f"        # {comment(local)}: {b.op}({comment(b.source.removeprefix(prefix))}), "
                         "recomputed after every optimizer step")
            value = f"torch.zeros({literal(b.shape)})"  # the rule reads its previous value
        owner, _, leaf = local.rpartition(".")
        lines.append(f"        {attr_path('self', owner) if owner else 'self'}.register_buffer({leaf!r}, "
                     f"{value}.to(mesh.device))")
    return lines


def _refresh(plan: Plan, buffers: list[str], prefix: str) -> list[str]:
    bufs = {b.name: b for b in plan.buffers}
    lines = []
    for name in buffers:
        b = bufs[name]
        if b.init == "derived":
            attr = attr_path("self", name.removeprefix(prefix))
            lines.append(f"        {attr}.copy_(ops.{b.op}({attr_path('self', b.source.removeprefix(prefix))}, {attr}))")
    return lines


def _local_names(block: BlockPlan, plan: Plan) -> dict[str, str]:
    """The first layer's node names -> names inside the block (``layers_0_attention_q`` -> ``attention_q``)."""
    first = next(c for c in plan.layer_calls if c.index == block.layers[0])
    out = dict(zip(first.inputs, block.inputs))
    nodes = {n.name: n for n in plan.nodes}
    head = f"layers_{block.layers[0]}_"
    for name in block.nodes:
        node = nodes[name]
        if name.startswith(head):
            out[name] = name.removeprefix(head)
        elif node.op == "boxing" and name.startswith(node.args[0]):
            out[name] = out.get(node.args[0], node.args[0]) + name[len(node.args[0]):]
        else:
            out[name] = name
    return {k: identifier(v) for k, v in out.items()}


def _block_class(block: BlockPlan, plan: Plan) -> list[str]:
    head = f"layers.{block.layers[0]}."
    nodes = {n.name: n for n in plan.nodes}
    local = _local_names(block, plan)
    const = {(node, attr): identifier(f"{local[node]}_{attr}") for node, attr, _ in block.constants}
    spec = ", ".join(f"'{comment(s)}'" for s in block.spec_blocks)
    layers = ", ".join(map(str, block.layers))
    args = "".join(f", {v}" for v in const.values())
    lines = [f"class {block.name}(torch.nn.Module):",
             f'    """Spec block {spec}, run by layer(s) {layers}: this rank\'s shards of one layer, under the',
             '    names below layers.i, and its forward."""', "",
             f"    def __init__(self, prefix, seed, mesh{args}):", "        super().__init__()", "        self.mesh = mesh"]
    lines += _state(plan, list(block.params), list(block.buffers), head, lambda name: f"prefix + {name!r}")
    for (node, attr), var in const.items():
        lines.append(f"        self.{var} = {var}  # {comment(attr)} of {local[node]}: differs by layer")
    rename = dict(local)
    names = _Names(dict(local), rename)
    for name in (*block.params, *block.buffers):
        state = next(s for s in (*plan.params, *plan.buffers) if s.name == name)
        names.values[state.node] = attr_path("self", name.removeprefix(head))
        rename[state.node] = identifier(name.removeprefix(head))
    names = _Names(names.values, rename)
    lines += ["", f"    def forward(self, {', '.join(block.inputs)}):"]
    group = None
    for name in block.nodes:
        node = nodes[name]
        heading = re.sub(r"^layers\.\d+\.?", "", layer_group(node.layer))
        if heading != group:
            group = heading
            lines.append(f"        # ---- {comment(heading or 'layer')}")
        constants = {attr: f"self.{const[(n, attr)]}" for n, attr in const if n == name}
        lines += _node_lines(node, names, local[name], constants, "        ")
    lines.append(f"        return {', '.join(local[o] for o in block.outputs)}")
    refresh = _refresh(plan, list(block.buffers), head)
    if refresh:
        lines += ["", "    @torch.no_grad()", "    def refresh_state(self):",
                  '        """State derived from this layer\'s parameters (after every optimizer step)."""', *refresh]
    return lines


def _layer_list(plan: Plan) -> list[str]:
    """``self.layers``: each layer an instance of its block, consecutive plain ones as one range."""
    blocks = {b.name: b for b in plan.blocks}
    items: list[tuple[str, list[int]]] = []
    for call in plan.layer_calls:
        block = blocks[call.block]
        if items and items[-1][0] == call.block and not block.constants and items[-1][1][-1] + 1 == call.index:
            items[-1][1].append(call.index)
        else:
            items.append((call.block, [call.index]))
    lines = ["        self.layers = torch.nn.ModuleList(["]
    for name, indices in items:
        block = blocks[name]
        if len(indices) > 1:
            lines.append(f'            *({name}(f"layers.{{i}}.", seed, mesh) for i in range({indices[0]}, '
                         f"{indices[-1] + 1})),")
            continue
        position = block.layers.index(indices[0])
        local = _local_names(block, plan)
        kwargs = "".join(f", {identifier(f'{local[node]}_{attr}')}={literal(values[position])}"
                         for node, attr, values in block.constants)
        lines.append(f'            {name}("layers.{indices[0]}.", seed, mesh{kwargs}),')
    return [*lines, "        ])"]


def _order(plan: Plan, member: dict[str, int]) -> list[tuple[str, object]]:
    """The Model forward's statements: its own nodes and the layer runs, in plan order where the
    data allows (a stable topological order: a run goes where its first node was)."""
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


def _run_lines(plan: Plan, run: LayerRunPlan, names: _Names, readers: dict[str, int], taken: set[str]) -> list[str]:
    calls: list[LayerCallPlan] = [c for c in plan.layer_calls if run.start <= c.index < run.stop]
    blocks = sorted({c.block for c in calls}, key=[b.name for b in plan.blocks].index)
    where = f"layer {run.start}" if len(calls) == 1 else f"layers {run.start}-{run.stop - 1}"
    lines = [f"        # ---- {where}: {', '.join(blocks)}"]
    first = calls[0]
    args = [names.values[i] for i in first.inputs]
    if len(calls) == 1:
        outs = [identifier(o) for o in first.outputs]
        taken.update(outs)
        lines.append(f"        {', '.join(outs)} = self.layers[{run.start}]({', '.join(args)})")
        names.values.update(zip(first.outputs, outs))
        return lines
    block = next(b for b in plan.blocks if b.name == first.block)
    local = _local_names(block, plan)
    out_local = [local[o] for o in block.outputs]

    def fresh(base: str) -> str:
        var, k = base, 2
        while var in taken:
            var, k = f"{base}_{k}", k + 1
        taken.add(var)
        return var

    carried = dict(run.carry)
    out_vars: list[str] = []
    for k, base in enumerate(out_local):
        j = carried.get(k)
        start = first.inputs[j] if j is not None else None
        if j is not None and readers.get(start, 0) == 1 and names.values[start].isidentifier():
            out_vars.append(names.values[start])  # the loop rebinds the variable it starts from
        else:
            out_vars.append(fresh("x" if j is not None and block.inputs[j] == "x" else base))
            if j is not None:
                lines.append(f"        {out_vars[-1]} = {names.values[start]}")
    lists = {k: fresh(f"{out_local[k]}_per_layer") for k in run.collected}
    lines += [f"        {var} = []" for var in lists.values()]
    loop_args = [out_vars[k] if k is not None else names.values[first.inputs[j]]
                 for j, k in ((j, next((o for o, i in run.carry if i == j), None)) for j in range(len(first.inputs)))]
    sliced = "self.layers" if (run.start, run.stop) == (0, len(plan.layer_calls)) else \
        f"self.layers[{run.start}:{run.stop}]"
    lines.append(f"        for layer in {sliced}:")
    lines.append(f"            {', '.join(out_vars)} = layer({', '.join(loop_args)})")
    lines += [f"            {var}.append({out_vars[k]})" for k, var in lists.items()]
    for pos, call in enumerate(calls):
        for k, name in enumerate(call.outputs):
            if k in lists:
                names.values[name] = f"{lists[k]}[{pos}]"
    for k, name in enumerate(calls[-1].outputs):
        if k in carried:
            names.values[name] = out_vars[k]
    return lines


def model_lines(plan: Plan) -> list[str]:
    """The block classes and the Model class."""
    lines = []
    for block in plan.blocks:
        lines += [*_block_class(block, plan), "", ""]
    member = {n: c.index for c in plan.layer_calls for n in c.nodes}
    lines += ["class Model(torch.nn.Module):",
              '    """This rank\'s shards of the model SPEC_NAME names, and its forward with the loss."""', "",
              "    def __init__(self, mesh, seed):", "        super().__init__()", "        self.mesh = mesh"]
    own = [p.name for p in plan.params if not p.name.startswith("layers.")]
    first_layer = next((k for k, p in enumerate(plan.params) if p.name.startswith("layers.")), len(plan.params))
    before = [p.name for p in plan.params[:first_layer] if p.name in own]
    after = [name for name in own if name not in before]
    own_buffers = [b.name for b in plan.buffers if not b.name.startswith("layers.")]
    lines += _state(plan, before, [], "", literal)
    if plan.layer_calls:
        lines += _layer_list(plan)
    lines += _state(plan, after, own_buffers, "", literal)
    derived = [c.index for c in plan.layer_calls if any(
        b.init == "derived" for b in plan.buffers if b.name.startswith(c.prefix))]
    own_refresh = _refresh(plan, own_buffers, "")
    if derived or own_refresh:
        lines.append("        self.refresh_state()")
    lines += ["", "    def forward(self, tokens, targets):"]
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
            lines.append(f"        # {node.name}: {_shape(node.local_shape)} [{node.sbp_out}]")
    names = _Names(values)
    taken = {identifier(n.name) for n in plan.nodes if n.name not in member}
    group = None
    for kind, item in _order(plan, member):
        if kind == "run":
            lines += _run_lines(plan, item, names, readers, taken)
            group = None
            continue
        heading = layer_group(item.layer)
        if heading != group or group is None:
            group = heading
            lines.append(f"        # ---- {comment(heading or 'model')}")
        lines += _node_lines(item, names, identifier(item.name), {}, "        ")
    lines.append(f"        return {names.values[plan.output]}")
    if derived or own_refresh:
        lines += ["", "    @torch.no_grad()", "    def refresh_state(self):",
                  '        """State derived from parameters; the training loop calls this after every step."""']
        if len(derived) == len(plan.layer_calls):
            lines += ["        for layer in self.layers:", "            layer.refresh_state()"]
        elif derived:
            lines += [f"        for i in {literal(tuple(derived))}:", "            self.layers[i].refresh_state()"]
        lines += own_refresh
    return lines
