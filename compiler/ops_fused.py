"""UltraMem's fused ops: the op vocabulary's (``ops.py``) ops that passes/fuse.py and fuse_graph.py put in
place of chains of unfused ones, each the same arithmetic as its chain without its intermediates (the
(B, T, H, C, M^2) score grid, the gathered rows): TDQKR's selection (``tucker_topk``), the selected scores
(``tucker_slot_scores``), the poolings over gathered rows (``gather_core_pool``, ``gather_ive_pool``) and
their shard forms, and the rank-one vectors of the Tucker cores (``rank_one_vectors``).

Like ops.py this file imports nothing but torch (and ops.py, which imports it at its end and re-exports
its ops): it is copied verbatim next to every emitted program, where a program calls ``ops.tucker_topk``.
"""

import torch
import torch.nn.functional as F

try:  # ops.py imports this file at its end, so its names are all defined by now
    from .ops import KERNELS, _accumulator, _into_columns, _owned, grid_indices, sum_cores, take, take_ranked, tucker_grid
except ImportError:  # beside an emitted program: a module of its own
    from ops import KERNELS, _accumulator, _into_columns, _owned, grid_indices, sum_cores, take, take_ranked, tucker_grid


def tucker_topk(filtered_BTHCN: torch.Tensor, scores_BTHCRN: torch.Tensor, cores_HKRR: torch.Tensor, half_k: int,
                k: int, num_keys: int) -> torch.Tensor:
    """TDQKR's selection in one op: each half's top ``half_k`` keys by the rank-1 scores, every core's
    bilinear score over the half_k x half_k grid, the top ``k`` of their sum -> the slots (row * N + col),
    (B, T, H, k) int64. The same ops as unfused (topk_indices, take_ranked, tucker_grid, sum_cores,
    topk_indices, grid_indices, take), so the same slots whenever no two candidates tie; equal scores
    go to the lowest index at both stages (``stable_topk``: the rule of the Triton kernel,
    backends/triton_tucker.py; torch.topk promises none). The (B, T, H, C, M^2) grid is made and
    dropped inside, never saved for the backward (no gradient flows through indices:
    ``tucker_slot_scores`` gives the selected scores'). UltraMem, Huang et al. 2025, sec. 3.2."""
    kernel = KERNELS.get("tucker_topk")
    if kernel is not None:
        return kernel(filtered_BTHCN, scores_BTHCRN, cores_HKRR, half_k, k, num_keys)
    with torch.no_grad():
        half_best = stable_topk(filtered_BTHCN, half_k)
        grid = tucker_grid(take_ranked(scores_BTHCRN, half_best), cores_HKRR)
        return take(grid_indices(half_best, num_keys), stable_topk(sum_cores(grid), k))


def tucker_grid_topk(half_best_BTHCM: torch.Tensor, scores_BTHCRN: torch.Tensor, cores_HKRR: torch.Tensor, k: int,
                     num_keys: int) -> torch.Tensor:
    """``tucker_topk`` given each half's top-m keys (B, T, H, 2, m), made outside because something
    else reads them too (UltraMemV2's key-balance loss counts them): the grid, its top ``k`` (the
    same tie rule) and the slots, the grid made and dropped inside -> (B, T, H, k) int64."""
    kernel = KERNELS.get("tucker_grid_topk")
    if kernel is not None:
        return kernel(half_best_BTHCM, scores_BTHCRN, cores_HKRR, k, num_keys)
    with torch.no_grad():
        grid = tucker_grid(take_ranked(scores_BTHCRN, half_best_BTHCM), cores_HKRR)
        return take(grid_indices(half_best_BTHCM, num_keys), stable_topk(sum_cores(grid), k))


def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``topk_indices`` with a defined tie rule: largest first, equal values by the lowest index (a
    stable descending sort's first k), so a kernel and this fallback pick the same among ties."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def _ranked(ids_BTHM: torch.Tensor, ranks: int) -> torch.Tensor:
    """Key ids repeated for each rank, (B, T, H, R, M): the index of a gather along the keys."""
    return ids_BTHM.unsqueeze(-2).expand(*ids_BTHM.shape[:-1], ranks, ids_BTHM.shape[-1])


class _TuckerSlotScores(torch.autograd.Function):
    """Each core's score at the selected slots from the row and column keys' rank vectors: keeps
    those vectors (2 R per slot), not the grid."""

    @staticmethod
    def forward(ctx, scores_BTHCRN: torch.Tensor, cores_HKRR: torch.Tensor, slots_BTHM: torch.Tensor,
                num_keys: int) -> torch.Tensor:
        ranks = scores_BTHCRN.shape[-2]
        halves = (torch.div(slots_BTHM, num_keys, rounding_mode="floor"), slots_BTHM % num_keys)
        row, col = (torch.gather(scores_BTHCRN[..., c, :, :], -1, _ranked(ids, ranks)) for c, ids in enumerate(halves))
        ctx.save_for_backward(row, col, cores_HKRR, slots_BTHM)
        ctx.num_keys, ctx.shape = num_keys, scores_BTHCRN.shape
        row_core = torch.einsum("bthrm,hkrs->bthksm", row, cores_HKRR)
        return (row_core * col.unsqueeze(-3)).sum(-2)

    @staticmethod
    def backward(ctx, grad_BTHKM: torch.Tensor) -> tuple:
        row, col, cores, slots = ctx.saved_tensors
        g_scores = g_cores = None
        if ctx.needs_input_grad[0]:
            g_row = torch.einsum("bthkm,hkrs,bthsm->bthrm", grad_BTHKM, cores, col)
            g_col = torch.einsum("bthkm,hkrs,bthrm->bthsm", grad_BTHKM, cores, row)
            g_scores = grad_BTHKM.new_zeros(ctx.shape)
            halves = (torch.div(slots, ctx.num_keys, rounding_mode="floor"), slots % ctx.num_keys)
            for c, (ids, g) in enumerate(zip(halves, (g_row, g_col))):
                g_scores[..., c, :, :].scatter_add_(-1, _ranked(ids, g.shape[-2]), g)
        if ctx.needs_input_grad[1]:
            g_cores = torch.einsum("bthkm,bthrm,bthsm->hkrs", grad_BTHKM, row, col)
        return g_scores, g_cores, None, None


def tucker_slot_scores(scores_BTHCRN: torch.Tensor, cores_HKRR: torch.Tensor, slots_BTHM: torch.Tensor,
                       num_keys: int) -> torch.Tensor:
    """Every core's score at the selected slots, row_r^T C_k col_r -> (B, T, H, K, M): the values
    ``take_cores(tucker_grid(...), best)`` holds (to rounding: a sum of the same products), with the
    same gradient into the per-rank scores and the cores, from 2 R numbers per slot instead of the grid."""
    return _TuckerSlotScores.apply(scores_BTHCRN, cores_HKRR, slots_BTHM, num_keys)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _pool_groups(width: int, cores: int, col_start: int, total_cols: int, device: torch.device) -> tuple[int, torch.Tensor]:
    """Column groups of a (shard of a) value table that each lie in one core's chunk: the group width
    (the largest dividing the chunk, the shard's width and its start) and each group's core."""
    chunk = total_cols // cores
    group = _gcd(_gcd(chunk, width), col_start)
    starts = col_start + group * torch.arange(width // group, device=device)
    return group, torch.div(starts, chunk, rounding_mode="floor")


def _pooled(table_RV: torch.Tensor, rows_BTHM: torch.Tensor, weights_BTHKM: torch.Tensor, blocks_BTHM: torch.Tensor | None,
            num_blocks: int, col_start: int, total_cols: int) -> torch.Tensor:
    """The pooling's forward by embedding_bag, one bag per (token, [block,] column group): the table
    seen as (R * G, g) rows of one group each, so no gathered row is ever stored. With blocks, the
    picks are sorted by (token, block, group) and bags cut at offsets (empty bags give zeros)."""
    b, t, h, m = rows_BTHM.shape
    r, width = table_RV.shape
    group, core_of = _pool_groups(width, weights_BTHKM.shape[-2], col_start, total_cols, table_RV.device)
    groups, dev = core_of.shape[0], table_RV.device
    out_width = num_blocks * width
    if b * t * h * m == 0:
        return table_RV.new_zeros(b, t, out_width)
    ids = rows_BTHM.reshape(b * t, 1, h * m) * groups + torch.arange(groups, device=dev).view(1, groups, 1)
    w = weights_BTHKM.index_select(-2, core_of).transpose(2, 3).reshape(b * t, groups, h * m)
    flat = table_RV.reshape(r * groups, group)
    if blocks_BTHM is None:
        out = F.embedding_bag(ids.reshape(-1, h * m), flat, per_sample_weights=w.reshape(-1, h * m), mode="sum")
        return out.view(b, t, out_width)
    token = torch.arange(b * t, device=dev).view(-1, 1, 1)
    bag = (token * num_blocks + blocks_BTHM.reshape(b * t, 1, h * m)) * groups
    bag = (bag + torch.arange(groups, device=dev).view(1, -1, 1)).reshape(-1)
    order = torch.argsort(bag, stable=True)
    offsets = torch.searchsorted(bag[order], torch.arange(b * t * num_blocks * groups, device=dev))
    out = F.embedding_bag(ids.reshape(-1)[order], flat, offsets, per_sample_weights=w.reshape(-1)[order], mode="sum")
    return out.view(b, t, num_blocks, groups, group).reshape(b, t, out_width)


class _PoolRows(torch.autograd.Function):
    """gather_core_pool / gather_ive_pool: forward by ``_pooled``; the backward scatter-adds each
    pick's weighted output gradient into its row and dots the gradient with the row for the weights
    (it gathers the rows once, transiently); keeps the table, ids, weights and blocks only."""

    @staticmethod
    def forward(ctx, table_RV, rows_BTHM, weights_BTHKM, blocks_BTHM, num_blocks, col_start, total_cols):
        ctx.save_for_backward(table_RV, rows_BTHM, weights_BTHKM, *(() if blocks_BTHM is None else (blocks_BTHM,)))
        ctx.layout = (num_blocks, col_start, total_cols)
        return _pooled(table_RV, rows_BTHM, weights_BTHKM, blocks_BTHM, num_blocks, col_start, total_cols)

    @staticmethod
    def backward(ctx, grad_BTX: torch.Tensor) -> tuple:
        table, rows, weights, *blocks = ctx.saved_tensors
        num_blocks, col_start, total_cols = ctx.layout
        b, t, h, m = rows.shape
        cores, width = weights.shape[-2], table.shape[1]
        columns = torch.arange(col_start, col_start + width, device=table.device)
        core_of = torch.div(columns, total_cols // cores, rounding_mode="floor")
        grad = grad_BTX.reshape(b, t, num_blocks, width)
        if blocks:  # each pick's output gradient: its block's
            picked = torch.gather(grad, 2, blocks[0].reshape(b, t, h * m, 1).expand(b, t, h * m, width))
        else:
            picked = grad.expand(b, t, h * m, width)
        g_table = g_weights = None
        wide = _accumulator(table.dtype)  # the sums below in float32 for bf16 (CUDA's atomics round each add)
        if ctx.needs_input_grad[0]:
            w = weights.index_select(-2, core_of).transpose(-1, -2).reshape(b, t, h * m, width)
            g_table = torch.zeros_like(table, dtype=wide).index_add_(
                0, rows.reshape(-1), (w.to(wide) * picked.to(wide)).reshape(-1, width)).to(table.dtype)
        if ctx.needs_input_grad[2]:
            dots = F.embedding(rows, table).view(b, t, h * m, width).to(wide) * picked.to(wide)
            g_weights = dots.new_zeros(b, t, h * m, cores).index_add_(-1, core_of, dots).to(weights.dtype)
            g_weights = g_weights.view(b, t, h, m, cores).transpose(-1, -2)
        return g_table, None, g_weights, None, None, None, None


def _pool(op: str, table_RV: torch.Tensor, rows_BTHM: torch.Tensor, weights_BTHKM: torch.Tensor,
          blocks_BTHM: torch.Tensor | None, num_blocks: int, col_start: int, total_cols: int) -> torch.Tensor:
    kernel = KERNELS.get(op)
    if kernel is not None:
        return kernel(table_RV, rows_BTHM, weights_BTHKM, blocks_BTHM, num_blocks, col_start, total_cols)
    return _PoolRows.apply(table_RV, rows_BTHM, weights_BTHKM, blocks_BTHM, num_blocks, col_start, total_cols)


def gather_core_pool(table_RV: torch.Tensor, rows_BTHM: torch.Tensor, weights_BTHKM: torch.Tensor) -> torch.Tensor:
    """``core_pool(gather_rows(table, rows), weights)`` without the (B, T, H, M, V) gathered rows:
    UltraMemV2's multi-core pooling (column chunk k of each row weighted by core k's score), as
    embedding_bags over column groups -> (B, T, V)."""
    return _pool("gather_core_pool", table_RV, rows_BTHM, weights_BTHKM, None, 1, 0, table_RV.shape[1])


def gather_core_pool_columns(table_RV: torch.Tensor, rows_BTHM: torch.Tensor, weights_BTHKM: torch.Tensor,
                             col_start: int, total_cols: int) -> torch.Tensor:
    """``gather_core_pool`` on a dimension-wise shard of the table (columns [col_start, col_start + V)
    of ``total_cols``): each column pooled with its core's weights -> (B, T, V) of this shard."""
    return _pool("gather_core_pool", table_RV, rows_BTHM, weights_BTHKM, None, 1, col_start, total_cols)


def gather_core_pool_owned(table_RV: torch.Tensor, rows_BTHM: torch.Tensor, weights_BTHKM: torch.Tensor,
                           row_start: int) -> torch.Tensor:
    """A number-wise table shard's share of ``gather_core_pool``: picks of rows it does not hold
    weigh 0, so the shards' outputs sum to the whole."""
    local, inside = _owned(rows_BTHM, table_RV.shape[0], row_start)
    return gather_core_pool(table_RV, local, weights_BTHKM * inside.unsqueeze(-2).to(weights_BTHKM.dtype))


def gather_ive_pool(table_RV: torch.Tensor, rows_BTHM: torch.Tensor, weights_BTHKM: torch.Tensor, blocks_BTHM: torch.Tensor,
                    num_blocks: int) -> torch.Tensor:
    """``ive_pool(gather_rows(table, rows), weights, blocks, E)`` without the gathered rows: UltraMem's
    implicit value expansion with multi-core pooling, each pick pooled into its virtual block ->
    (B, T, E * V) (Huang et al. 2025, sec. 3.3), by embedding_bags cut per (token, block, core)."""
    return _pool("gather_ive_pool", table_RV, rows_BTHM, weights_BTHKM, blocks_BTHM, num_blocks, 0, table_RV.shape[1])


def gather_ive_pool_columns(table_RV: torch.Tensor, rows_BTHM: torch.Tensor, weights_BTHKM: torch.Tensor,
                            blocks_BTHM: torch.Tensor, num_blocks: int, col_start: int, total_cols: int) -> torch.Tensor:
    """``gather_ive_pool`` on a dimension-wise shard of the table (columns [col_start, col_start + V)
    of ``total_cols``) -> (B, T, E * total_cols), as ``ive_pool_columns``: this shard's columns of each
    block pooled by the fused op, zeros elsewhere (a partial sum over the shards)."""
    pooled = _pool("gather_ive_pool", table_RV, rows_BTHM, weights_BTHKM, blocks_BTHM, num_blocks, col_start, total_cols)
    return _into_columns(pooled, num_blocks, col_start, total_cols)


def gather_ive_pool_owned(table_RV: torch.Tensor, rows_BTHM: torch.Tensor, weights_BTHKM: torch.Tensor,
                          blocks_BTHM: torch.Tensor, num_blocks: int, row_start: int) -> torch.Tensor:
    """A number-wise table shard's share of ``gather_ive_pool`` (as ``gather_core_pool_owned``)."""
    local, inside = _owned(rows_BTHM, table_RV.shape[0], row_start)
    return gather_ive_pool(table_RV, local, weights_BTHKM * inside.unsqueeze(-2).to(weights_BTHKM.dtype), blocks_BTHM,
                           num_blocks)


def rank_one_vectors(cores_HKRR: torch.Tensor, previous_2HR: torch.Tensor) -> torch.Tensor:
    """u and t: the leading left and right singular vectors of each head's summed core -> (2, H, R).

    Sign: per head, the sign of (u, t) nearer (L1) to the previous step's, as the official code does
    (Ultra-Sparse-Memory-Network olmo/ultramem_layer_v2.py:284-296, ultramem_layer.py:158-169), so
    retrieval cannot flip between steps when two entries of u are nearly equal in size. Where both
    signs are equally near (the zero state at initialisation) the largest-magnitude entry of u is
    made positive, so the initial state is a function of the cores alone (the official code keeps
    whatever sign the SVD returned there).
    """
    with torch.no_grad():
        left, _, right_t = torch.linalg.svd(cores_HKRR.sum(dim=1).double())
        u, t = left[..., 0], right_t[..., 0, :]
        prev_u, prev_t = previous_2HR.double()
        keep = (u - prev_u).abs().sum(-1) + (t - prev_t).abs().sum(-1)
        flip = (u + prev_u).abs().sum(-1) + (t + prev_t).abs().sum(-1)
        sign = torch.sign(flip - keep)
        largest = torch.sign(torch.gather(u, -1, u.abs().argmax(dim=-1, keepdim=True))).squeeze(-1)
        sign = torch.where(sign == 0, largest, sign).unsqueeze(-1)
        return torch.stack((u * sign, t * sign)).to(cores_HKRR.dtype)
