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

Saved tensors follow one rule per op kind (``SAVES``; every differentiable op of the op table has
one, possibly ``NOTHING``), derived from the op's torch code and checked op by op against what
autograd really saves (``torch.autograd.graph.saved_tensors_hooks``, the same hooks the emitted
program uses to measure; tests/unit/test_memory.py): an op saves nothing unless some tensor input
needs a gradient; then it saves some of its inputs, perhaps its output, and intermediates of its
own (``internal``, in bytes of its output ``O`` and inputs ``I``). A value saved by several ops
(``x`` read by the q, k and v projections) is counted once, and a view (``view_of``) as the value
whose storage it shares. Inputs that are parameters are not activations (their compute copies under
mixed precision are ``param_copies``); inputs that are fsdp gathers of parameters are
``gathered_parameters``.
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
    view_of: int | None = None  # the output is a view of this input: keeping it keeps that input's storage


def _attention(out, ins, node, local_out):
    # q, k, v made contiguous (k, v repeated to all heads) for the batched matmuls: 3 O; the
    # softmax probabilities (B, H, T, T): O * T / head_dim; the causal mask (T, T) of bools
    t, e = local_out[1], _attr(node, "head_dim")
    return 3 * out + out * t / e + t * t


def _sdpa(out, ins, node, local_out):
    # scaled_dot_product_attention (CPU flash kernel, torch 2.x) keeps q, k, v, its output and one
    # float32 log-sum-exp per query and head whatever the compute dtype, never the (B, H, T, T) probabilities
    return out / _attr(node, "head_dim") * 4 / _width(node)


def _cross_entropy(out, ins, node, local_out):
    # the log-probabilities, in at least float32 (ops.cross_entropy upcasts 16-bit logits; the
    # vocabulary-parallel form keeps exp(z - max) the same way), the targets, the loss
    width = _width(tensor_args(node)[0])
    return ins[0] * max(4, width) / width + ins[1] + out


def _attr(node: fx.Node, name: str):
    return info(node).attrs[name]


def _width(node: fx.Node) -> int:
    """Bytes per element of a value (its dtype after the precision pass)."""
    return BYTES_PER_ELEMENT[info(node).dtype]


def _last_dim(position: int) -> Callable[[fx.Node], sympy.Expr]:
    """The length of an input's last dim (a norm's group: its weight's length)."""
    return lambda node: info(tensor_args(node)[position]).shape[-1]


def _rms_stats(group: Callable[[fx.Node], sympy.Expr]) -> Internal:
    # x * rsqrt(mean(x^2) + eps) * w keeps x * rsqrt(...) (O) and rsqrt(...), one per group of
    # ``group`` features (the mul by w keeps the first, the mul by rsqrt keeps the second; pow keeps x)
    return lambda o, i, n, s: o + o / group(n)


def _layer_stats(group: Callable[[fx.Node], sympy.Expr]) -> Internal:
    # F.layer_norm keeps mean and 1/std per group of ``group`` features, in the input's dtype on the
    # CPU (aten/src/ATen/native/layer_norm.cpp; the CUDA kernel keeps them in float32, a difference
    # of 2 / group of the output's bytes under bf16)
    return lambda o, i, n, s: 2 * o / group(n)


def _rope(out, ins, node, local_out):
    # cos and sin of the angles, (1, T, 1, head_dim / 2) each in the value's dtype (the muls keep them)
    return local_out[1] * _attr(node, "head_dim") * _width(node)


def _tucker_scores(out, ins, node, local_out):
    # the einsum's batched matmul makes the query contiguous as (H, 2, R, B T, D): each head's, half's
    # and rank's query (repeated to shared heads, expanded to R ranks) is a copy; the keys are a view
    d, n = info(tensor_args(node)[1]).shape[-1], local_out[-1]
    return out / n * d


def _tucker_grid(out, ins, node, local_out):
    # row x core: the rows (half of the kept scores) and the cores made contiguous for the batched
    # matmul (copies), and its (B, T, H, K, R, M) product, kept by the second product, which also keeps
    # the columns: a view of the kept scores, so their whole storage (I0)
    cores = info(tensor_args(node)[1]).shape[1]
    return ins[0] * (1 + (1 + cores) / 2) + ins[1]


def _loss_shares(out, ins, node, local_out):
    # balance_loss / key_balance_loss: share * mean_prob keeps the (non-differentiable) shares, one per
    # expert or key, and mean_prob = prob_sums / (assignments / k) keeps its divisor (one per row of
    # the sums: a scalar, or one per key half); in at least float32 (ops._at_least_fp32)
    sums = tensor_args(node)[1]
    shape = info(sums).shape
    return (numel(shape) + numel(shape[:-1])) * max(4, _width(sums))


def _expert_ffn(out, ins, node, local_out):
    # per routed token (B T K of them), as ops.expert_ffn's loop keeps them: the token's row h, the
    # down projection's output y, y * gate (index_add keeps its source) (D each); up, gate, silu(gate)
    # and their product (swiglu: 4 F) or up and gelu(up) (2 F); the gate (1), all in the output's
    # dtype; and nonzero's (token, slot) pair (two int64: 16 B). F is this device's share of the experts'
    # width (tensor parallelism splits it), read off the local bytes of w_up (E, F, D)
    args = tensor_args(node)
    experts, _, d = info(args[3]).shape
    k, width = info(args[1]).shape[-1], ins[3] / (experts * d * _width(args[3]))
    e = _width(node)
    hidden = 4 if _attr(node, "activation") == "swiglu" else 2
    tokens = out / e / d
    return tokens * k * ((3 * d + hidden * width + 1) * e + 16)


def _expert_bias(out, ins, node, local_out):
    # the chosen experts' bias rows (B, T, K, D), kept by the product with the gates
    return out * info(tensor_args(node)[0]).shape[-1]


NOTHING = Saves()  # sums, slices, adds: their backward needs no tensor

SAVES: dict[str, Saves] = {
    "linear": Saves((0, 1)),
    "bias_add": NOTHING,
    "embedding": Saves((0,)),
    "add_positions": NOTHING,
    "rms_norm": Saves((0, 1), internal=_rms_stats(_last_dim(0))),
    "layer_norm": Saves((0, 1, 2), internal=_layer_stats(_last_dim(0))),
    "head_rms_norm": Saves((0, 1), internal=_rms_stats(_last_dim(1))),  # per head: E = the weight's length
    "group_rms_norm": Saves((0, 1), internal=_rms_stats(_last_dim(1))),  # per group: G = the weight's length
    "group_rms_norm_biased": Saves((0, 1), internal=_rms_stats(_last_dim(1))),  # + bias keeps nothing
    "group_layer_norm": Saves((0, 1, 2), internal=_layer_stats(_last_dim(1))),
    "group_layer_norm_unbiased": Saves((0, 1), internal=_layer_stats(_last_dim(1))),
    "rope": Saves(internal=_rope),
    "causal_attention": Saves(internal=_attention),
    "sdpa_attention": Saves((0, 1, 2), output=True, internal=_sdpa),
    "swiglu": Saves((0, 1), internal=lambda o, i, n, s: o),  # silu(gate)
    "gelu": Saves((0,)),
    "activation": Saves((0,)),
    "sigmoid": Saves(output=True),
    "normalize_sum": Saves((0,), internal=lambda o, i, n, s: o / s[-1]),  # x and its sum per row
    "mul": Saves((0, 1)),
    "add": NOTHING,
    "leading_features": Saves(view_of=0),  # x[..., :width]
    "grid_scores": NOTHING,
    "sum_cores": NOTHING,
    "column_sums": NOTHING,
    "half_prob_sums": NOTHING,
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
    # embedding_bag (mode="sum", per_sample_weights) keeps the table (a parameter, or its bf16 copy),
    # the ids, the weights and three int64 arrays of one entry per token (offsets, bag sizes), never
    # the (B, T, H, K, D) gathered rows
    "gather_weighted_sum": Saves((0, 1, 2), internal=lambda o, i, n, s: 3 * 8 * numel(s[:-1])),
    "rank_one_scores": Saves((1,)),
    "tucker_scores": Saves((1,), internal=_tucker_scores),
    "core_pool": Saves((1,), internal=lambda o, i, n, s: i[0]),  # the rows regrouped into chunks
    "ive_pool": Saves((0, 2), internal=lambda o, i, n, s: i[1]),
    "tucker_grid": Saves(internal=_tucker_grid),
    "expert_ffn": Saves((3, 4, 5), internal=_expert_ffn),
    "expert_ffn_biased": Saves((3, 4, 5), internal=_expert_ffn),  # the biases: nothing more
    "expert_bias": Saves((0, 1), internal=_expert_bias),
    "balance_loss": Saves(internal=_loss_shares),
    "key_balance_loss": Saves(internal=_loss_shares),
}


# the fused ops of passes/fuse.py and fuse_graph.py
# each token's hidden dotted with its gathered rows keeps the table (a parameter: its compute copy under
# mixed precision), the ids and the hidden, not the (B, T, H, K, D) rows
SAVES["gather_row_dot"] = Saves((0, 1, 2))
# a selected slot's score gathers its row and column keys' scores: each gather keeps the scores and its int64 ids
SAVES["pk_slot_scores"] = Saves((0,), internal=lambda o, i, n, s: 2 * 8 * numel(s))
# the residual add + RMSNorm keeps its stacked output (the sum it saves is a view of it) and one
# 1/rms per row (the output is (B, T, 2, D): rows = O / (2 D)); pair_part is a view of it
SAVES["add_rms_norm"] = Saves(output=True, internal=lambda o, i, n, s: o / (2 * s[-1]))
SAVES["pair_part"] = Saves(view_of=0)
# UltraMem's selected scores keep the row and column keys' rank vectors (2 R per slot, the output's
# dtype: O * 2 R / C), the cores and the int64 slots; the fused poolings keep the table, ids, weights
# (and IVE's block ids), never the (B, T, H, M, V) gathered rows
SAVES["tucker_slot_scores"] = Saves((1, 2), internal=lambda o, i, n, s: 2 * o * info(tensor_args(n)[1]).shape[-1] / s[-2])
SAVES["gather_core_pool"] = Saves((0, 1, 2))
SAVES["gather_ive_pool"] = Saves((0, 1, 2, 3))


def _expert_parallel_ffn(out, ins, node, local_out):
    # runtime.expert_parallel_ffn (experts split over mesh axes), e the element size of x. Per
    # (token, slot) assignment of this device (A = tokens x K): the rows sent back and their
    # gate-weighted copy (D each: saved by the product and by index_add), the gate (1), the sort order
    # and the token index (int64: 16 B). Per row received (R, routing-dependent; its mean over the
    # devices of its group is A): the row (D, saved by the up and gate projections), the expert's
    # output (D, saved by index_add), up, gate, silu(gate) and their product (4 F; gelu: up and its
    # value, 2 F) and the row's index (int64: 8 B). Measured with saved_tensors_hooks on moe-tiny, ep
    # on 2 devices: 236,544 bytes per layer in float32 in the mean over devices, exactly this.
    args = tensor_args(node)
    k, width, d = info(args[1]).shape[-1], info(args[3]).shape[1], local_out[-1]
    e = _width(node)
    assignments = out / e / d * k
    hidden = 4 if _attr(node, "activation") == "swiglu" else 2
    return assignments * ((4 * d + hidden * width + 1) * e + 24)


EXPERT_PARALLEL = Saves((3, 4, 5), internal=_expert_parallel_ffn)  # the local experts' weights, as expert_ffn


def rule_for(op: str, variants) -> Saves | None:
    """The saved-tensor rule of an ``op`` run with these per-axis ``variants`` (None where an axis runs
    none): the op kind's, or the expert-parallel variant's. The search prices each candidate by it."""
    if any(v is not None and v.name == "expert_parallel" for v in variants):
        return EXPERT_PARALLEL
    return SAVES.get(op)


def _rule(node: fx.Node) -> Saves | None:
    """The node's saved-tensor rule, as its plan runs it."""
    return rule_for(info(node).op, info(node).variant or ())


_LOCAL: dict[tuple, tuple[sympy.Expr, tuple]] = {}  # (shape, nd-SBP, dtype, sizes) -> bytes and dims


def _local_bytes(node: fx.Node, sizes: list) -> tuple[sympy.Expr, tuple]:
    """The bytes and dims of ``node``'s value on one device; memoised, as identical layers repeat the
    same few (shape, layout) pairs and sympy's products were most of saved_bytes' time."""
    rec = info(node)
    sbp = rec.sbp.output if rec.sbp is not None else rec.at_rest
    key = (tuple(rec.shape), sbp, rec.dtype, tuple(sizes))
    if key not in _LOCAL:
        if len(_LOCAL) > 100_000:
            _LOCAL.clear()
        dims = local_dims(rec.shape, sbp, sizes) if sbp is not None else tuple(rec.shape)
        _LOCAL[key] = (numel(dims) * BYTES_PER_ELEMENT.get(rec.dtype, 4), dims)
    return _LOCAL[key]


def _is_param(node: fx.Node) -> bool:
    return info(node).op == "param"


def _is_gathered_param(node: fx.Node) -> bool:
    return info(node).op == "boxing" and _is_param(node.args[0])


def _storage(value: fx.Node) -> fx.Node:
    """The value whose storage ``value`` lives in: itself, or the base of a view op (``view_of``)."""
    rule = SAVES.get(info(value).op)
    while value.op == "call_function" and rule is not None and rule.view_of is not None:
        value = tensor_args(value)[rule.view_of]
        rule = SAVES.get(info(value).op)
    return value


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
        for value in map(_storage, kept):
            if _is_param(value):
                if info(value).dtype != master:
                    copies[value.name] = _local_bytes(value, sizes)[0]
                continue
            target = gathered if _is_gathered_param(value) else values
            target[value.name] = _local_bytes(value, sizes)[0]
        if rule.internal is not None:
            internal.append(rule.internal(out, ins, node, dims))
    return sympy.Add(*internal, *values.values()), sympy.Add(*gathered.values()), sympy.Add(*copies.values())
