"""fuse: rewrite subgraphs into fused ops when the cost model says the bytes saved are worth it.

A fusion is worth it when the memory traffic it removes (intermediates that no longer round-trip
to memory) takes longer, at the hardware's memory bandwidth, than the work the fused op adds
(a recomputation) takes at its peak FLOP rate:

    bytes_saved / memory_bandwidth  >  extra_flops / peak_flops        (at the plan's B and T)

The rules are data (``RULES`` in passes/fuse_rules.py, ``GRAPH_RULES`` in fuse_graph.py): a
pattern of op kinds and how they connect, the op-table record that replaces them, and the
cost-model functions of the matched nodes giving the bytes saved and the FLOPs added. The fused op
is an ordinary op-table record, so annotate_cost's FLOP rule, choose_sbp's strategies and signature
propagation, memory accounting and the emitter treat it as any other op, on local shards. Each
decision is written into the fused node's record (``NodeInfo.fusion``) and, through build_plan,
into the Plan (``Plan.fusions``), which ``explain``
lists. ``ultraplan plan --no-fuse`` (``PlanContext.fuse = False``) turns the pass off.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import sympy
from torch import fx

from ..compiler.lower import tensor_args
from ..compiler.node_info import KEY, info
from ..compiler.op_table import OP_TABLE
from .context import PassReport, PlanContext
from .cost import ZERO, op_cost
from .fuse_graph import GRAPH_RULES, match_graph, rewrite_graph
from .fuse_rules import RULES, Rule
from .plan import Cost, FusionPlan
from .symbols import evaluate


@dataclass(frozen=True)
class Fusion:
    """One decision, kept in the fused node's record: the rule, the nodes it replaced, the bytes
    it saves and the FLOPs it adds per step (sympy in B, T)."""

    rule: str
    fused: str
    replaced: tuple[str, ...]
    bytes_saved: sympy.Expr
    extra_flops: sympy.Expr
    why: str


def _match(node: fx.Node, rule: Rule) -> list[fx.Node] | None:
    """The chain of nodes ``rule`` matches ending at ``node``, or None."""
    chain = [node]
    for i in range(len(rule.pattern) - 1, -1, -1):
        step, current = rule.pattern[i], chain[0]
        if current.op != "call_function" or info(current).op != step.op:
            return None
        if any(info(current).attrs.get(k) != v for k, v in step.attrs):
            return None
        if i == 0:
            break
        args = tensor_args(current)
        if step.via >= len(args):
            return None
        previous = args[step.via]
        if len(previous.users) != 1 and not (rule.shared and i == 1):
            return None  # its value is needed elsewhere: it must be stored anyway
        chain.insert(0, previous)
    if rule.when is not None and not rule.when([info(n) for n in chain]):
        return None
    if rule.shared and not _all_read_after(chain[0], chain[-1]):
        return None
    return chain


def _all_read_after(first: fx.Node, last: fx.Node) -> bool:
    """Every other reader of ``first`` comes after ``last`` (the fused node goes where ``last`` is)."""
    seen: set[fx.Node] = set()
    node = first.next
    while node is not last:
        seen.add(node)
        node = node.next
    return not (set(first.users) & seen)


def _placed_tables(gm: fx.GraphModule, ctx: PlanContext) -> dict[str, tuple[str, ...]]:
    """Value tables placed by ``--place``: parameter node -> its SBP per mesh axis ("S(0)", "B", ...)."""
    from .placement import is_placement, placement_pins

    out: dict[str, tuple[str, ...]] = {}
    for pattern, text in getattr(ctx, "forces", ()):
        if is_placement(text):
            out.update({name: tuple(str(e) for e in nd) for name, nd in placement_pins(gm, ctx, pattern, text).items()})
    return out


def _placed_apart(chain: list[fx.Node], placed: dict[str, tuple[str, ...]], forms: tuple[str, ...] | None) -> bool:
    """Does ``--place`` split the chain's first input (a lookup's table) in a way the fused op has no
    shard form for: a split not among ``forms``, or two different splits on two mesh axes?"""
    args = tensor_args(chain[0])
    if forms is None or not args:
        return False
    splits = {entry for entry in placed.get(args[0].name, ()) if entry != "B"}
    return len(splits) > 1 or not splits <= set(forms)


def _worth(fusion: Fusion, ctx: PlanContext) -> tuple[bool, float, float]:
    values = ctx.values()
    saved = evaluate(fusion.bytes_saved, values) / ctx.hardware.memory_bandwidth  # xreplace: subs was slow
    added = evaluate(fusion.extra_flops, values) / ctx.hardware.peak_flops["fp32"]
    return saved > added, saved, added


def _rewrite(gm: fx.GraphModule, chain: list[fx.Node], rule: Rule, fusion: Fusion) -> None:
    """The last node of ``chain`` becomes the fused op over the chain's outside arguments."""
    if rule.shared:
        _rewrite_shared(gm, chain, rule, fusion)
        return
    last = chain[-1]
    inside = set(chain)
    outside = [a for n in chain for a in tensor_args(n) if a not in inside]
    attrs: dict = {}
    for n in chain:
        attrs.update(info(n).attrs)
    if rule.keep is not None:
        attrs = {k: v for k, v in attrs.items() if k in rule.keep}
    record = info(last)
    fused = OP_TABLE[rule.fused]
    if len(chain) > 1:
        last.args, last.kwargs = (*outside,), attrs
    last.target = fused.fn
    record.op, record.attrs, record.fusion = rule.fused, attrs, fusion
    record.cost = op_cost(rule.fused, [(info(a).shape, info(a).dtype) for a in outside],
                          (record.shape, record.dtype), attrs)
    for n in reversed(chain[:-1]):
        gm.graph.erase_node(n)


def _rewrite_shared(gm: fx.GraphModule, chain: list[fx.Node], rule: Rule, fusion: Fusion) -> None:
    """``first -> last`` with ``first`` read elsewhere too: one fused node returning both stacked
    (..., 2, D), and the two replaced nodes become ``pair_part`` views of it under their own names
    (``first`` moves to just before ``last``: _match checked nothing between reads it). The fused
    node is a residual-stream value when ``first`` was (strategies pin its layout: the stacked dim
    is next to last, so the stream's dims keep their positions)."""
    first, last = chain
    outside = [a for n in chain for a in tensor_args(n) if a is not first]
    attrs = {k: v for n in chain for k, v in info(n).attrs.items()}
    if rule.keep is not None:
        attrs = {k: v for k, v in attrs.items() if k in rule.keep}
    fused_def, part_def = OP_TABLE[rule.fused], OP_TABLE["pair_part"]
    head, tail = info(first), info(last)
    last.prepend(first)
    with gm.graph.inserting_before(first):
        node = gm.graph.create_node("call_function", fused_def.fn, (*outside,), attrs, name=f"{first.name}_and_norm")
    inputs = [(info(a).shape, info(a).dtype) for a in outside]
    shape = fused_def.shape([s for s, _ in inputs], attrs)
    node.meta[KEY] = dataclasses.replace(  # in the first node's sublayer: it runs where the sum is made
        head, op=rule.fused, attrs=attrs, shape=shape, label=f"{head.label}+{tail.label}", stream=head.stream,
        differentiable=head.differentiable or tail.differentiable, fusion=fusion,
        concrete_shape=None if head.concrete_shape is None else (*head.concrete_shape[:-1], 2, head.concrete_shape[-1]),
        cost=op_cost(rule.fused, inputs, (shape, tail.dtype), attrs))
    for index, part in enumerate(chain):
        rec = info(part)
        part.target, part.args, part.kwargs = part_def.fn, (node,), {"index": index}
        cost = op_cost("pair_part", [(shape, tail.dtype)], (rec.shape, rec.dtype), {"index": index})
        rec.op, rec.attrs, rec.cost = "pair_part", {"index": index}, dataclasses.replace(cost, bytes_written=ZERO)


def fuse(gm: fx.GraphModule, ctx: PlanContext) -> PassReport:
    """Apply every rule wherever it matches and is worth it; record each decision."""
    start = time.perf_counter()
    decisions: list[str] = []
    train = ctx.mode == "train"
    if not getattr(ctx, "fuse", True):
        return PassReport("fuse", time.perf_counter() - start, ["off (--no-fuse)"])
    total = ZERO
    placed = _placed_tables(gm, ctx)
    for node in list(gm.graph.nodes):
        for rule in RULES:
            chain = _match(node, rule)
            if chain is None:
                continue
            if _placed_apart(chain, placed, rule.placed_forms):
                decisions.append(f"{rule.name} at {node.name}: kept, its table is placed (--place) in a way the fused "
                                 "op has no shard form for (one split per axis, of its rows or of its columns)")
                break
            recs = [info(n) for n in chain]
            fusion = Fusion(rule.name, rule.fused, tuple(n.name for n in chain),
                            rule.bytes_saved(recs, train), rule.extra_flops(recs, train), rule.why)
            ok, saved_s, added_s = _worth(fusion, ctx)
            verdict = "fused" if ok else "kept"
            decisions.append(f"{rule.name} at {node.name}: {verdict}, saves {fusion.bytes_saved} bytes "
                             f"({saved_s:.3g} s of memory traffic), adds {fusion.extra_flops} FLOPs "
                             f"({added_s:.3g} s)")
            if ok:
                _rewrite(gm, chain, rule, fusion)
                total += fusion.bytes_saved
            break
    for node in list(gm.graph.nodes):
        if getattr(node, "_erased", False) or node.op != "call_function":
            continue
        for grule in GRAPH_RULES:
            bound = match_graph(node, grule)
            if bound is None:
                continue
            recs = {k: info(n) for k, n in bound.items() if not k.startswith("$")}
            fusion = Fusion(grule.name, grule.outputs[0].op, tuple(bound[s.name].name for s in grule.steps),
                            grule.bytes_saved(recs, train), grule.extra_flops(recs, train), grule.why)
            ok, saved_s, added_s = _worth(fusion, ctx)
            decisions.append(f"{grule.name} at {node.name}: {'fused' if ok else 'kept'}, saves {fusion.bytes_saved} "
                             f"bytes ({saved_s:.3g} s of memory traffic), adds {fusion.extra_flops} FLOPs "
                             f"({added_s:.3g} s)")
            if ok:
                rewrite_graph(gm, bound, grule, fusion)
                total += fusion.bytes_saved
            break
    gm.graph.lint()
    gm.recompile()
    return PassReport("fuse", time.perf_counter() - start, decisions, {"bytes_saved": sympy.expand(total)})



def fusion_plans(gm: fx.GraphModule, values: dict) -> tuple[FusionPlan, ...]:
    """The fusions recorded in ``gm``'s node records, for the Plan (build_plan calls this)."""
    out = []
    for node in gm.graph.nodes:
        f = info(node).fusion if KEY in node.meta else None
        if f is None:
            continue
        saved, added = sympy.sympify(f.bytes_saved), sympy.sympify(f.extra_flops)
        out.append(FusionPlan(node.name, f.rule, f.fused, f.replaced, Cost(str(saved), evaluate(saved, values)),
                              Cost(str(added), evaluate(added, values)), f.why))
    return tuple(out)
