"""Named strategies, one short function per mesh axis: each pins the few nodes it decides.

A strategy says, for its mesh axis, how the inputs are laid out, how each parameter is stored
(``at_rest``) and how its consumers see it, and for tensor and sequence parallelism how the
residual stream is laid out. Everything else is left to the one generic propagation in
``choose_sbp`` over the op table. A pin says what a node's *consumers* see; when the op makes
something else, choose_sbp boxes its output once (e.g. the vocabulary-parallel embedding's ``P``
is all-reduced to the ``B`` stream under ``tp``, reduce-scattered to ``S(1)`` under ``sp``).

- ``dp``:   inputs ``S(0)`` (the batch), parameters ``B``; gradients ``P -> B`` (all-reduce).
- ``fsdp``: inputs ``S(0)``; each parameter stored ``S(d)`` on the first dim that divides and that no
            other axis splits (ZeRO-3, Rajbhandari et al. 2020; PyTorch FSDP), all-gathered to ``B``
            before its first use in the forward. Autograd keeps the gathered parameter for the
            backward (not gathered again: costs its memory until its gradient is made, saves an
            all-gather); the gather's dual reduce-scatters the gradient back to ``S(d)``, so the
            optimizer holds state for the owned shard only. Parameters a derived buffer is computed
            from (UltraMem's cores) stay ``B``: every device recomputes the buffer from them.
- ``tp``:   Megatron-LM (Shoeybi et al. 2019): inputs ``B``; attention q/k/v and the FFN's up/gate
            column-parallel (``S(0)``, heads split; GQA's kv heads split with them while they divide
            the axis, else replicated, each device reading the kv heads its query heads use), their output
            projections row-parallel (``S(1)``, a ``P`` output); the MoE's experts split on their
            hidden width; the embedding and LM head vocabulary-parallel (``S(0)``) with the cross
            entropy over the split vocabulary; norms and memory layers replicated; the residual
            stream ``B``.
- ``sp``:   ``tp`` with the residual stream sequence-split ``S(1)`` (Korthikanti et al. 2022): norms,
            residual adds and per-token work on a 1/n of the positions; all-gather into and
            reduce-scatter out of each tensor-parallel region.
- ``ep``:   as ``dp``, with each MoE's experts split over the axis (``S(0)`` on the expert index):
            tokens go to their experts' devices and back by all_to_all (GShard, Lepikhin et al. 2020).
            Named on several axes (``ep,ep``) the experts split over all of them, outer axis first, and
            each token's row travels once, over the group spanning those axes (expert_parallel.py).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import fx

from ..compiler.node_info import info
from .context import PlanContext, PlanError
from .sbp import Broadcast, NdSbp, Sbp, Split, parse_nd

B_ = Broadcast()


@dataclass
class AxisPins:
    """What one axis's strategy decided: the SBP consumers see per pinned node, how parameters are
    stored when that differs, and the decisions in words."""

    axis: int
    strategy: str
    outputs: dict[str, Sbp] = field(default_factory=dict)
    at_rest: dict[str, Sbp] = field(default_factory=dict)
    signatures: dict[str, object] = field(default_factory=dict)  # node -> its AxisSignature (set by auto)
    decisions: list[str] = field(default_factory=list)


# Megatron roles: (component, parameter's own name) -> the dim tensor parallelism splits
TP_ROLES: dict[tuple[str, str], int] = {
    ("attention", "wq"): 0, ("attention", "wk"): 0, ("attention", "wv"): 0, ("attention", "wo"): 1,
    ("ffn", "w_up"): 0, ("ffn", "w_gate"): 0, ("ffn", "w_down"): 1,
    ("moe", "w_up"): 1, ("moe", "w_gate"): 1, ("moe", "w_down"): 2,
    ("moe", "w_shared_up"): 0, ("moe", "w_shared_gate"): 0, ("moe", "w_shared_down"): 1,
    ("embedding", "weight"): 0, ("lm_head", "weight"): 0,
    # biases of column-parallel projections split with their output features; row-parallel biases
    # (bo, b_down) stay B and are added after the all-reduce (Megatron-LM's RowParallelLinear), as are
    # the learned position table (position_embedding) and the QK-norm scales (q_norm, k_norm): a
    # full-width norm needs the whole q (its bias_add/rms_norm dim is whole, so the propagation
    # gathers it), a per-head norm runs on the split heads with its (head_dim,) scale whole
    ("attention", "bq"): 0, ("attention", "bk"): 0, ("attention", "bv"): 0,
    ("ffn", "b_up"): 0, ("ffn", "b_gate"): 0, ("moe", "b_shared_up"): 0, ("moe", "b_shared_gate"): 0,
    ("moe", "b_up"): 1, ("moe", "b_gate"): 1,  # experts' up/gate biases split with their width; b_down B
}
# split over the experts by ep; the experts' down biases stay B (expert_bias adds them outside the all_to_all)
EXPERT_WEIGHTS = {("moe", "w_up"), ("moe", "w_gate"), ("moe", "w_down"), ("moe", "b_up"), ("moe", "b_gate")}


def _params(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if info(n).op == "param"]


def _role(node: fx.Node) -> tuple[str, str]:
    return info(node).component, info(node).param.name.rsplit(".", 1)[-1]


def _inputs(gm: fx.GraphModule, sbp: Sbp, pins: AxisPins) -> None:
    for node in gm.graph.nodes:
        if info(node).op == "input":
            pins.outputs[node.name] = sbp


def dp(gm: fx.GraphModule, axis: int, n: int, ctx: PlanContext, others: list[AxisPins]) -> AxisPins:
    pins = AxisPins(axis, "dp")
    _inputs(gm, Split(0), pins)
    pins.decisions.append(f"axis {axis} dp: batch S(0) over {n}, parameters B, gradients all-reduced")
    return pins


def fsdp(gm: fx.GraphModule, axis: int, n: int, ctx: PlanContext, others: list[AxisPins]) -> AxisPins:
    pins = AxisPins(axis, "fsdp")
    _inputs(gm, Split(0), pins)
    sources = {info(b).buffer.source for b in gm.graph.nodes if info(b).op == "buffer" and info(b).buffer.source}
    kept = []
    for node in _params(gm):
        taken = {p.at_rest.get(node.name, p.outputs.get(node.name)) for p in others}
        shape = info(node).param.shape
        dim = next((d for d, size in enumerate(shape) if size % n == 0 and Split(d) not in taken), None)
        if dim is None or info(node).param.name in sources:
            kept.append(info(node).param.name)
            continue
        pins.outputs[node.name] = B_
        pins.at_rest[node.name] = Split(dim)
    pins.decisions.append(f"axis {axis} fsdp: batch S(0) over {n}; parameters stored S(d), all-gathered before "
                          "use and kept for the backward; gradients reduce-scattered")
    if kept:
        pins.decisions.append(f"axis {axis} fsdp keeps {len(kept)} parameter(s) B (no dim divides by {n}, or a "
                              f"derived buffer reads them): {', '.join(kept[:4])}{' ...' if len(kept) > 4 else ''}")
    return pins


def _tensor_parallel(gm: fx.GraphModule, axis: int, n: int, ctx: PlanContext, name: str, stream: Sbp) -> AxisPins:
    pins = AxisPins(axis, name)
    _inputs(gm, B_, pins)
    replicated_kv: set[str] = set()  # layers whose kv heads are fewer than the devices: k, v replicated
    for node in gm.graph.nodes:
        if "num_kv_heads" in info(node).attrs:  # attention, fused or not
            heads, kv = info(node).attrs["num_heads"], info(node).attrs["num_kv_heads"]
            if heads % n or (kv % n and n % kv):
                count, value = ("heads", heads) if heads % n else ("kv heads", kv)
                raise PlanError(f"{name} on mesh axis {axis} splits attention heads over {n} devices, but "
                                f"{info(node).layer} has {count} = {value}, not divisible by {n}"
                                f"{'' if count == 'heads' else f' (nor {n} by it, to replicate them)'}; use an axis "
                                "of a size that divides it, or another strategy on this axis")
            if kv % n:
                replicated_kv.add(info(node).layer)
        if info(node).stream:
            pins.outputs[node.name] = stream
    for node in _params(gm):
        dim = TP_ROLES.get(_role(node))
        if dim is None:
            continue
        if info(node).layer in replicated_kv and _role(node)[1] in ("wk", "wv"):
            pins.outputs[node.name] = B_
            continue
        size = info(node).param.shape[dim]
        if size % n:
            raise PlanError(f"{name} on mesh axis {axis} splits {info(node).param.name} {info(node).param.shape} "
                            f"on dim {dim} over {n} devices, but {size} is not divisible by {n}; use an axis of a "
                            "size that divides it, or another strategy on this axis")
        pins.outputs[node.name] = Split(dim)
    pins.decisions.append(f"axis {axis} {name}: column- then row-parallel linears, heads split, vocabulary-parallel "
                          f"embedding, LM head and cross entropy; residual stream {stream}")
    return pins


def tp(gm: fx.GraphModule, axis: int, n: int, ctx: PlanContext, others: list[AxisPins]) -> AxisPins:
    return _tensor_parallel(gm, axis, n, ctx, "tp", B_)


def sp(gm: fx.GraphModule, axis: int, n: int, ctx: PlanContext, others: list[AxisPins]) -> AxisPins:
    if ctx.seq % n:
        raise PlanError(f"sp on mesh axis {axis} splits the sequence over {n} devices, but the sequence length is "
                        f"{ctx.seq}, not divisible by {n}; use --seq a multiple of {n}, or tp on this axis")
    return _tensor_parallel(gm, axis, n, ctx, "sp", Split(1))


def ep(gm: fx.GraphModule, axis: int, n: int, ctx: PlanContext, others: list[AxisPins]) -> AxisPins:
    pins = AxisPins(axis, "ep")
    _inputs(gm, Split(0), pins)
    experts = [node for node in _params(gm) if _role(node) in EXPERT_WEIGHTS]
    # ep on several axes splits the experts over all of them (expert_parallel.py routes over the group
    # spanning them), so their count must divide by the product of those axes' sizes
    axes = sorted([axis, *(p.axis for p in others if p.strategy == "ep")])
    devices = math.prod(ctx.mesh.shape[a] for a in axes)
    for node in experts:
        count = info(node).param.shape[0]
        if count % devices:
            where = f"mesh axis {axis}" if len(axes) == 1 else f"mesh axes {', '.join(map(str, axes))}"
            raise PlanError(f"ep on {where} splits the experts of {info(node).param.name} over {devices} devices, "
                            f"but there are {count}, not divisible by {devices}; use axes whose sizes divide it, "
                            "or --place the experts number (torch.chunk's shares)")
        pins.outputs[node.name] = Split(0)
    if experts:
        pins.decisions.append(f"axis {axis} ep: batch S(0) over {n}, experts S(0) ({len(experts)} expert weights), "
                              "tokens dispatched by all_to_all; other parameters B")
    else:
        pins.decisions.append(f"axis {axis} ep: the model has no experts, so ep acts as dp on this axis")
    return pins


Strategy = Callable[[fx.GraphModule, int, int, PlanContext, list[AxisPins]], AxisPins]
STRATEGIES: dict[str, Strategy] = {"dp": dp, "fsdp": fsdp, "tp": tp, "sp": sp, "ep": ep}
# fsdp chooses its dims after the others have split theirs (a dim split twice would need a strided layout)
ORDER = {"fsdp": 1}


def pin_axes(gm: fx.GraphModule, ctx: PlanContext) -> list[AxisPins]:
    """Run each named axis's strategy; returns their pins in axis order (``auto`` axes left out)."""
    names = ctx.strategies
    done: dict[int, AxisPins] = {}
    for axis in sorted(range(len(names)), key=lambda a: ORDER.get(names[a], 0)):
        if names[axis] == "auto":  # decided by the search (passes/search.py), around the named axes' pins
            continue
        done[axis] = STRATEGIES[names[axis]](gm, axis, ctx.mesh.shape[axis], ctx, list(done.values()))
    return [done[a] for a in range(len(names)) if a in done]


def forced_pins(gm: fx.GraphModule, ctx: PlanContext) -> dict[str, NdSbp]:
    """``--force GLOB=SBP`` pins: node name -> the nd-SBP its consumers must see (one SBP given for a
    2-D mesh applies to every axis); clear errors for text that is not an SBP or matches nothing."""
    from .placement import is_placement, placement_pins  # placement words: --place TABLE=number|dim|replicate

    out: dict[str, NdSbp] = {}
    names = [n.name for n in gm.graph.nodes if n.op != "output"]
    for pattern, text in ctx.forces:
        if is_placement(text):
            out.update(placement_pins(gm, ctx, pattern, text))
            continue
        try:
            nd = parse_nd(text)
        except ValueError as exc:
            raise PlanError(f"--force {pattern}={text}: {exc}; write S(d), B or P, one per mesh axis "
                            "separated by commas") from None
        if len(nd) == 1 and len(ctx.mesh.shape) > 1:
            nd = nd * len(ctx.mesh.shape)
        if len(nd) != len(ctx.mesh.shape):
            raise PlanError(f"--force {pattern}={text}: {len(nd)} SBPs for a mesh of {len(ctx.mesh.shape)} axes")
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise PlanError(f"--force {pattern}={text}: no node matches {pattern!r} (node names are as in "
                            "`ultraplan explain`, e.g. layers_0_attention_q)")
        for name in matched:
            out[name] = nd
    return out


def check_batch(ctx: PlanContext, pins: list[AxisPins]) -> None:
    """The batch divides over the devices of the axes that split it (and only those)."""
    split = [p for p in pins if p.outputs.get("tokens") == Split(0)]
    devices = 1
    for p in split:
        devices *= ctx.mesh.shape[p.axis]
    if ctx.batch % devices:
        axes = ", ".join(f"axis {p.axis} ({p.strategy})" for p in split)
        raise PlanError(f"batch {ctx.batch} does not split evenly over the {devices} devices that split it ({axes} of "
                        f"mesh {ctx.mesh}); use a batch that is a multiple of {devices} (--batch, or train.batch_size "
                        "in the spec)")
