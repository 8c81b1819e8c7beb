"""Triton kernels for product-key selection, the fused ops ``pk_topk`` and ``pk_slot_scores``
(compiler/ops.py), and the autograd function of the scores. Imports only torch and triton, so it can
sit beside an emitted program; runs on the CPU under ``TRITON_INTERPRET=1`` (how tests check it).

Replaces the subgraph (Lample et al. 2019, sec. 3.2) from the half scores (rows, 2, N) of each
(token, head) row to its k slots:

    half_best = topk_indices(half, half_k); kept = take(half, half_best)
    grid = grid_scores(kept) (half_k^2 sums); best = topk_indices(grid, k)
    slots = take(grid_indices(half_best, N), best);  scores = take(grid, best)

``pk_topk``: one program per row. Each half's top half_k by repeated selection (the largest
remaining score; equal scores: the lowest key id first), written to a scratch list in descending
order; then the grid's top k without making the grid: the two lists are sorted, so the best
remaining candidate of grid row i is its next column p_i, and each step takes the best of the
half_k frontier candidates (equal sums: the lowest grid position i * half_k + p_i first). Tie rule:
values descending, ties by lowest index at each stage, i.e. a stable top-k of the unfused ops'
tensors (torch.topk does not promise an order among equal values: tests compare the selected
values, which are the same for any tie choice when k <= half_k). Scores are compared in float32.
Bytes per row: 2 N scores read, 2 half_k (score, id) pairs written and read back (scratch), k slots
written (8 B), against the unfused ops' half_k^2 grid of scores and of slots written and read.

``pk_slot_scores``: score[r, s] = half[r, 0, slot // N] + half[r, 1, slot % N]; its backward adds
each slot's gradient into the two key scores it read (atomic: slots share keys), in float32.
Bytes per row: k slots and 2 k scores read, k written (the backward: k read, 2 k scattered).
Block rule: the key block is N rounded up to a power of two (a whole half per program), the list
block half_k rounded up likewise, the slot block k rounded up likewise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def pk_topk_kernel(half, best_ids, best_scores, slots, N, HALF_K, K, BLOCK_N: tl.constexpr, BLOCK_HK: tl.constexpr):
    """One (token, head) row: each half's top HALF_K into the scratch lists, then the grid's top K."""
    r = tl.program_id(0)
    keys = tl.arange(0, BLOCK_N)
    for c in tl.static_range(2):
        x = tl.load(half + (r * 2 + c) * N + keys, mask=keys < N, other=0.0).to(tl.float32)
        taken = keys >= N
        for i in range(HALF_K):
            best = tl.max(tl.where(taken, float("-inf"), x), axis=0)
            pick = tl.min(tl.where((~taken) & (x == best), keys, BLOCK_N), axis=0)
            taken = taken | (keys == pick)
            tl.store(best_ids + (r * 2 + c) * HALF_K + i, pick.to(tl.int64))
            tl.store(best_scores + (r * 2 + c) * HALF_K + i, best)
    tl.debug_barrier()  # the lists are read back below
    lanes = tl.arange(0, BLOCK_HK)
    lane_ok = lanes < HALF_K
    row_scores = tl.load(best_scores + r * 2 * HALF_K + lanes, mask=lane_ok, other=0.0)
    row_ids = tl.load(best_ids + r * 2 * HALF_K + lanes, mask=lane_ok, other=0)
    nxt = tl.zeros((BLOCK_HK,), dtype=tl.int32)  # each grid row's next column
    for s in range(K):
        ok = lane_ok & (nxt < HALF_K)
        col = tl.load(best_scores + (r * 2 + 1) * HALF_K + nxt, mask=ok, other=0.0)
        cand = tl.where(ok, row_scores + col, float("-inf"))
        best = tl.max(cand, axis=0)
        i = tl.min(tl.where(ok & (cand == best), lanes, BLOCK_HK), axis=0)
        j = tl.sum(tl.where(lanes == i, nxt, 0), axis=0)
        row_key = tl.sum(tl.where(lanes == i, row_ids, 0), axis=0)
        col_key = tl.load(best_ids + (r * 2 + 1) * HALF_K + j)
        tl.store(slots + r * K + s, row_key * N + col_key)
        nxt = tl.where(lanes == i, nxt + 1, nxt)


def pk_topk(half_scores_BTHCN: torch.Tensor, half_k: int, k: int, num_keys: int) -> torch.Tensor:
    """The Triton form of ops.pk_topk, same arguments and result (ties: see the module's rule)."""
    lead = half_scores_BTHCN.shape[:3]
    rows = lead.numel()
    half = half_scores_BTHCN.detach().reshape(rows, 2, num_keys).contiguous()
    slots = torch.empty(rows, k, dtype=torch.int64, device=half.device)
    if rows:
        ids = torch.empty(rows, 2, half_k, dtype=torch.int64, device=half.device)
        scores = torch.empty(rows, 2, half_k, dtype=torch.float32, device=half.device)
        pk_topk_kernel[(rows,)](half, ids, scores, slots, num_keys, half_k, k, BLOCK_N=triton.next_power_of_2(num_keys),
                                BLOCK_HK=triton.next_power_of_2(half_k))
    return slots.view(*lead, k)


@triton.jit
def pk_slot_scores_fwd(half, slots, out, N, K, BLOCK_K: tl.constexpr):
    r = tl.program_id(0)
    s = tl.arange(0, BLOCK_K)
    ok = s < K
    slot = tl.load(slots + r * K + s, mask=ok, other=0)
    row = tl.load(half + r * 2 * N + slot // N, mask=ok, other=0.0).to(tl.float32)
    col = tl.load(half + r * 2 * N + N + slot % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + r * K + s, (row + col).to(out.dtype.element_ty), mask=ok)


@triton.jit
def pk_slot_scores_bwd(grad, slots, grad_half, N, K, BLOCK_K: tl.constexpr):
    """grad_half[r, 0, slot // N] += grad[r, s]; grad_half[r, 1, slot % N] += grad[r, s] (float32)."""
    r = tl.program_id(0)
    s = tl.arange(0, BLOCK_K)
    ok = s < K
    slot = tl.load(slots + r * K + s, mask=ok, other=0)
    g = tl.load(grad + r * K + s, mask=ok, other=0.0).to(tl.float32)
    tl.atomic_add(grad_half + r * 2 * N + slot // N, g, mask=ok)
    tl.atomic_add(grad_half + r * 2 * N + N + slot % N, g, mask=ok)


class PkSlotScores(torch.autograd.Function):
    """ops.pk_slot_scores through the kernels above: saves the slots only."""

    @staticmethod
    def forward(ctx, half_scores_BTHCN: torch.Tensor, slots_BTHK: torch.Tensor, num_keys: int) -> torch.Tensor:
        rows, k = slots_BTHK.shape[:3].numel(), slots_BTHK.shape[-1]
        half = half_scores_BTHCN.reshape(rows, 2, num_keys).contiguous()
        slots = slots_BTHK.reshape(rows, k).contiguous()
        out = torch.empty(rows, k, dtype=half.dtype, device=half.device)
        if rows and k:
            pk_slot_scores_fwd[(rows,)](half, slots, out, num_keys, k, BLOCK_K=triton.next_power_of_2(k))
        ctx.save_for_backward(slots)
        ctx.meta = (half_scores_BTHCN.shape, half_scores_BTHCN.dtype, num_keys)
        return out.view(slots_BTHK.shape)

    @staticmethod
    def backward(ctx, grad_BTHK: torch.Tensor):
        (slots,) = ctx.saved_tensors
        shape, dtype, num_keys = ctx.meta
        rows, k = slots.shape
        grad_half = torch.zeros(rows, 2, num_keys, dtype=torch.float32, device=slots.device)
        if rows and k:
            pk_slot_scores_bwd[(rows,)](grad_BTHK.reshape(rows, k).contiguous(), slots, grad_half, num_keys, k,
                                        BLOCK_K=triton.next_power_of_2(k))
        return grad_half.to(dtype).view(shape), None, None


def pk_slot_scores(half_scores_BTHCN: torch.Tensor, slots_BTHK: torch.Tensor, num_keys: int) -> torch.Tensor:
    """The Triton form of ops.pk_slot_scores, same arguments and result."""
    return PkSlotScores.apply(half_scores_BTHCN, slots_BTHK, num_keys)
