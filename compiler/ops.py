"""The op vocabulary of ultraplan: plain torch functions, one per graph node kind.

This file must import nothing but torch (and its neighbour ops_fused.py, UltraMem's fused ops, which it
imports at its end and re-exports): it is copied verbatim next to every emitted program
(as ``ops.py``), so the eager reference and the emitted program share the arithmetic of each op,
while the model structure, sharding, data split, collectives and training loop are independent.
Lowering traces the eager model with these functions as leaves, so each call is one fx node.

Shape legend: B batch, T sequence, D hidden, H query heads, K kv heads, E head dim, V vocab.
"""

import torch
import torch.nn.functional as F


def embedding(tokens_BT: torch.Tensor, weight_VD: torch.Tensor) -> torch.Tensor:
    """Row lookup: (B, T) int64 -> (B, T, D)."""
    return F.embedding(tokens_BT, weight_VD)


def embedding_rows(tokens_BT: torch.Tensor, weight_RD: torch.Tensor, row_start: int) -> torch.Tensor:
    """A vocabulary-split table's share of a lookup: this shard holds rows [row_start, row_start + R);
    ids outside it look up zeros, so the shards' outputs sum to the whole lookup (and rows another
    shard holds get no gradient here)."""
    local = tokens_BT - row_start
    inside = (local >= 0) & (local < weight_RD.shape[0])
    rows = F.embedding(local.clamp(0, weight_RD.shape[0] - 1), weight_RD)
    return rows * inside.unsqueeze(-1).to(rows.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight, over the last dim."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def linear(x: torch.Tensor, weight_OI: torch.Tensor) -> torch.Tensor:
    """x @ weight.T with weight stored (out, in), as torch.nn.Linear stores it; no bias."""
    return F.linear(x, weight_OI)


def bias_add(x: torch.Tensor, bias_O: torch.Tensor) -> torch.Tensor:
    """A projection's bias: x (..., O) + bias (O,). Its own op (not a linear with bias) so a
    row-parallel layer's bias is added once, after the all-reduce (Megatron-LM's RowParallelLinear)."""
    return x + bias_O


def head_rms_norm(x_BTX: torch.Tensor, weight_E: torch.Tensor, num_heads: int, eps: float) -> torch.Tensor:
    """RMSNorm of each head's slice of (B, T, num_heads * E), one (E,) scale shared by every head:
    Qwen3's q_norm / k_norm (HF transformers modeling_qwen3.py, applied before RoPE)."""
    b, t, _ = x_BTX.shape
    x = x_BTX.view(b, t, num_heads, -1)
    return (x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight_E).reshape(b, t, -1)


def add_positions(x_BTD: torch.Tensor, weight_PD: torch.Tensor) -> torch.Tensor:
    """Learned absolute positions (GPT-2's wpe): row t of the table added at position t, t = 0..T-1."""
    return x_BTD + weight_PD[: x_BTD.shape[1]]


def rope(x_BTX: torch.Tensor, num_heads: int, head_dim: int, theta: float) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021), rotating the two halves of each head.

    x is (B, T, num_heads * head_dim); positions are 0..T-1.
    """
    b, t, _ = x_BTX.shape
    x = x_BTX.view(b, t, num_heads, head_dim)
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, dtype=torch.float32, device=x.device) / half))
    angles = torch.arange(t, dtype=torch.float32, device=x.device)[:, None] * inv_freq[None, :]
    cos = angles.cos()[None, :, None, :].to(x.dtype)
    sin = angles.sin()[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.reshape(b, t, num_heads * head_dim)


def causal_attention(
    q_BTX: torch.Tensor, k_BTY: torch.Tensor, v_BTY: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> torch.Tensor:
    """Causal softmax attention with grouped kv heads: (B, T, H*E), (B, T, K*E) x2 -> (B, T, H*E).

    Written as two batched matmuls around a masked softmax (not fused SDPA) so that it runs the
    same on every backend and torch's FlopCounterMode counts exactly the two matmuls.
    """
    b, t, _ = q_BTX.shape
    q = q_BTX.view(b, t, num_heads, head_dim).transpose(1, 2)
    k = k_BTY.view(b, t, num_kv_heads, head_dim).transpose(1, 2)
    v = v_BTY.view(b, t, num_kv_heads, head_dim).transpose(1, 2)
    group = num_heads // num_kv_heads
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (head_dim ** -0.5)
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2).reshape(b, t, num_heads * head_dim)


def attention_kv_shard(q_BTX: torch.Tensor, k_BTY: torch.Tensor, v_BTY: torch.Tensor, num_heads: int,
                       total_heads: int, num_kv_heads: int, head_dim: int, q_head_start: int) -> torch.Tensor:
    """Causal attention of a shard holding query heads [q_head_start, q_head_start + num_heads) of
    ``total_heads`` and every one of the ``num_kv_heads`` key/value heads: it reads the kv heads its
    query heads use (head h uses kv head h // (total_heads / num_kv_heads))."""
    group = total_heads // num_kv_heads
    first, last = q_head_start // group, (q_head_start + num_heads - 1) // group
    k = k_BTY[..., first * head_dim:(last + 1) * head_dim]
    v = v_BTY[..., first * head_dim:(last + 1) * head_dim]
    return causal_attention(q_BTX, k, v, num_heads, last - first + 1, head_dim)


def sdpa_attention(
    q_BTX: torch.Tensor, k_BTY: torch.Tensor, v_BTY: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> torch.Tensor:
    """``causal_attention`` through torch's fused ``scaled_dot_product_attention`` (is_causal, kv
    heads shared by ``enable_gqa``): the same function, but the (B, H, T, T) scores and probabilities
    never reach memory and are not saved for the backward (FlashAttention, Dao et al. 2022 sec. 3.1;
    on the CPU torch runs its tiled flash kernel). The fusion pass (passes/fuse.py) puts it in place
    of ``causal_attention``; the scale is the default 1/sqrt(head_dim), as there."""
    b, t, _ = q_BTX.shape
    q = q_BTX.view(b, t, num_heads, head_dim).transpose(1, 2)
    k = k_BTY.view(b, t, num_kv_heads, head_dim).transpose(1, 2)
    v = v_BTY.view(b, t, num_kv_heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=num_heads != num_kv_heads)
    return out.transpose(1, 2).reshape(b, t, num_heads * head_dim)


def sdpa_attention_kv_shard(q_BTX: torch.Tensor, k_BTY: torch.Tensor, v_BTY: torch.Tensor, num_heads: int,
                            total_heads: int, num_kv_heads: int, head_dim: int, q_head_start: int) -> torch.Tensor:
    """``attention_kv_shard`` through ``sdpa_attention``: the kv heads this shard's query heads use."""
    group = total_heads // num_kv_heads
    first, last = q_head_start // group, (q_head_start + num_heads - 1) // group
    k = k_BTY[..., first * head_dim:(last + 1) * head_dim]
    v = v_BTY[..., first * head_dim:(last + 1) * head_dim]
    return sdpa_attention(q_BTX, k, v, num_heads, last - first + 1, head_dim)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU gating (Shazeer 2020): silu(gate) * up."""
    return F.silu(gate) * up


class _AddRmsNorm(torch.autograd.Function):
    """``add_rms_norm``'s forward and backward: the sum and its norm from one read of x and y, and
    one gradient for the sum (the residual's plus the norm's) written once."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out = x.new_empty((*x.shape[:-1], 2, x.shape[-1]),
                          dtype=torch.promote_types(torch.result_type(x, y), weight.dtype))
        total = torch.add(x, y, out=out[..., 0, :])
        rstd = torch.rsqrt(total.pow(2).mean(dim=-1, keepdim=True) + eps)
        torch.mul(total * rstd, weight, out=out[..., 1, :])
        ctx.save_for_backward(out, rstd, weight)  # the output itself (the sum is a view of it)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        out, rstd, weight = ctx.saved_tensors
        total = out[..., 0, :]
        g_sum, g_norm = grad[..., 0, :], grad[..., 1, :]
        normed = total * rstd
        gw = g_norm * weight
        # d/dx of x * rsqrt(mean(x^2) + eps): rstd * (gw - normed * mean(gw * normed))
        g_total = g_sum + rstd * (gw - normed * (gw * normed).mean(dim=-1, keepdim=True))
        g_weight = (g_norm * normed).flatten(0, -2).sum(dim=0) if ctx.needs_input_grad[2] else None
        return g_total, g_total, g_weight, None


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``add(x, y)`` and ``rms_norm`` of it in one op, stacked next to last: (..., 2, D) holding the sum
    (the residual stream goes on with it) and its norm, read by ``pair_part`` (the leading dims keep
    their meaning, so a layout of the residual stream is one of this too). Unfused, the norm reads the sum back
    and the backward writes the norm's input gradient and reads it back to add the residual's; here
    both are one pass (the fused add + RMSNorm of Megatron-LM / Apex ``FusedRMSNorm`` with residual).
    The fusion pass (passes/fuse.py) puts it in place of the two ops when both results are used."""
    kernel = KERNELS.get("add_rms_norm")
    if kernel is not None:
        return kernel(x, y, weight, eps)
    return _AddRmsNorm.apply(x, y, weight, eps)


def pair_part(pair: torch.Tensor, index: int) -> torch.Tensor:
    """One result of a fused op that returns two stacked next to last (``add_rms_norm``): a view."""
    return pair[..., index, :]


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (as in GPT-2)."""
    return F.gelu(x, approximate="tanh")


def add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Residual addition."""
    return x + y


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype a backward sums many products into: float32 for bfloat16 and float16, else the dtype
    itself. CUDA's index_add_ adds atomically in the tensor's dtype, rounding every addition: on an H200
    the bf16 gradients of gather_core_pool's torch form, summed that way, were 4% (of the largest value)
    off the unfused ops', where its Triton kernel, summing in float32, was 0.5% off (bench/kernels.py)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is a 16-bit float, else as it is (float64 checks stay float64): the
    losses compute in float32 under mixed precision (docs/precision.md)."""
    return x.to(_accumulator(x.dtype))


def cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over every position of this batch (in at least float32: the
    log-sum-exp over the vocabulary is where 16-bit rounding would hurt most)."""
    return F.cross_entropy(_at_least_fp32(logits_BTV).flatten(0, 1), targets_BT.flatten())


# ---- sparse retrieval (product keys, experts) -------------------------------------------------
# Every step of a lookup is its own op (so its own graph node, shardable and fusable later), and
# every op returns one tensor. Shape legend: H retrieval heads, C = 2 key halves, N keys per
# half, K selected, S slots (N*N), R rows of a table, E experts.


def pk_scores(q_BTX: torch.Tensor, keys_HCNQ: torch.Tensor) -> torch.Tensor:
    """Score each half of each head's query against that half's sub-keys.

    q is (B, T, H*C*Q) (C = 2 halves of width Q), keys (H, C, N, Q) -> (B, T, H, C, N).
    """
    b, t, _ = q_BTX.shape
    h, c, _, width = keys_HCNQ.shape
    q = q_BTX.view(b, t, h, c, width)
    return torch.einsum("bthcq,hcnq->bthcn", q, keys_HCNQ)


def group_layer_norm(x: torch.Tensor, weight_G: torch.Tensor, bias_G: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over consecutive groups of G features of the last dim (one affine shared by all)."""
    group = weight_G.shape[0]
    shaped = x.view(*x.shape[:-1], -1, group)
    return F.layer_norm(shaped, (group,), weight_G, bias_G, eps).view(x.shape)


def group_rms_norm(x: torch.Tensor, weight_G: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (weight only) over consecutive groups of G features of the last dim: the query and
    key norms of the official UltraMem code under the OLMoE configs (``layer_norm_type: rms``,
    ``bias_for_layer_norm: false``; Ultra-Sparse-Memory-Network olmo/model.py RMSLayerNorm)."""
    group = weight_G.shape[0]
    shaped = x.view(*x.shape[:-1], -1, group)
    return (shaped * torch.rsqrt(shaped.pow(2).mean(-1, keepdim=True) + eps) * weight_G).view(x.shape)


def group_rms_norm_biased(x: torch.Tensor, weight_G: torch.Tensor, bias_G: torch.Tensor, eps: float) -> torch.Tensor:
    """``group_rms_norm`` plus a bias, weight * x / rms(x) + bias: the official RMSLayerNorm with
    ``bias_for_layer_norm: true`` (Ultra-Sparse-Memory-Network olmo/model.py:227-256)."""
    group = weight_G.shape[0]
    shaped = x.view(*x.shape[:-1], -1, group)
    return (shaped * torch.rsqrt(shaped.pow(2).mean(-1, keepdim=True) + eps) * weight_G + bias_G).view(x.shape)


def group_layer_norm_unbiased(x: torch.Tensor, weight_G: torch.Tensor, eps: float) -> torch.Tensor:
    """``group_layer_norm`` with a weight only: the official LayerNorm with ``bias_for_layer_norm:
    false`` (Ultra-Sparse-Memory-Network olmo/model.py:150-160, 196-224)."""
    group = weight_G.shape[0]
    shaped = x.view(*x.shape[:-1], -1, group)
    return F.layer_norm(shaped, (group,), weight_G, None, eps).view(x.shape)


def leading_features(x: torch.Tensor, width: int) -> torch.Tensor:
    """The first ``width`` features of the last dim (a projection's rows that are read)."""
    return x[..., :width]


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim, largest first (int64)."""
    return torch.topk(scores, k, dim=-1).indices


def take(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``values`` at ``indices`` along the last dim (torch.gather); indices have values' leading dims."""
    return torch.gather(values, -1, indices)


def grid_scores(half_scores_BTHCK: torch.Tensor) -> torch.Tensor:
    """All K*K sums of a row-half score and a column-half score: (B, T, H, 2, K) -> (B, T, H, K*K)."""
    row, col = half_scores_BTHCK[..., 0, :], half_scores_BTHCK[..., 1, :]
    return (row.unsqueeze(-1) + col.unsqueeze(-2)).flatten(-2)


def grid_indices(half_indices_BTHCK: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Slot index row*N + col of every K*K candidate: (B, T, H, 2, K) -> (B, T, H, K*K)."""
    row, col = half_indices_BTHCK[..., 0, :], half_indices_BTHCK[..., 1, :]
    return (row.unsqueeze(-1) * num_keys + col.unsqueeze(-2)).flatten(-2)


def pk_topk(half_scores_BTHCN: torch.Tensor, half_k: int, k: int, num_keys: int) -> torch.Tensor:
    """Product-key retrieval's selection in one op: each half's top ``half_k`` keys, the half_k x half_k
    grid of their sums, its top ``k`` -> the slots (row * N + col), (B, T, H, k) int64. The same ops
    as unfused (topk_indices, take, grid_scores, grid_indices, topk_indices, take), so the same
    indices and the same tie-breaking; the grid is made and dropped inside, never saved for the
    backward (no gradient flows through indices; ``pk_slot_scores`` gives the scores'). The fusion
    pass (passes/fuse_graph.py) puts it in place of those ops (Lample et al. 2019, sec. 3.2)."""
    kernel = KERNELS.get("pk_topk")
    if kernel is not None:
        return kernel(half_scores_BTHCN, half_k, k, num_keys)
    with torch.no_grad():
        half_best = topk_indices(half_scores_BTHCN, half_k)
        grid = grid_scores(take(half_scores_BTHCN, half_best))
        return take(grid_indices(half_best, num_keys), topk_indices(grid, k))


def pk_slot_scores(half_scores_BTHCN: torch.Tensor, slots_BTHK: torch.Tensor, num_keys: int) -> torch.Tensor:
    """The score of each selected slot, its row key's score plus its column key's (the grid's sum,
    in the same order, so equal to the unfused ``take(grid, best)`` bit for bit) -> (B, T, H, K). Its
    backward adds each slot's gradient into its two keys' scores, as the unfused takes do."""
    kernel = KERNELS.get("pk_slot_scores")
    if kernel is not None:
        return kernel(half_scores_BTHCN, slots_BTHK, num_keys)
    row = torch.gather(half_scores_BTHCN[..., 0, :], -1, torch.div(slots_BTHK, num_keys, rounding_mode="floor"))
    col = torch.gather(half_scores_BTHCN[..., 1, :], -1, slots_BTHK % num_keys)
    return row + col


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim."""
    return torch.softmax(x, dim=-1)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x)


def normalize_sum(x: torch.Tensor) -> torch.Tensor:
    """Divide by the sum over the last dim (renormalise the kept top-k gates)."""
    return x / x.sum(dim=-1, keepdim=True)


def gather_rows(table_RD: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows of a table: (R, D) at indices (...) -> (..., D). Only the selected rows get gradients."""
    return F.embedding(indices, table_RD)


def weighted_sum(rows_BTHKD: torch.Tensor, weights_BTHK: torch.Tensor) -> torch.Tensor:
    """Sum of selected rows weighted by their gates, over heads and selections -> (B, T, D)."""
    return torch.einsum("bthkd,bthk->btd", rows_BTHKD, weights_BTHK)


# Generated kernels of fused ops by op name: an emitted program run with ``--kernels triton`` fills
# this from its kernels.py; left empty (the eager reference, ``--kernels torch``) the torch code runs.
KERNELS: dict = {}


def gather_weighted_sum(table_RD: torch.Tensor, indices_BTHK: torch.Tensor, weights_BTHK: torch.Tensor) -> torch.Tensor:
    """``weighted_sum(gather_rows(table, indices), weights)`` without the (B, T, H, K, D) gathered
    rows: torch's ``embedding_bag`` (mode="sum", per_sample_weights) sums each token's H*K weighted
    rows as it reads them, and its backward scatter-adds the weighted output gradient into the rows
    and dots it with them for the weights' gradient. The fusion pass (passes/fuse.py) puts it in
    place of the two ops; Meta's memory layers use the same op (Berges et al. 2024, sec. 3.2)."""
    kernel = KERNELS.get("gather_weighted_sum")
    if kernel is not None:
        return kernel(table_RD, indices_BTHK, weights_BTHK)
    return _bag(table_RD, indices_BTHK, weights_BTHK)


def _bag(table_RD: torch.Tensor, indices_BTHK: torch.Tensor, weights_BTHK: torch.Tensor) -> torch.Tensor:
    """Each token's H*K rows of the table, weighted and summed -> (B, T, D), by embedding_bag."""
    if (torch.is_grad_enabled() and weights_BTHK.requires_grad and table_RD.is_cuda
            and _accumulator(table_RD.dtype) != table_RD.dtype):
        return _LowPrecisionBag.apply(table_RD, indices_BTHK, weights_BTHK)
    b, t = indices_BTHK.shape[:2]
    per_token = indices_BTHK.shape[2:].numel()
    out = F.embedding_bag(indices_BTHK.reshape(b * t, per_token), table_RD,
                          per_sample_weights=weights_BTHK.reshape(b * t, per_token), mode="sum")
    return out.view(b, t, table_RD.shape[1])


class _LowPrecisionBag(torch.autograd.Function):
    """``_bag`` where torch's CUDA embedding_bag has no backward for the weights in bfloat16 or
    float16 ("_embedding_bag_per_sample_weights_backward_cuda" not implemented, torch 2.11; seen on an
    H200 by bench/kernels.py): the same forward, and a backward that gathers the rows once,
    transiently, for the weights' gradient (each picked row dotted with its token's output gradient)
    and scatter-adds the weighted output gradient into the table."""

    @staticmethod
    def forward(ctx, table_RD: torch.Tensor, indices_BTHK: torch.Tensor, weights_BTHK: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(table_RD, indices_BTHK, weights_BTHK)
        return _bag(table_RD, indices_BTHK, weights_BTHK)  # gradients off in here: embedding_bag's own forward

    @staticmethod
    def backward(ctx, grad_BTD: torch.Tensor) -> tuple:
        table, indices, weights = ctx.saved_tensors
        g_table = g_weights = None
        if ctx.needs_input_grad[2]:  # each pick's row dotted with its token's output gradient: gather_row_dot
            g_weights = _row_dots(table, indices, grad_BTD)
        if ctx.needs_input_grad[0]:
            g_table = _table_gradient(table, indices, weights, grad_BTD)
        return g_table, None, g_weights


def _row_dots(table_RD: torch.Tensor, indices_BTHK: torch.Tensor, x_BTD: torch.Tensor) -> torch.Tensor:
    """Each picked row dotted with its token's vector -> (B, T, H, K): gather_row_dot's forward, and the
    weights' gradient of a weighted bag (``_LowPrecisionBag``), the rows gathered transiently."""
    return torch.einsum("btd,bthkd->bthk", x_BTD, F.embedding(indices_BTHK, table_RD))


def _table_gradient(table_RD: torch.Tensor, indices_BTHK: torch.Tensor, per_pick_BTHK: torch.Tensor,
                    per_token_BTD: torch.Tensor) -> torch.Tensor:
    """The table's gradient of a lookup whose pick (t, h, k) adds ``per_pick * per_token[t]`` to row
    ``indices[t, h, k]``: the products scatter-added into a zero table, summed in at least float32."""
    b, t, d = per_token_BTD.shape
    per_token = indices_BTHK.shape[2:].numel()
    wide = _accumulator(table_RD.dtype)
    rows = per_pick_BTHK.to(wide).reshape(b * t, per_token, 1) * per_token_BTD.to(wide).reshape(b * t, 1, d)
    g_table = torch.zeros_like(table_RD, dtype=wide).index_add_(0, indices_BTHK.reshape(-1), rows.reshape(-1, d))
    return g_table.to(table_RD.dtype)


def _owned(indices: torch.Tensor, rows: int, row_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids local to a block of ``rows`` rows starting at ``row_start`` (clamped into it), and which
    of them it holds."""
    local = indices - row_start
    inside = (local >= 0) & (local < rows)
    return local.clamp(0, rows - 1), inside


def gather_rows_owned(table_RD: torch.Tensor, indices: torch.Tensor, row_start: int) -> torch.Tensor:
    """A number-wise table shard's share of ``gather_rows``: this shard holds rows [row_start,
    row_start + R); ids outside it read zeros, so the shards' outputs sum to the whole lookup (and
    only owned rows get gradients here)."""
    local, inside = _owned(indices, table_RD.shape[0], row_start)
    return F.embedding(local, table_RD) * inside.unsqueeze(-1).to(table_RD.dtype)


def gather_weighted_sum_owned(table_RD: torch.Tensor, indices_BTHK: torch.Tensor, weights_BTHK: torch.Tensor,
                              row_start: int) -> torch.Tensor:
    """A number-wise table shard's share of ``gather_weighted_sum``: the picks of rows this shard
    holds ([row_start, row_start + R)), the others weighted 0, so the shards' outputs sum to the whole
    bag and each weight's gradient comes from the one shard that holds its row."""
    local, inside = _owned(indices_BTHK, table_RD.shape[0], row_start)
    return gather_weighted_sum(table_RD, local, weights_BTHK * inside.to(weights_BTHK.dtype))


class _GatherRowDot(torch.autograd.Function):
    """``gather_row_dot``'s forward and backward. Neither keeps the gathered rows: the hidden's
    gradient is an embedding_bag of the rows weighted by the score gradient, the table's an
    index_add of the score gradient times the token's hidden."""

    @staticmethod
    def forward(ctx, table_RD: torch.Tensor, indices_BTHK: torch.Tensor, x_BTD: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(table_RD, indices_BTHK, x_BTD)
        return _row_dots(table_RD, indices_BTHK, x_BTD)

    @staticmethod
    def backward(ctx, grad_BTHK: torch.Tensor) -> tuple:
        table, indices, x = ctx.saved_tensors
        g_table = g_x = None
        if ctx.needs_input_grad[2]:
            g_x = _bag(table, indices, grad_BTHK)
        if ctx.needs_input_grad[0]:
            g_table = _table_gradient(table, indices, grad_BTHK, x)
        return g_table, None, g_x


def gather_row_dot(table_RD: torch.Tensor, indices_BTHK: torch.Tensor, x_BTD: torch.Tensor) -> torch.Tensor:
    """``row_dot(x, gather_rows(table, indices))`` without keeping the (B, T, H, K, D) rows for the
    backward (a kernel need not write them at all): PEER's down projections (each token's hidden
    against its experts' down rows) and UltraMemV2's pre-value gate (against its pre-value rows).
    The fusion pass (passes/fuse.py) puts it in place of the two ops."""
    kernel = KERNELS.get("gather_row_dot")
    if kernel is not None:
        return kernel(table_RD, indices_BTHK, x_BTD)
    return _GatherRowDot.apply(table_RD, indices_BTHK, x_BTD)


def gather_row_dot_owned(table_RD: torch.Tensor, indices_BTHK: torch.Tensor, x_BTD: torch.Tensor,
                         row_start: int) -> torch.Tensor:
    """A number-wise table shard's share of ``gather_row_dot``: the dots of picks whose rows this
    shard holds ([row_start, row_start + R)), 0 for the others, so the shards' outputs sum to the
    whole and each row's gradient comes from the one shard that holds it."""
    local, inside = _owned(indices_BTHK, table_RD.shape[0], row_start)
    return gather_row_dot(table_RD, local, x_BTD) * inside.to(x_BTD.dtype)


def row_dot(x_BTD: torch.Tensor, rows_BTHKD: torch.Tensor) -> torch.Tensor:
    """Each token's dot product with each of its selected rows -> (B, T, H, K)."""
    return torch.einsum("btd,bthkd->bthk", x_BTD, rows_BTHKD)


def activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    """gelu (tanh approximation), gelu_erf (exact, torch's default), relu or silu."""
    if kind == "gelu":
        return F.gelu(x, approximate="tanh")
    if kind == "gelu_erf":
        return F.gelu(x)
    if kind == "relu":
        return F.relu(x)
    if kind == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {kind!r}")


def mul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise product."""
    return x * y


def expert_ffn(
    x_BTD: torch.Tensor,
    indices_BTK: torch.Tensor,
    gates_BTK: torch.Tensor,
    w_up_EFD: torch.Tensor,
    w_gate_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Dropless mixture of experts: each token through each of its K experts, gate-weighted, summed.

    No capacity factor, so no token is ever dropped and a token's output does not depend on the
    rest of the batch. ``activation`` is ``swiglu`` (uses w_gate) or ``gelu`` (w_gate unused,
    pass w_up again). Experts run on exactly the tokens routed to them, in expert order.
    """
    b, t, d = x_BTD.shape
    x = x_BTD.reshape(b * t, d)
    indices = indices_BTK.reshape(b * t, -1)
    gates = gates_BTK.reshape(b * t, -1)
    out = torch.zeros_like(x)
    for expert in range(w_up_EFD.shape[0]):
        token, slot = torch.nonzero(indices == expert, as_tuple=True)
        if token.numel() == 0:
            continue
        h = x[token]
        up = F.linear(h, w_up_EFD[expert])
        act = F.silu(F.linear(h, w_gate_EFD[expert])) * up if activation == "swiglu" else F.gelu(up, approximate="tanh")
        y = F.linear(act, w_down_EDF[expert]) * gates[token, slot].unsqueeze(-1)
        out = out.index_add(0, token, y)
    return out.reshape(b, t, d)


def expert_ffn_biased(
    x_BTD: torch.Tensor,
    indices_BTK: torch.Tensor,
    gates_BTK: torch.Tensor,
    w_up_EFD: torch.Tensor,
    w_gate_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    b_up_EF: torch.Tensor,
    b_gate_EF: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """``expert_ffn`` with each expert's up (and gate) biases inside it (gelu: pass b_up again). The
    down projection's biases are ``expert_bias``'s, added outside, so that a split of the experts'
    hidden width (a partial-sum output) still adds them once."""
    b, t, d = x_BTD.shape
    x = x_BTD.reshape(b * t, d)
    indices = indices_BTK.reshape(b * t, -1)
    gates = gates_BTK.reshape(b * t, -1)
    out = torch.zeros_like(x)
    for expert in range(w_up_EFD.shape[0]):
        token, slot = torch.nonzero(indices == expert, as_tuple=True)
        if token.numel() == 0:
            continue
        h = x[token]
        up = F.linear(h, w_up_EFD[expert], b_up_EF[expert])
        act = (F.silu(F.linear(h, w_gate_EFD[expert], b_gate_EF[expert])) * up if activation == "swiglu"
               else F.gelu(up, approximate="tanh"))
        y = F.linear(act, w_down_EDF[expert]) * gates[token, slot].unsqueeze(-1)
        out = out.index_add(0, token, y)
    return out.reshape(b, t, d)


def expert_bias(indices_BTK: torch.Tensor, gates_BTK: torch.Tensor, b_down_ED: torch.Tensor) -> torch.Tensor:
    """The chosen experts' down-projection biases, gate-weighted and summed -> (B, T, D)."""
    return (b_down_ED[indices_BTK] * gates_BTK.unsqueeze(-1)).sum(dim=-2)


# ---- Tucker-decomposed query-key retrieval (UltraMem / UltraMemV2) ------------------------------
# R Tucker rank, C cores, M selected per half and in the end, P rows of a (possibly shared) table.


def tucker_scores(q_BTX: torch.Tensor, keys_HCRND: torch.Tensor, query_ranks: int, query_heads: int = 0) -> torch.Tensor:
    """Per-rank half scores: q (B, T, Hq*2*Rq*D) with Rq = 1 or R, keys (H, 2, R, N, D) -> (B, T, H, 2, R, N).

    ``query_heads`` Hq < H shares each query among H/Hq consecutive heads (UltraMem's shared query).
    """
    b, t, _ = q_BTX.shape
    h, c, r, _, d = keys_HCRND.shape
    hq = query_heads or h
    q = q_BTX.view(b, t, hq, c, query_ranks, d)
    if hq != h:
        q = q.repeat_interleave(h // hq, dim=2)
    if query_ranks != r:
        q = q.expand(b, t, h, c, r, d)
    return torch.einsum("bthcrd,hcrnd->bthcrn", q, keys_HCRND)


def rank_one_scores(scores_BTHCRN: torch.Tensor, rank_one_2HR: torch.Tensor) -> torch.Tensor:
    """The rank-1 filter: row scores weighted by u, column scores by t -> (B, T, H, 2, N)."""
    return torch.einsum("bthcrn,chr->bthcn", scores_BTHCRN, rank_one_2HR)


def take_ranked(scores_BTHCRN: torch.Tensor, indices_BTHCM: torch.Tensor) -> torch.Tensor:
    """Every rank's score at the selected keys: -> (B, T, H, 2, R, M)."""
    ranks = scores_BTHCRN.shape[-2]
    index = indices_BTHCM.unsqueeze(-2).expand(*indices_BTHCM.shape[:-1], ranks, indices_BTHCM.shape[-1])
    return torch.gather(scores_BTHCRN, -1, index)


def tucker_grid(kept_BTHCRM: torch.Tensor, cores_HKRR: torch.Tensor) -> torch.Tensor:
    """Exact bilinear rescoring of the M x M grid by each core: row_i^T C_k col_j -> (B, T, H, K, M*M).

    Two products in a fixed order (row by core, then by column) so the FLOP count is defined.
    """
    row, col = kept_BTHCRM[..., 0, :, :], kept_BTHCRM[..., 1, :, :]
    row_core = torch.einsum("bthri,hkrs->bthksi", row, cores_HKRR)
    return torch.einsum("bthksi,bthsj->bthkij", row_core, col).flatten(-2)


def sum_cores(grid_BTHKS: torch.Tensor) -> torch.Tensor:
    """Total score over cores -> (B, T, H, S)."""
    return grid_BTHKS.sum(dim=-2)


def take_cores(grid_BTHKS: torch.Tensor, indices_BTHM: torch.Tensor) -> torch.Tensor:
    """Each core's score at the selected slots -> (B, T, H, K, M)."""
    cores = grid_BTHKS.shape[-2]
    index = indices_BTHM.unsqueeze(-2).expand(*indices_BTHM.shape[:-1], cores, indices_BTHM.shape[-1])
    return torch.gather(grid_BTHKS, -1, index)


def shuffle_rows(slots: torch.Tensor, permutation: torch.Tensor, offset: int, rows: int) -> torch.Tensor:
    """Table row of each slot: a fixed permutation (IVE's shuffle), shifted to this layer's share, wrapped."""
    return (permutation[slots] + offset) % rows


def expanded_rows(slots: torch.Tensor, permutation: torch.Tensor, value_rows: int, offset: int, rows: int) -> torch.Tensor:
    """Table row of each virtual slot under key expansion: E^2 virtual slots per row, the shuffled slot
    taken modulo the ``value_rows`` this layer addresses, then shifted to its share and wrapped (the
    official lookup's index, Ultra-Sparse-Memory-Network fuse_ops/fused_lookup.cu:117-118)."""
    return (permutation[slots] % value_rows + offset) % rows


def scale_cores(core_scores_BTHKM: torch.Tensor, gates_BTHM: torch.Tensor) -> torch.Tensor:
    """Multiply every core's score by the slot's gate (UltraMemV2's pre-value product)."""
    return core_scores_BTHKM * gates_BTHM.unsqueeze(-2)


def core_pool(rows_BTHMV: torch.Tensor, weights_BTHKM: torch.Tensor) -> torch.Tensor:
    """Multi-core scoring: the V columns split into K chunks, chunk k pooled with core k's weights -> (B, T, V)."""
    b, t, h, m, v = rows_BTHMV.shape
    cores = weights_BTHKM.shape[-2]
    chunks = rows_BTHMV.view(b, t, h, m, cores, v // cores)
    return torch.einsum("bthmkd,bthkm->btkd", chunks, weights_BTHKM).reshape(b, t, v)


def core_pool_columns(rows_BTHMV: torch.Tensor, weights_BTHKM: torch.Tensor, col_start: int,
                      total_cols: int) -> torch.Tensor:
    """``core_pool`` on a dimension-wise shard of the value table: the rows hold columns [col_start,
    col_start + V) of ``total_cols``, each pooled with the weights of the core whose chunk holds it
    -> (B, T, V). The value dim needs no gathering before the pooling, whatever the shard's width."""
    cores, local = weights_BTHKM.shape[-2], rows_BTHMV.shape[-1]
    columns = torch.arange(col_start, col_start + local, device=rows_BTHMV.device)
    core_of = torch.div(columns, total_cols // cores, rounding_mode="floor")
    return torch.einsum("bthmv,bthvm->btv", rows_BTHMV, weights_BTHKM.index_select(-2, core_of))


def _into_columns(pooled_BTX: torch.Tensor, num_blocks: int, col_start: int, total_cols: int) -> torch.Tensor:
    """A column shard's (B, T, E * V_local) pooling, block by block, placed at its columns of the
    whole (B, T, E * total_cols), zeros elsewhere: a partial sum, the shards' outputs add up to the whole."""
    b, t, width = pooled_BTX.shape
    local = width // num_blocks
    shaped = pooled_BTX.view(b, t, num_blocks, local)
    return F.pad(shaped, (col_start, total_cols - col_start - local)).reshape(b, t, num_blocks * total_cols)


def ive_pool_columns(rows_BTHMV: torch.Tensor, weights_BTHKM: torch.Tensor, blocks_BTHM: torch.Tensor,
                     num_blocks: int, col_start: int, total_cols: int) -> torch.Tensor:
    """``ive_pool`` on a dimension-wise shard of the value table: the rows hold columns [col_start,
    col_start + V) of ``total_cols``, each weighted by the core whose chunk holds it and pooled into
    its pick's block -> (B, T, E * total_cols), this shard's columns of each block, zeros elsewhere
    (the E blocks interleave the columns, so the shards' outputs are summed, not concatenated)."""
    b, t, h, m, local = rows_BTHMV.shape
    columns = torch.arange(col_start, col_start + local, device=rows_BTHMV.device)
    core_of = torch.div(columns, total_cols // weights_BTHKM.shape[-2], rounding_mode="floor")
    w = weights_BTHKM.index_select(-2, core_of).transpose(-1, -2).reshape(b, t, h * m, local)
    weighted = rows_BTHMV.reshape(b, t, h * m, local) * w
    index = blocks_BTHM.reshape(b, t, h * m, 1).expand(b, t, h * m, local)
    pooled = weighted.new_zeros(b, t, num_blocks, local).scatter_add(2, index, weighted)
    return _into_columns(pooled.reshape(b, t, num_blocks * local), num_blocks, col_start, total_cols)


def block_of(virtual_rows: torch.Tensor, block_rows: int) -> torch.Tensor:
    """Implicit value expansion: which of the E virtual blocks a virtual row is in."""
    return torch.div(virtual_rows, block_rows, rounding_mode="floor")


def row_in_block(virtual_rows: torch.Tensor, block_rows: int) -> torch.Tensor:
    """Implicit value expansion: the physical table row behind a virtual row."""
    return virtual_rows % block_rows


def ive_pool(rows_BTHMV: torch.Tensor, weights_BTHKM: torch.Tensor, blocks_BTHM: torch.Tensor,
             num_blocks: int) -> torch.Tensor:
    """Multi-core pooling into E virtual blocks: block e gets the rows whose virtual row lies in it,
    column chunk k weighted by core k's score -> (B, T, E*V) (UltraMem's IVE with MCS).

    A scatter-add, not a product: nothing is multiplied by the E-1 blocks a row is not in.
    """
    b, t, h, m, v = rows_BTHMV.shape
    cores = weights_BTHKM.shape[-2]
    chunks = rows_BTHMV.view(b, t, h * m, cores, v // cores)
    weighted = chunks * weights_BTHKM.permute(0, 1, 2, 4, 3).reshape(b, t, h * m, cores, 1)
    index = blocks_BTHM.reshape(b, t, h * m, 1, 1).expand(b, t, h * m, cores, v // cores)
    out = weighted.new_zeros(b, t, num_blocks, cores, v // cores)
    return out.scatter_add(2, index, weighted).reshape(b, t, num_blocks * v)


# ---- mixture-of-experts load balancing (Switch Transformer, Fedus et al. 2021) ------------------


def expert_counts(indices_BTK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many (token, slot) assignments each expert got in this batch -> (E,) int64, no gradient
    (exact integers: summing them over devices is exact in any float precision of the model)."""
    return torch.bincount(indices_BTK.flatten(), minlength=num_experts)


def column_sums(probs_BTE: torch.Tensor) -> torch.Tensor:
    """Router probabilities summed over every token of this batch -> (E,)."""
    return probs_BTE.flatten(0, -2).sum(dim=0)


def balance_loss(counts_E: torch.Tensor, prob_sums_E: torch.Tensor, k: int, weight: float) -> torch.Tensor:
    """weight * E * sum_i f_i P_i, with f_i the share of assignments to expert i and P_i its mean
    router probability. Everything comes from whole-batch sums, so the token count is
    sum(counts) / k and no shape is needed (the same on one device or after an all-reduce)."""
    prob_sums_E = _at_least_fp32(prob_sums_E)  # a loss: float32 under mixed precision (counts past 256
    counts_E = counts_E.to(prob_sums_E.dtype)  # are not exact in bfloat16)
    assignments = counts_E.sum()
    share = counts_E / assignments
    mean_prob = prob_sums_E / (assignments / k)
    return weight * counts_E.shape[0] * (share * mean_prob).sum()


def half_key_counts(indices_BTHCM: torch.Tensor, num_keys: int) -> torch.Tensor:
    """How often each key of each half was among the top-m picks in this batch -> (C, N) int64."""
    halves = indices_BTHCM.shape[-2]
    shifted = indices_BTHCM + torch.arange(halves, device=indices_BTHCM.device).unsqueeze(-1) * num_keys
    return torch.bincount(shifted.flatten(), minlength=halves * num_keys).view(halves, num_keys)


def half_prob_sums(probs_BTHCN: torch.Tensor) -> torch.Tensor:
    """Each half's key probabilities summed over every token and head of this batch -> (C, N)."""
    return probs_BTHCN.flatten(0, -3).sum(dim=0)


def key_balance_loss(counts_CN: torch.Tensor, prob_sums_CN: torch.Tensor, k: int, weight: float) -> torch.Tensor:
    """UltraMemV2's key-balance loss (Ultra-Sparse-Memory-Network olmo/ultramem_layer_v2.py:380-394):
    weight * sum over the halves of N sum_i f_i P_i, f_i the share of the half's picks that went to
    key i, P_i its mean probability over tokens and heads. From whole-batch sums, as ``balance_loss``:
    the (token, head) count of a half is its picks / k."""
    prob_sums_CN = _at_least_fp32(prob_sums_CN)  # a loss: float32 under mixed precision, as balance_loss
    counts_CN = counts_CN.to(prob_sums_CN.dtype)
    picks = counts_CN.sum(dim=-1, keepdim=True)
    share = counts_CN / picks
    mean_prob = prob_sums_CN / (picks / k)
    return weight * counts_CN.shape[-1] * (share * mean_prob).sum()


# ---- UltraMem's fused ops (passes/fuse.py, fuse_graph.py put them in place of the unfused ones) --
# In ops_fused.py (copied beside every program as well), at the end here: it imports this module's ops.

try:  # as ultraplan.compiler.ops
    from . import ops_fused
except ImportError:  # beside an emitted program: a module of its own
    import ops_fused

gather_core_pool = ops_fused.gather_core_pool
gather_core_pool_columns = ops_fused.gather_core_pool_columns
gather_core_pool_owned = ops_fused.gather_core_pool_owned
gather_ive_pool = ops_fused.gather_ive_pool
gather_ive_pool_columns = ops_fused.gather_ive_pool_columns
gather_ive_pool_owned = ops_fused.gather_ive_pool_owned
rank_one_vectors = ops_fused.rank_one_vectors
stable_topk = ops_fused.stable_topk
tucker_grid_topk = ops_fused.tucker_grid_topk
tucker_slot_scores = ops_fused.tucker_slot_scores
tucker_topk = ops_fused.tucker_topk
