"""Triton kernel for UltraMem's Tucker-decomposed selection, the fused ops ``tucker_topk`` and
``tucker_grid_topk`` (compiler/ops.py). Imports only torch and triton, so it can sit beside an emitted program; runs on
the CPU under ``TRITON_INTERPRET=1`` (how tests check it).

Replaces the subgraph (UltraMem, Huang et al. 2025, sec. 3.2, TDQKR) from the rank-1 filtered half
scores (rows, 2, N), the per-rank half scores (rows, 2, R, N) and the cores (H, C, R, R) of each
(token, head) row to its k slots:

    half_best = topk(filtered, half_k); kept = take_ranked(scores, half_best)
    grid = sum_cores(tucker_grid(kept, cores))  (C x half_k^2 bilinear scores, summed over cores)
    slots = take(grid_indices(half_best, N), topk(grid, k))

One program per row. Each half's top half_k by repeated selection, written to a scratch list of key
ids in descending order; then the grid as a (half_k, half_k) tile in registers: for each core c and
column rank s, (sum_q row_q C[c, q, s]) times col_s, summed over s and c (tucker_grid's product order,
row by core then by column, then sum_cores); then the tile's top k by repeated selection.

``tucker_grid_topk`` is the same kernel given the halves' top half_k (``PICKED``: UltraMemV2's
key-balance loss counts them, so they are made outside); it reads them (2 half_k ids) instead of the
2 N filtered scores and starts at the grid.

Tie rule (the torch fallback ``ops.tucker_topk`` follows the same one, by a stable sort): values
descending; equal values by the lowest index, at both stages (the lowest key id within a half; the
lowest grid position i * half_k + j, i and j the ranks of the row and column keys in their half's
list). torch.topk, the unfused ops', promises no order among equal values, so fused and unfused agree
whenever no two candidates tie. Scores are compared in float32, or float64 for float64 inputs.

Bytes per row: 2 N filtered scores read, 2 half_k key ids written and read back (scratch),
2 R half_k per-rank scores and the head's C R^2 core entries read, k slots written (8 B), against the
unfused ops' C half_k^2 grid and half_k^2 sums and slots written and read back. No backward: the slots
are indices (``tucker_slot_scores`` gives the selected scores and their gradient).
Block rule: the key block is N rounded up to a power of two (a whole half per program), the grid
tile half_k rounded up likewise on each side.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def tucker_topk_kernel(filtered, scores, cores, ids, slots, H, N, R, C, HALF_K, K,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, PICKED: tl.constexpr):
    """One (token, head) row: each half's top HALF_K key ids into ``ids`` (given when PICKED), the
    grid tile, its top K. The compute dtype is the cores' (the host passes them as float32 or float64)."""
    r = tl.program_id(0)
    head = r % H
    dt = cores.dtype.element_ty
    if not PICKED:
        keys = tl.arange(0, BLOCK_N)
        for c in tl.static_range(2):
            x = tl.load(filtered + (r * 2 + c) * N + keys, mask=keys < N, other=0.0).to(dt)
            taken = keys >= N
            for i in range(HALF_K):
                best = tl.max(tl.where(taken, float("-inf"), x), axis=0)
                pick = tl.min(tl.where((~taken) & (x == best), keys, BLOCK_N), axis=0)
                taken = taken | (keys == pick)
                tl.store(ids + (r * 2 + c) * HALF_K + i, pick.to(tl.int64))
        tl.debug_barrier()  # the lists are read back below
    lanes = tl.arange(0, BLOCK_M)
    ok = lanes < HALF_K
    row_ids = tl.load(ids + r * 2 * HALF_K + lanes, mask=ok, other=0)
    col_ids = tl.load(ids + (r * 2 + 1) * HALF_K + lanes, mask=ok, other=0)
    grid = tl.zeros((BLOCK_M, BLOCK_M), dtype=dt)
    for core in range(C):
        one = tl.zeros((BLOCK_M, BLOCK_M), dtype=dt)
        for s in range(R):
            row_core = tl.zeros((BLOCK_M,), dtype=dt)
            for q in range(R):
                row = tl.load(scores + ((r * 2) * R + q) * N + row_ids, mask=ok, other=0.0).to(dt)
                row_core += row * tl.load(cores + ((head * C + core) * R + q) * R + s)
            col = tl.load(scores + ((r * 2 + 1) * R + s) * N + col_ids, mask=ok, other=0.0).to(dt)
            one += row_core[:, None] * col[None, :]
        grid += one
    pos = lanes[:, None] * BLOCK_M + lanes[None, :]  # unique over the tile, in grid order
    slot = row_ids[:, None] * N + col_ids[None, :]
    taken = ~(ok[:, None] & ok[None, :])
    for s in range(K):
        best = tl.max(tl.max(tl.where(taken, float("-inf"), grid), axis=1), axis=0)
        pick = tl.min(tl.min(tl.where((~taken) & (grid == best), pos, BLOCK_M * BLOCK_M), axis=1), axis=0)
        chosen = pos == pick
        taken = taken | chosen
        tl.store(slots + r * K + s, tl.sum(tl.sum(tl.where(chosen, slot, 0), axis=1), axis=0))


def tucker_topk(filtered_BTHCN: torch.Tensor, scores_BTHCRN: torch.Tensor, cores_HKRR: torch.Tensor, half_k: int,
                k: int, num_keys: int) -> torch.Tensor:
    """The Triton form of ops.tucker_topk, same arguments and result (ties: see the module's rule)."""
    lead = filtered_BTHCN.shape[:3]
    rows = lead.numel()
    heads, num_cores, ranks = cores_HKRR.shape[:3]
    compute = torch.float64 if filtered_BTHCN.dtype == torch.float64 else torch.float32
    slots = torch.empty(rows, k, dtype=torch.int64, device=filtered_BTHCN.device)
    if rows and k:
        filtered = filtered_BTHCN.detach().reshape(rows, 2, num_keys).contiguous()
        scores = scores_BTHCRN.detach().reshape(rows, 2, ranks, num_keys).contiguous()
        ids = torch.empty(rows, 2, half_k, dtype=torch.int64, device=filtered.device)
        tucker_topk_kernel[(rows,)](filtered, scores, cores_HKRR.detach().to(compute).contiguous(), ids, slots, heads,
                                    num_keys, ranks, num_cores, half_k, k, BLOCK_N=triton.next_power_of_2(num_keys),
                                    BLOCK_M=triton.next_power_of_2(half_k), PICKED=False)
    return slots.view(*lead, k)


def tucker_grid_topk(half_best_BTHCM: torch.Tensor, scores_BTHCRN: torch.Tensor, cores_HKRR: torch.Tensor, k: int,
                     num_keys: int) -> torch.Tensor:
    """The Triton form of ops.tucker_grid_topk (the halves' top half_k given), same arguments and result."""
    lead, half_k = half_best_BTHCM.shape[:3], half_best_BTHCM.shape[-1]
    rows = lead.numel()
    heads, num_cores, ranks = cores_HKRR.shape[:3]
    compute = torch.float64 if scores_BTHCRN.dtype == torch.float64 else torch.float32
    slots = torch.empty(rows, k, dtype=torch.int64, device=half_best_BTHCM.device)
    if rows and k:
        ids = half_best_BTHCM.reshape(rows, 2, half_k).contiguous()
        scores = scores_BTHCRN.detach().reshape(rows, 2, ranks, num_keys).contiguous()
        tucker_topk_kernel[(rows,)](ids, scores, cores_HKRR.detach().to(compute).contiguous(), ids, slots, heads,
                                    num_keys, ranks, num_cores, half_k, k, BLOCK_N=1,
                                    BLOCK_M=triton.next_power_of_2(half_k), PICKED=True)
    return slots.view(*lead, k)
