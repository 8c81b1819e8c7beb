"""Memory per device: what a training step keeps alive, term by term (sympy in B, T, n{axis}).

    parameters           4 B per stored fp32 parameter element (its shard at rest; the master weight
                         under mixed precision, passes/precision.py)
    gradients            4 B per stored element (the gradient has the parameter's layout after sync)
    optimizer            8 B per stored element: AdamW's two fp32 moments (exp_avg, exp_avg_sq;
                         torch.optim.AdamW, https://pytorch.org/docs/stable/generated/torch.optim.AdamW.html)
    gathered_parameters  fsdp gathers that the backward keeps (a linear saves its gathered weight)
    param_copies         mixed precision: the compute copies of unsharded weights the backward keeps
                         (a linear saves its bfloat16 weight; absent when compute is the master dtype)
    activations          the tensors autograd saves for the backward, parameters excluded

Every term but the first three is counted in the dtype the precision pass gave each value
(bfloat16 activations are 2 B an element); the rules below scale with those bytes.

Saved tensors follow one rule per op kind (``SAVES``), calibrated against what autograd really
saves (``torch.autograd.graph.saved_tensors_hooks`` on each op of every bundled tiny spec, the
same hooks the emitted program uses to measure): an op saves nothing unless some tensor input
needs a gradient; then it saves some of its inputs, perhaps its output, and intermediates of its
own (``internal``, in bytes of its output ``O`` and inputs ``I``). A value saved by several ops
(``x`` read by the q, k and v projections) is counted once. Inputs that are parameters are not
activations; inputs that are fsdp gathers of parameters are ``gathered_parameters``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sympy
from torch import fx

from ..compiler.lower import tensor_args
from ..compiler.node_info import info
from ..compiler.shapes import numel
from .sbp import local_dims
from .symbols import BYTES_PER_ELEMENT

ZERO = sympy.Integer(0)
Internal = Callable[[sympy.Expr, list[sympy.Expr], fx.Node, tuple], sympy.Expr]


@dataclass(frozen=True)
class Saves:
    """What an op kind keeps for its backward: input positions, its output, and intermediates."""

    inputs: tuple[int, ...] = ()
    output: bool = False
    internal: Internal | None = None


def _attention(out, ins, node, local_out):
    # q, k, v made contiguous (k, v repeated to all heads) for the batched matmuls: 3 O; the
    # softmax probabilities (B, H, T, T): O * T / head_dim; the causal mask (T, T) of bools
    t, e = local_out[1], _attr(node, "head_dim")
    return 3 * out + out * t / e + t * t


def _cross_entropy(out, ins, node, local_out):
    # the log-probabilities, in at least float32 (ops.cross_entropy upcasts 16-bit logits; the
    # vocabulary-parallel form keeps exp(z - max) the same way), the targets, the loss
    width = BYTES_PER_ELEMENT[info(tensor_args(node)[0]).dtype]
    return ins[0] * max(4, width) / width + ins[1] + out


def _attr(node: fx.Node, name: str):
    return info(node).attrs[name]


def _norm_stats(out, ins, node, local_out):  # mean and 1/std per row (layer_norm) or 1/rms (rms_norm)
    return 2 * out / local_out[-1]


SAVES: dict[str, Saves] = {
    "linear": Saves((0, 1)),
    "embedding": Saves((0,)),
    "embedding_rows": Saves((0,)),
    "rms_norm": Saves((0, 1), internal=lambda o, i, n, s: o + _norm_stats(o, i, n, s)),  # x * rsqrt(...)
    "layer_norm": Saves((0, 1, 2), internal=_norm_stats),
    "group_layer_norm": Saves((0, 1, 2), internal=lambda o, i, n, s: 2 * o * 4 / i[1]),  # per group
    "causal_attention": Saves(internal=_attention),
    "swiglu": Saves((0, 1), internal=lambda o, i, n, s: o),  # silu(gate)
    "gelu": Saves((0,)),
    "activation": Saves((0,)),
    "mul": Saves((0, 1)),
    "add": Saves(),
    "softmax": Saves(output=True),
    "topk_indices": Saves(output=True),
    "cross_entropy": Saves(internal=_cross_entropy),
    "pk_scores": Saves((0, 1)),
    "row_dot": Saves((0, 1)),
    "scale_cores": Saves((0, 1)),
    "weighted_sum": Saves((0, 1)),
    "take": Saves((0, 1)),
    "take_cores": Saves((0, 1)),
    "take_ranked": Saves((0, 1)),
    "gather_rows": Saves((1,)),
    "rank_one_scores": Saves((1,)),
    "core_pool": Saves((1,), internal=lambda o, i, n, s: i[0]),  # the rows regrouped into chunks
    "ive_pool": Saves((0, 2), internal=lambda o, i, n, s: i[1]),
    "tucker_grid": Saves((0,), internal=lambda o, i, n, s: 1.5 * i[0]),  # row x core
    "tucker_scores": Saves((1,), internal=lambda o, i, n, s: 4 * i[0]),  # q split into query ranks
    "balance_loss": Saves(internal=lambda o, i, n, s: 17 * o),
}


def _expert_ffn(out, ins, node, local_out):
    # per routed token (B T K of them): h and y (D each), up, gate, silu(gate), act (F each) in the
    # output's dtype, and its token index, slot and gate (three more words: 12 B)
    args = tensor_args(node)
    k, width, d = info(args[1]).shape[-1], info(args[3]).shape[1], local_out[-1]
    e = BYTES_PER_ELEMENT[info(node).dtype]
    tokens = out / e / d
    return tokens * k * ((2 * d + 4 * width) * e + 12)


# scaled_dot_product_attention (CPU flash kernel, torch 2.x) keeps q, k, v, its output and one
# float logsumexp per (batch, head, position), never the (B, H, T, T) probabilities
# the float32 log-sum-exp per query and head, whatever the compute dtype (torch's CPU flash kernel)
SAVES["sdpa_attention"] = Saves((0, 1, 2), output=True, internal=lambda o, i, n, s: (
    o / _attr(n, "head_dim") * BYTES_PER_ELEMENT["float32"] / BYTES_PER_ELEMENT[info(n).dtype]))
# embedding_bag (mode="sum", per_sample_weights) keeps the ids, the weights and three int64 arrays
# of one entry per token (offsets, bag sizes), never the (B, T, H, K, D) gathered rows
SAVES["gather_weighted_sum"] = Saves((1, 2), internal=lambda o, i, n, s: 3 * 8 * numel(s[:-1]))
SAVES["expert_ffn"] = Saves((3, 4, 5), internal=_expert_ffn)
# each token's hidden dotted with its gathered rows keeps the ids and the hidden, not the rows
SAVES["gather_row_dot"] = Saves((1, 2))
# a selected slot's score gathers its row and column keys' scores: each gather keeps its int64 ids
SAVES["pk_slot_scores"] = Saves(internal=lambda o, i, n, s: 2 * o * 8 / BYTES_PER_ELEMENT[info(n).dtype])
# the residual add + RMSNorm keeps its stacked output (the sum it saves is a view of it) and one
# 1/rms per row (the output is (B, T, 2, D): rows = O / (2 D)); pair_part's views save nothing
SAVES["add_rms_norm"] = Saves(output=True, internal=lambda o, i, n, s: o / (2 * s[-1]))


def _expert_parallel_ffn(out, ins, node, local_out):
    # runtime.expert_parallel_ffn (experts split over a mesh axis), in four-byte words. Per (token,
    # slot) assignment of this device (A = tokens x K): the rows sent back and their gate-weighted
    # copy (D each: saved by the product and by index_add), the gate (1), the sort order and the
    # token index (int64: 2 each). Per row received (R, routing-dependent; its mean over the devices
    # of the axis is A): the row (D, saved by the up and gate projections), the expert's output (D,
    # saved by index_add), up, gate, silu(gate) and their product (4 F; gelu: up and its value, 2 F)
    # and the row's index (int64: 2). Measured with saved_tensors_hooks on moe-tiny, ep on 2
    # devices: 236,544 bytes per layer in the mean over devices, A (4 D + 4 F + 7) words exactly.
    args = tensor_args(node)
    k, width, d = info(args[1]).shape[-1], info(args[3]).shape[1], local_out[-1]
    assignments = out / 4 / d * k
    hidden = 4 if _attr(node, "activation") == "swiglu" else 2
    return assignments * (4 * d + hidden * width + 7) * 4


EXPERT_PARALLEL = Saves(internal=_expert_parallel_ffn)  # the weights are parameters: not activations


def _rule(node: fx.Node) -> Saves | None:
    """The node's saved-tensor rule: the op kind's, or the expert-parallel variant's."""
    if any(v is not None and v.name == "expert_parallel" for v in (info(node).variant or ())):
        return EXPERT_PARALLEL
    return SAVES.get(info(node).op)


def _local_bytes(node: fx.Node, sizes: list) -> tuple[sympy.Expr, tuple]:
    rec = info(node)
    sbp = rec.sbp.output if rec.sbp is not None else rec.at_rest
    dims = local_dims(rec.shape, sbp, sizes) if sbp is not None else tuple(rec.shape)
    return numel(dims) * BYTES_PER_ELEMENT.get(rec.dtype, 4), dims


def _is_param(node: fx.Node) -> bool:
    return info(node).op == "param"


def _is_gathered_param(node: fx.Node) -> bool:
    return info(node).op == "boxing" and _is_param(node.args[0])


def saved_bytes(gm: fx.GraphModule, sizes: list, master: str = "float32") -> tuple[sympy.Expr, sympy.Expr,
                                                                                     sympy.Expr]:
    """(activations, gathered parameters, parameter compute copies) autograd keeps for the backward,
    per device. A parameter read in another dtype than its ``master`` one is read as a copy, which a
    saving op keeps (counted once per parameter, as the program casts each once per step)."""
    values: dict[str, sympy.Expr] = {}
    gathered: dict[str, sympy.Expr] = {}
    copies: dict[str, sympy.Expr] = {}
    internal: list[sympy.Expr] = []  # summed once: sympy re-flattens a sum on every +
    for node in gm.graph.nodes:
        rec = info(node)
        rule = _rule(node) if node.op == "call_function" and rec.op != "boxing" else None
        if rule is None:
            continue
        args = tensor_args(node)
        if not any(info(a).differentiable for a in args):
            continue
        out, dims = _local_bytes(node, sizes)
        ins = [_local_bytes(a, sizes)[0] for a in args]
        kept = [args[i] for i in rule.inputs if i < len(args)] + ([node] if rule.output else [])
        for value in kept:
            if _is_param(value):
                if info(value).dtype != master:
                    copies[value.name] = _local_bytes(value, sizes)[0]
                continue
            target = gathered if _is_gathered_param(value) else values
            target[value.name] = _local_bytes(value, sizes)[0]
        if rule.internal is not None:
            internal.append(rule.internal(out, ins, node, dims))
    return sympy.Add(*internal, *values.values()), sympy.Add(*gathered.values()), sympy.Add(*copies.values())
