"""fuse: rewrite subgraphs into fused ops when the cost model says the bytes saved are worth it.

A fusion is worth it when the memory traffic it removes (intermediates that no longer round-trip
to memory) takes longer, at the hardware's memory bandwidth, than the work the fused op adds
(a recomputation) takes at its peak FLOP rate:

    bytes_saved / memory_bandwidth  >  extra_flops / peak_flops        (at the plan's B and T)

The rules are data (``RULES``): a pattern of op kinds and how they connect, the op-table record
that replaces them, and the cost-model functions of the matched nodes giving the bytes saved and
the FLOPs added. The fused op is an ordinary op-table record, so annotate_cost's FLOP rule,
choose_sbp's strategies and signature propagation, memory accounting and the emitter treat it as
any other op, on local shards. Each decision is written into the fused node's record
(``NodeInfo.fusion``) and, through build_plan, into the Plan (``Plan.fusions``), which ``explain``
lists. ``ultraplan plan --no-fuse`` (``PlanContext.fuse = False``) turns the pass off.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import sympy
from torch import fx

from ..compiler.lower import tensor_args
from ..compiler.node_info import KEY, NodeInfo, info
from ..compiler.op_table import OP_TABLE
from ..compiler.shapes import numel
from .context import PassReport, PlanContext
from .cost import ZERO, op_cost
from .fuse_graph import GRAPH_RULES, match_graph, rewrite_graph
from .plan import Cost, FusionPlan
from .symbols import BYTES_PER_ELEMENT, evaluate

# (records of the matched nodes, in pattern order; training?) -> bytes or FLOPs, sympy in B, T
CostRule = Callable[[list[NodeInfo], bool], sympy.Expr]


@dataclass(frozen=True)
class Step:
    """One op of a pattern: its kind, and which of its tensor arguments is the previous step's
    output (``via``; unused for the first step). Every step but the last must have one user."""

    op: str
    via: int = 0
    attrs: tuple[tuple[str, object], ...] = ()  # attribute values the node must have


@dataclass(frozen=True)
class Rule:
    """A fusion rule: ``pattern`` (a chain of steps) becomes one ``fused`` op, whose arguments are
    the chain's tensor arguments from outside it, in order, and whose attributes are the steps'."""

    name: str
    pattern: tuple[Step, ...]
    fused: str
    bytes_saved: CostRule
    extra_flops: CostRule
    why: str
    keep: tuple[str, ...] | None = None  # the attributes the fused op takes (None: all the steps')
    # the first step's value is read elsewhere too (a two-step rule): the fused op returns it and the
    # last step's value stacked, and two ``pair_part`` nodes stand in for the two replaced nodes
    shared: bool = False
    when: Callable[[list[NodeInfo]], bool] | None = None  # a further condition on the matched records


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


def _scores_elements(recs: list[NodeInfo]) -> sympy.Expr:
    """B H T^2: one attention node's score matrix (global shape; shards divide it alike)."""
    batch, seq = recs[0].shape[0], recs[0].shape[1]
    return batch * recs[0].attrs["num_heads"] * seq * seq


def _attention_bytes_saved(recs: list[NodeInfo], train: bool) -> sympy.Expr:
    """ops.causal_attention writes the scores (first matmul), reads and writes them in the scale,
    the mask and the softmax, and reads the probabilities in the second matmul: 4 writes and 4 reads
    of B H T^2 elements. Its backward does at least as much (the saved probabilities read back, the
    softmax, mask and scale gradients); the fused kernel keeps all of it in tiles (FlashAttention,
    Dao et al. 2022, sec. 3.1)."""
    per_pass = 8 * _scores_elements(recs) * BYTES_PER_ELEMENT.get(recs[0].dtype, 4)
    return per_pass * (2 if train else 1)


def _attention_recompute(recs: list[NodeInfo], train: bool) -> sympy.Expr:
    """The flash backward recomputes the scores q k^T (2 B H T^2 E FLOPs; Dao et al. 2022, alg. 4)."""
    return 2 * _scores_elements(recs) * recs[0].attrs["head_dim"] if train else ZERO


def _gate_bytes_saved(recs: list[NodeInfo], train: bool) -> sympy.Expr:
    """silu(gate) * up as two ops writes silu(gate) and reads it back; fused, it stays in registers.
    In training the backward likewise no longer writes and reads the gradient of silu(gate)."""
    per_pass = 2 * numel(recs[-1].shape) * BYTES_PER_ELEMENT.get(recs[-1].dtype, 4)
    return per_pass * (2 if train else 1)


def _rows_bytes_saved(recs: list[NodeInfo], train: bool) -> sympy.Expr:
    """gather_rows writes the (B, T, H, K, D) rows and weighted_sum (row_dot) reads them back; in
    training the backward writes their gradient and the scatter-add reads it. Fused, each row is read
    once from the table and summed (dotted) as it arrives (as EmbeddingBag does)."""
    per_pass = 2 * numel(recs[0].shape) * BYTES_PER_ELEMENT.get(recs[0].dtype, 4)
    return per_pass * (2 if train else 1)


def _nothing(recs: list[NodeInfo], train: bool) -> sympy.Expr:
    return ZERO


def _residual_norm_bytes_saved(recs: list[NodeInfo], train: bool) -> sympy.Expr:
    """add then rms_norm: the norm reads the sum back (one read of B T D); in training the norm's
    backward writes the gradient of the sum and autograd reads it back to add the residual's (a write
    and a read). Fused, the sum is normed as it is made and its one gradient is written once."""
    elements = numel(recs[0].shape) * BYTES_PER_ELEMENT.get(recs[0].dtype, 4)
    return elements * (3 if train else 1)


def _same_layer_and_dtype(recs: list[NodeInfo]) -> bool:
    """Both nodes in one layer (so layers stay alike for find_blocks) on (B, T, D) values of one dtype."""
    add, norm = recs
    return (len(add.shape) == 3 and add.dtype == norm.dtype
            and add.layer.split(".")[:2] == norm.layer.split(".")[:2] and add.layer.startswith("layers."))


RULES: tuple[Rule, ...] = (
    Rule("attention->sdpa", (Step("causal_attention"),), "sdpa_attention",
         _attention_bytes_saved, _attention_recompute,
         "scaled_dot_product_attention (is_causal, enable_gqa): the T x T scores stay in tiles"),
    Rule("gather+weighted_sum", (Step("gather_rows"), Step("weighted_sum", via=0)), "gather_weighted_sum",
         _rows_bytes_saved, _nothing, "embedding_bag: the gathered value rows are never stored", keep=()),
    # up * silu(gate) written as an activation and a product (Memory+'s gated memory output, PEER's
    # silu experts) is SwiGLU (Shazeer 2020): the swiglu op, gate first
    Rule("silu*mul->swiglu", (Step("activation", attrs=(("kind", "silu"),)), Step("mul", via=1)), "swiglu",
         _gate_bytes_saved, _nothing, "silu(gate) * up in one op: silu(gate) is not written", keep=()),
    Rule("silu*mul->swiglu", (Step("activation", attrs=(("kind", "silu"),)), Step("mul", via=0)), "swiglu",
         _gate_bytes_saved, _nothing, "silu(gate) * up in one op: silu(gate) is not written", keep=()),
    # each token's hidden against its gathered rows: PEER's down projections, UltraMemV2's pre-value gate
    Rule("gather+row_dot", (Step("gather_rows"), Step("row_dot", via=1)), "gather_row_dot", _rows_bytes_saved,
         _nothing, "the gathered rows are dotted as they are read, not stored for the backward", keep=()),
    # the residual add and the norm of the sum (both read on): one pass, the sum and its norm stacked
    Rule("add+rms_norm", (Step("add"), Step("rms_norm", via=0)), "add_rms_norm", _residual_norm_bytes_saved,
         _nothing, "residual add and RMSNorm in one pass: the sum is not read back, its gradient written once",
         shared=True, when=_same_layer_and_dtype),
)


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
    for node in list(gm.graph.nodes):
        for rule in RULES:
            chain = _match(node, rule)
            if chain is None:
                continue
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
                            grule.bytes_saved(recs, train), ZERO, grule.why)
            ok, saved_s, _ = _worth(fusion, ctx)
            decisions.append(f"{grule.name} at {node.name}: {'fused' if ok else 'kept'}, saves {fusion.bytes_saved} "
                             f"bytes ({saved_s:.3g} s of memory traffic), adds 0 FLOPs")
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
