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

import re

from ..passes.plan import BlockPlan, GatherGroupPlan, Plan
from .emit_forward import forward_lines, gather_lines, shards_text
from .emit_ops import Names, attr_path, block_local_names, node_lines, shape_text
from .text import comment, fmt_bytes, identifier, layer_group, literal


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
        lines.append(f"        # {comment(local)} {shape_text(tuple(map(str, p.shape)))}: stored [{p.sbp}]{used}, "
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


FOLLOWING = ["        if following is not None:  # the next layer's gather groups travel while this layer computes",
             "            following.prefetch()"]


def _prefetch_method(groups: list[GatherGroupPlan], names: Names, nodes: dict, whose: str = "this layer") -> list[str]:
    """``prefetch()``: start this layer's gather groups ahead of its forward (runtime.prefetch_group),
    called by the layer before it, as FSDP2 prefetches the next module's all-gather (the Model's:
    those of its parameters used after the layers, called by the last layer)."""
    lines = ["", "    def prefetch(self):",
             f'        """Start the gather groups of {whose} now; its forward\'s runtime.gather_group takes them."""']
    for g in groups:
        lines.append(f"        runtime.prefetch_group({shards_text(g, names, nodes)}, self.mesh, "
                     f"axis={g.steps[0].axis}, dims={literal(g.dims)})")
    return lines if groups else [*lines, "        return  # this layer gathers nothing"]


def _block_class(block: BlockPlan, plan: Plan) -> list[str]:
    head = f"layers.{block.layers[0]}."
    nodes = {n.name: n for n in plan.nodes}
    local = block_local_names(block, plan)
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
    names = Names(dict(local), rename)
    for name in (*block.params, *block.buffers):
        state = next(s for s in (*plan.params, *plan.buffers) if s.name == name)
        names.values[state.node] = attr_path("self", name.removeprefix(head))
        rename[state.node] = identifier(name.removeprefix(head))
    names = Names(names.values, rename)
    prefetching = bool(plan.gather_groups)  # every layer's forward may prefetch the next one's groups
    inputs = [*block.inputs, "following=None"] if prefetching else list(block.inputs)
    lines += ["", f"    def forward(self, {', '.join(inputs)}):"]
    own = [g for g in plan.gather_groups if g.layer == block.layers[0]]
    prefetch = _prefetch_method(own, names, nodes) if prefetching else []
    gathers = {name: g for g in own for name in g.nodes}
    if prefetching and not own:
        lines += FOLLOWING
    group = None
    for name in block.nodes:
        node = nodes[name]
        if name in gathers:
            if name == gathers[name].nodes[0]:
                lines += gather_lines(gathers[name], names, local, nodes)
                if gathers[name] is own[-1]:
                    lines += FOLLOWING
            continue
        heading = re.sub(r"^layers\.\d+\.?", "", layer_group(node.layer))
        if heading != group:
            group = heading
            lines.append(f"        # ---- {comment(heading or 'layer')}")
        constants = {attr: f"self.{const[(n, attr)]}" for n, attr in const if n == name}
        lines += node_lines(node, names, local[name], constants, "        ")
    lines.append(f"        return {', '.join(local[o] for o in block.outputs)}")
    lines += prefetch
    refresh = _refresh(plan, list(block.buffers), head)
    if refresh:
        lines += ["", "    @torch.no_grad()", "    def refresh_state(self):",
                  '        """State derived from this layer\'s parameters (after every optimizer step)."""', *refresh]
    return lines


def _periodic(plan: Plan, blocks: dict[str, BlockPlan]) -> dict[int, tuple[int, tuple[str, ...]]]:
    """Loops of ``period`` > 1 whose layers are plain instances of the same blocks in every
    iteration: start -> (stop, the blocks of one iteration), made as one comprehension."""
    calls = {c.index: c for c in plan.layer_calls}
    out = {}
    for run in plan.layer_runs:
        kinds = tuple(calls[i].block for i in range(run.start, run.start + run.period))
        if run.period > 1 and all(calls[i].block == kinds[(i - run.start) % run.period]
                                  and not blocks[calls[i].block].constants for i in range(run.start, run.stop)):
            out[run.start] = (run.stop, kinds)
    return out


def _layer_list(plan: Plan) -> list[str]:
    """``self.layers``: each layer an instance of its block, consecutive plain ones as one range, a
    repeating pattern of plain ones as one comprehension over its iterations."""
    blocks = {b.name: b for b in plan.blocks}
    periodic = _periodic(plan, blocks)
    lines = ["        self.layers = torch.nn.ModuleList(["]
    items: list[tuple[str, list[int]]] = []
    skip = 0
    for call in plan.layer_calls:
        if call.index < skip:
            continue
        if call.index in periodic:
            stop, kinds = periodic[call.index]
            items.append((", ".join(kinds), [call.index, stop]))
            skip = stop
            continue
        block = blocks[call.block]
        if items and items[-1][0] == call.block and not block.constants and items[-1][1][-1] + 1 == call.index:
            items[-1][1].append(call.index)
        else:
            items.append((call.block, [call.index]))
    for name, indices in items:
        if name not in blocks:  # a repeating pattern
            kinds = name.split(", ")
            lines.append(f'            *(block(f"layers.{{i + m}}.", seed, mesh) for i in range({indices[0]}, {indices[1]}, '
                         f"{len(kinds)}) for m, block in enumerate(({name}))),")
            continue
        block = blocks[name]
        if len(indices) > 1:
            lines.append(f'            *({name}(f"layers.{{i}}.", seed, mesh) for i in range({indices[0]}, '
                         f"{indices[-1] + 1})),")
            continue
        position = block.layers.index(indices[0])
        local = block_local_names(block, plan)
        kwargs = "".join(f", {identifier(f'{local[node]}_{attr}')}={literal(values[position])}"
                         for node, attr, values in block.constants)
        lines.append(f'            {name}("layers.{indices[0]}.", seed, mesh{kwargs}),')
    return [*lines, "        ])"]


def model_lines(plan: Plan) -> list[str]:
    """The block classes and the Model class."""
    lines = []
    for block in plan.blocks:
        lines += [*_block_class(block, plan), "", ""]
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
    lines += ["", *forward_lines(plan)]
    ahead = [g for g in plan.gather_groups if g.prefetch_after >= 0]
    if ahead:
        nodes = {n.name: n for n in plan.nodes}
        values = {s.node: attr_path("self", s.name) for s in plan.params}
        lines += _prefetch_method(ahead, Names(values), nodes, "the Model's parameters used after the layers")
    if derived or own_refresh:
        lines += ["", "    @torch.no_grad()", "    def refresh_state(self):",
                  '        """State derived from parameters; the training loop calls this after every step."""']
        if len(derived) == len(plan.layer_calls):
            lines += ["        for layer in self.layers:", "            layer.refresh_state()"]
        elif derived:
            lines += [f"        for i in {literal(tuple(derived))}:", "            self.layers[i].refresh_state()"]
        lines += own_refresh
    return lines
