"""Spelling one planned node as program text, shared by the block classes and the Model's forward.

A boxing node becomes its collectives (each commented with the plan decision behind it), an op
its shard call with the local shape and SBP in a comment; names in the plan's reasons are
rewritten to the names the method uses.
"""

from __future__ import annotations

import keyword
import re

from ..passes.plan import BlockPlan, NodePlan, Plan
from ..passes.sbp import Split, parse_sbp
from .text import comment, fmt_bytes, identifier, literal


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


def shape_text(dims: tuple[str, ...]) -> str:
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
        size, axes, *chunks = value["shard_start"]
        extra = ", chunks=True" if chunks else ""  # a dim that does not divide: torch.chunk's shares
        return f"self.mesh.shard_range({int(size)}, {literal(tuple(int(a) for a in axes))}{extra})[0]"
    return literal(value)


class Names:
    """Variable names of one method, and the renaming of plan names in its comments."""

    def __init__(self, values: dict[str, str], rename: dict[str, str] | None = None) -> None:
        self.values = values
        self.rename = rename or {}
        words = sorted(self.rename, key=len, reverse=True)
        self.pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b") if words else None

    def text(self, s: str) -> str:
        s = comment(s)
        return self.pattern.sub(lambda m: self.rename[m.group(1)], s) if self.pattern else s


def node_lines(node: NodePlan, names: Names, var: str, constants: dict[str, str], indent: str) -> list[str]:
    names.values[node.name] = var
    if node.op == "boxing":
        ((arg, steps),) = node.boxing
        current, out = names.values[arg], []
        for c in steps:
            out.append(f"{indent}# plan: {c.src} -> {c.dst} on mesh axis {c.axis} ({c.group_size} devices), "
                       f"{c.collective}, {fmt_bytes(c.payload_bytes.value)}: {names.text(c.reason)}")
            out.append(f"{indent}{var} = {_step_call(c, current)}  # {shape_text(node.local_shape)} [{node.sbp_out}]"
                       if c is steps[-1] else f"{indent}{var} = {_step_call(c, current)}")
            current = var
        return out or [f"{indent}{var} = {current}"]
    args = [names.values[a] for a in node.args]
    args += [f"{k}={constants.get(k) or _attr_value(v)}" for k, v in node.local_attrs]
    call = f"{node.call}({', '.join(args)})"
    note = f"  # {shape_text(node.local_shape)} [{node.sbp_out}]"
    if node.call != f"ops.{node.op}":
        note += f" {comment(node.op)} as a shard ({', '.join(s for s in node.splits if s)})"
    if node.partial_scale != "1":
        call = f"{call} * ({node.partial_scale})"
        note = (f"  # [{node.sbp_out}]: this device's mean over its share of the batch, times that share, "
                "is a partial sum of the global mean")
    return [f"{indent}{var} = {call}{note}"]


def block_local_names(block: BlockPlan, plan: Plan) -> dict[str, str]:
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
