"""Print an annotated graph as readable Python: one line per op, its analyses as a trailing comment.

The body is torch.fx's own code generation (runnable Python); each op line gets
``# (B, T, 64) S(0) -> [S(0)]  flops=2*B*T*4096`` from whatever fields of its record the passes so
far have filled, and the pass reports head the listing as ``# Constructed by ...`` lines.
"""

from __future__ import annotations

from torch import fx

from ..compiler.node_info import info
from ..compiler.shapes import shape_str
from ..passes.context import PassReport


def annotation(node: fx.Node) -> str:
    rec = info(node)
    parts = [shape_str(rec.shape)]
    if rec.sbp is not None:
        parts.append(str(rec.sbp))
    if rec.cost is not None and rec.cost.flops != 0:
        parts.append(f"flops={rec.cost.flops}")
    for b in rec.boxing:
        parts.append(f"{b.collective}@axis{b.axis} wire={b.wire}")
    if rec.fusion is not None:
        parts.append(f"fused {'+'.join(rec.fusion.replaced)} by {rec.fusion.rule}: saves {rec.fusion.bytes_saved} B")
    if rec.reason and rec.op == "boxing":
        parts.append(f"why: {rec.reason}")
    for b in rec.grad_boxing:
        parts.append(f"grad {b.src}->{b.dst} {b.collective}@axis{b.axis}")
    return "  ".join(parts)


def explain_graph(gm: fx.GraphModule, reports: list[PassReport]) -> str:
    by_name = {n.name: n for n in gm.graph.nodes}
    out = [r.render() for r in reports]
    for line in gm.code.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("torch.fx._symbolic_trace.wrap"):
            continue
        target = stripped.split(" = ", 1)[0].strip() if " = " in stripped else ""
        code = line.split(";  ")[0].rstrip()  # drop fx's "x = None" frees
        if target in by_name:
            code += "  # " + annotation(by_name[target])
        out.append(code)
    return "\n".join(out)
