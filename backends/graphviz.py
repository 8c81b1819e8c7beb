"""Graphviz emitter: Plan -> DOT text (and SVG/PNG when the ``dot`` binary is present).

One box per op, coloured by its SBP signature (input layouts -> output layout; a parameter by its
layout stored and used), with a legend mapping each colour to its signature and giving the plan's
step time and memory per device. Boxing nodes are drawn as the edges they are: red, labelled with
each collective, its mesh axis and the bytes it hands over per device. Repeated layers are folded:
the layers of one distinct block (``Plan.blocks``, found by passes/blocks.py) are drawn once, as a
box saying how many layers run it, and the residual stream's hand-over to the next layer is one
dashed edge, so a 32-layer model fits on one screen (``fold=False`` draws every layer).
Colours are assigned in order of first appearance, so two plans of one model and strategy look alike.
"""

from __future__ import annotations

import html
import shutil
import subprocess
from pathlib import Path

from ..passes.plan import NodePlan, Plan
from .plan_summary import fmt_bytes, fmt_seconds, node_rows
from .text import layer_group

# ColorBrewer Set3 (12 classes) then Pastel1: pale enough for black text
PALETTE = ("#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5", "#d9d9d9",
           "#bc80bd", "#ccebc5", "#ffed6f", "#fbb4ae", "#b3cde3", "#decbe4", "#fed9a6", "#e5d8bd", "#f2f2f2")


def _q(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def signature(node: NodePlan, params: dict) -> str:
    """The key a node is coloured by: an op's input and output layouts, a parameter's stored and used
    (``params``: the plan's ParamPlans by node)."""
    if node.op == "param":
        p = params[node.name]
        return f"param [{p.sbp}]" + ("" if p.used == p.sbp else f" used [{p.used}]")
    if not node.sbp_in:
        return f"[{node.sbp_out}]"
    return ", ".join(f"[{s}]" for s in node.sbp_in) + f" -> [{node.sbp_out}]"


def _ranges(layers: tuple[int, ...]) -> str:
    out, start = [], None
    for i, k in enumerate(layers):
        if start is None:
            start = k
        if i + 1 == len(layers) or layers[i + 1] != k + 1:
            out.append(str(start) if start == k else f"{start}-{k}")
            start = None
    return ", ".join(out)


def representatives(plan: Plan) -> tuple[dict[str, str], dict[str, str]]:
    """Folding: every node of a layer mapped to the same node of its block's first layer (params by
    canonical name), and the cluster label of each drawn block's first layer."""
    rep: dict[str, str] = {}
    labels: dict[str, str] = {}
    blocks = {b.name: b for b in plan.blocks}
    firsts = {b.name: next(c for c in plan.layer_calls if c.index == b.layers[0]) for b in plan.blocks}
    by_canonical = {p.name: p.node for p in plan.params}
    for call in plan.layer_calls:
        block, first = blocks[call.block], firsts[call.block]
        labels[first.prefix] = f"{block.name} x{len(block.layers)} (layers {_ranges(block.layers)})"
        for node, mine in zip(first.nodes, call.nodes):
            rep[mine] = node
        for p in plan.params:
            if p.name.startswith(call.prefix):
                rep[p.node] = by_canonical.get(first.prefix + p.name[len(call.prefix):], p.node)
    return rep, labels


def _steps(node: NodePlan) -> str:
    return "\n".join(f"{c.collective} axis {c.axis} {fmt_bytes(c.payload_bytes.value)}"
                     for _, cs in node.boxing for c in cs) or "local"


def _legend(plan: Plan, colours: dict[str, str], counts: dict[str, int]) -> str:
    t = dict(plan.totals)
    head = [f"step {fmt_seconds(t['step_time'].value)} (compute {fmt_seconds(t['compute_time'].value)}, "
            f"comm {fmt_seconds(t['comm_time'].value)})",
            f"memory {fmt_bytes(t['memory_per_device'].value)} per device of {fmt_bytes(plan.device_memory)}"
            + ("" if plan.fits else " (does not fit)")]
    rows = [f'<TR><TD COLSPAN="2" ALIGN="LEFT">{html.escape(line)}</TD></TR>' for line in head]
    rows += [f'<TR><TD BGCOLOR="{colour}" WIDTH="24"></TD><TD ALIGN="LEFT">{html.escape(sig)} ({counts[sig]})</TD></TR>'
             for sig, colour in colours.items()]
    rows.append('<TR><TD BGCOLOR="red" WIDTH="24"></TD>'
                '<TD ALIGN="LEFT">boxing: collective, axis, bytes per device</TD></TR>')
    table = '<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="3">' + "".join(rows) + "</TABLE>"
    return f"  legend [shape=plaintext, fontsize=9, label=<{table}>];"


def plan_to_dot(plan: Plan, *, fold: bool = True) -> str:
    mesh = "x".join(map(str, plan.mesh))
    lines = [
        "digraph plan {",
        "  rankdir=TB; newrank=true; node [shape=box, style=\"rounded,filled\", fontname=Helvetica, fontsize=10];",
        "  edge [fontname=Helvetica, fontsize=8, color=\"#555555\"];",
        f"  label={_q(f'{plan.spec_name}: {plan.strategy} on mesh {mesh} ({plan.hardware}), B={plan.batch}, T={plan.seq}')};",  # noqa: E501
        "  labelloc=t; fontname=Helvetica;",
    ]
    rep, labels = representatives(plan) if fold else ({}, {})
    nodes = {n.name: n for n in plan.nodes}
    drawn = [n for n in plan.nodes if n.op != "boxing" and rep.get(n.name, n.name) == n.name]
    params = {p.node: p for p in plan.params}
    colours: dict[str, str] = {}
    counts: dict[str, int] = {}
    for n in plan.nodes:
        if n.op != "boxing":
            key = signature(n, params)
            colours.setdefault(key, PALETTE[len(colours) % len(PALETTE)])
            counts[key] = counts.get(key, 0) + 1
    clusters: dict[str, list[str]] = {}
    rows = node_rows(plan)
    for n in drawn:
        key = signature(n, params)
        flops = f"\n{n.flops.value:.3g} FLOP" if n.flops.value else ""
        if n.op != "param" and rows[n.name].comm:  # collectives inside a variant's call (ep's all_to_all)
            flops += "".join(f"\n{k} x{c.calls} {fmt_bytes(c.payload_bytes)}" for k, c in sorted(rows[n.name].comm.items()))
        shape = ", shape=note, fontsize=8" if n.op == "param" else ""
        label = f"{n.name}\n{key}" if n.op == "param" else f"{n.name}\n{n.op}  {key}{flops}"
        group = layer_group(n.layer)
        prefix = next((p for p in labels if n.layer.startswith(p)), None)
        cluster = labels[prefix] if prefix else group
        clusters.setdefault(cluster, []).append(f"  {_q(n.name)} [label={_q(label)}, fillcolor={_q(colours[key])}{shape}];")
    for i, (group, decls) in enumerate(clusters.items()):
        if not group:
            lines += decls
            continue
        lines += [f"  subgraph cluster_{i} {{", f"    label={_q(group)}; style=rounded; color=\"#999999\";"]
        lines += ["  " + d for d in decls]
        lines.append("  }")
    order = {n.name: i for i, n in enumerate(plan.nodes)}
    edges: dict[tuple[str, str], tuple[str, str]] = {}
    for n in plan.nodes:
        if n.op == "boxing":
            continue
        for arg in n.args:
            src, steps = arg, []
            while nodes[src].op == "boxing":  # a boxing node is the edge it labels
                steps.insert(0, _steps(nodes[src]))
                src = nodes[src].args[0]
            a, b = rep.get(src, src), rep.get(n.name, n.name)
            if a == b:
                continue
            style = ""
            if steps:
                style = f"label={_q(chr(10).join(steps))}, color=red, fontcolor=red"
            elif nodes[src].op == "param":
                style = "style=dashed, arrowsize=0.5"
            if (src, n.name) != (a, b) and order[a] > order[b]:  # a folded layer's output into the next layer
                style = (style + ", " if style else "") + "style=dashed, constraint=false, xlabel=\"next layer\""
            edges.setdefault((a, b), (style, ""))
    for (a, b), (style, _) in edges.items():
        lines.append(f"  {_q(a)} -> {_q(b)}" + (f" [{style}];" if style else ";"))
    if plan.output_boxing:
        label = "\n".join(f"{c.collective} axis {c.axis} {fmt_bytes(c.payload_bytes.value)}" for c in plan.output_boxing)
        lines.append("  \"result\" [shape=ellipse, label=\"loss (logged)\", fillcolor=\"#ffffff\"];")
        lines.append(f"  {_q(plan.output)} -> \"result\" [label={_q(label)}, color=red, fontcolor=red];")
    lines.append(_legend(plan, colours, counts))
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_svg(dot_text: str, out_path: Path) -> bool:
    """Render with the ``dot`` binary (format from the suffix: svg, png, pdf).

    Returns False, writing nothing, when graphviz is not installed.
    """
    if shutil.which("dot") is None:
        return False
    fmt = out_path.suffix.lstrip(".") or "svg"
    result = subprocess.run(["dot", f"-T{fmt}", "-o", str(out_path)], input=dot_text, text=True,
                            capture_output=True, check=False)
    if result.returncode != 0:  # a format dot lacks, or a folder that does not exist: the user's to fix
        raise ValueError(f"{out_path}: graphviz dot could not write it ({result.stderr.strip()}); "
                         "use .svg, .png, .pdf or .dot in an existing folder")
    return True
