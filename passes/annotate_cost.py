"""annotate_cost: attach an ``OpCost`` (sympy in B, T) to every op node's record (``cost``)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import sympy
from torch import fx

from ..compiler.lower import tensor_args
from ..compiler.node_info import info
from ..compiler.shapes import B, T
from .context import PassReport, PlanContext
from .cost import ZERO, OpCost, op_cost


def annotate_cost(gm: fx.GraphModule, ctx: PlanContext | None) -> PassReport:
    """Costs depend only on shapes, so ``ctx`` may be None (as for ``stats``)."""
    start = time.perf_counter()
    # one sympy.Add at the end: adding term by term re-flattens the growing sum each time (quadratic)
    terms: tuple[list, list, list, list] = ([], [], [], [])
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        inputs = [(info(a).shape, info(a).dtype) for a in tensor_args(node)]
        record = info(node)
        cost = op_cost(record.op, inputs, (record.shape, record.dtype), record.attrs)
        record.cost = cost
        for acc, term in zip(terms, (cost.flops, cost.bytes_read, cost.bytes_written, cost.backward_flops)):
            acc.append(term)
    total = OpCost(*(sympy.expand(sympy.Add(*acc)) for acc in terms))
    assert all(info(n).cost is not None for n in gm.graph.nodes if n.op == "call_function")
    return PassReport("annotate_cost", time.perf_counter() - start, [],
                      {"forward_flops": total.flops, "backward_flops": total.backward_flops,
                       "forward_bytes": sympy.expand(total.bytes_read + total.bytes_written)})


def flops_per_token_by(gm: fx.GraphModule, key: Callable[[fx.Node], str | None]) -> dict[str, sympy.Expr]:
    """Forward FLOPs per token (``/ (B T)``) of the annotated ``gm``, summed by ``key(node)`` (nodes
    keyed None are left out): by component for ``stats``, by sublayer for ``size_ffn``."""
    out: dict[str, sympy.Expr] = defaultdict(lambda: ZERO)
    for node in gm.graph.nodes:
        group = key(node) if info(node).cost is not None else None
        if group is not None:
            out[group] += info(node).cost.flops / (B * T)
    return {group: sympy.expand(sympy.simplify(flops)) for group, flops in out.items()}
