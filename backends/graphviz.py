"""Graphviz emitter: Plan -> DOT text (and SVG when the ``dot`` binary is present).

One box per op, grouped into a cluster per layer; parameters as small notes beside the op that
reads them; edges labelled with the local shape and SBP of the value they carry; each boxing node
a red ellipse naming its collectives, its edges red. Colours are the op table's, per op kind and
fixed, so two plans of one model look alike.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ..compiler.op_table import OP_TABLE
from ..passes.plan import Plan
from .text import layer_group


def colour(op: str) -> str:
    return OP_TABLE[op].colour if op in OP_TABLE else "#ffffff"


def _q(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _shape(dims) -> str:
    return "(" + ", ".join(dims) + ")"


def plan_to_dot(plan: Plan) -> str:
    mesh = "x".join(map(str, plan.mesh))
    lines = [
        "digraph plan {",
        "  rankdir=TB; newrank=true; node [shape=box, style=\"rounded,filled\", fontname=Helvetica, fontsize=10];",
        "  edge [fontname=Helvetica, fontsize=8, color=\"#555555\"];",
        f"  label={_q(f'{plan.spec_name}: {plan.strategy} on mesh {mesh} ({plan.hardware}), B={plan.batch}, T={plan.seq}')};",  # noqa: E501
        "  labelloc=t; fontname=Helvetica;",
    ]
    params = {p.node: p for p in plan.params}
    clusters: dict[str, list[str]] = {}
    for node in plan.nodes:
        if node.op == "param":
            continue
        flops = f"\n{node.flops.value:.3g} FLOP" if node.flops.value else ""
        if node.op == "boxing":
            steps = "\n".join(f"{c.collective} axis {c.axis}" for _, cs in node.boxing for c in cs) or "as is"
            label = f"[{node.sbp_in[0]}] -> [{node.sbp_out}]\n{steps}"
            decl = f"  {_q(node.name)} [shape=ellipse, color=red, fontcolor=red, label={_q(label)}];"
        else:
            label = f"{node.name}\n{node.op}  [{node.sbp_out}]{flops}"
            decl = f"  {_q(node.name)} [label={_q(label)}, fillcolor={_q(colour(node.op))}];"
        group = layer_group(node.layer)
        clusters.setdefault(group, []).append(decl)
    for i, (group, decls) in enumerate(clusters.items()):
        if not group:
            lines += decls
            continue
        lines += [f"  subgraph cluster_{i} {{", f"    label={_q(group)}; style=rounded; color=\"#999999\";"]
        lines += ["  " + d for d in decls]
        lines.append("  }")
    shapes = {n.name: n for n in plan.nodes}
    for node in plan.nodes:
        if node.op == "param":
            continue
        for arg in node.args:
            src = shapes[arg]
            if src.op == "param":
                p = params[arg]
                used = "" if p.used == p.sbp else f" -> [{p.used}]"
                pid = f"param:{arg}"
                note = f"{p.name}\n{_shape(map(str, p.shape))}  [{p.sbp}]{used}"
                lines.append(f"  {_q(pid)} [shape=note, fillcolor=\"#ffffff\", fontsize=8, label={_q(note)}];")
                lines.append(f"  {_q(pid)} -> {_q(node.name)} [style=dashed, arrowsize=0.5];")
                continue
            label = f"{_shape(src.local_shape)} [{src.sbp_out}]"
            attrs = ", color=red, fontcolor=red" if "boxing" in (src.op, node.op) else ""
            lines.append(f"  {_q(arg)} -> {_q(node.name)} [label={_q(label)}{attrs}];")
    if plan.output_boxing:
        label = "\n".join(f"{c.collective} axis {c.axis}" for c in plan.output_boxing)
        lines.append("  \"result\" [shape=ellipse, label=\"loss (logged)\", fillcolor=\"#ffffff\"];")
        lines.append(f"  {_q(plan.output)} -> \"result\" [label={_q(label)}, color=red, fontcolor=red];")
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
