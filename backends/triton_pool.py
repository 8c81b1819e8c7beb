"""Triton kernels for UltraMem's fused value poolings ``gather_core_pool`` (UltraMemV2's multi-core
pooling) and ``gather_ive_pool`` (UltraMem's implicit value expansion with it), forward and
backward, and the autograd function that runs them (compiler/ops.py ``_pool`` hands them the same
arguments as its torch form). Imports only torch and triton, so it can sit beside an emitted
program; runs on the CPU under ``TRITON_INTERPRET=1`` (how tests check it).

Replaces ``ive_pool(gather_rows(table, ids), weights, blocks, E)`` (``core_pool``: E = 1, no blocks),
per token t, pick j (H*M of them), column c of a table (shard) of W columns, core(c) the core whose
column chunk holds c (of ``total_cols`` columns, chunk total_cols / K, the shard starting at col_start):

    out[t, blk(j) * W + c]   += weights[t, core(c), j] * table[ids[t, j], c]
    grad_table[ids[t, j], c] += weights[t, core(c), j] * grad_out[t, blk(j) * W + c]   (atomic, in float32)
    grad_w[t, k, j]          = sum over c in chunk k of grad_out[t, blk(j) * W + c] * table[ids[t, j], c]

Bytes moved per token (fp32): forward N ids (8 B), N blocks (8 B), K*N weights and N rows of W read,
E*W written, against the unfused ops' extra N*W gathered rows written and read back (and the IVE
scatter's (N, W) weighted copy); backward the rows read again and N*W scatter-added. Block rule:
the feature block is W rounded up to a power of two, capped at 128; the pick block N rounded up to
a power of two, capped at 64 (as backends/triton_gather.py), and in the IVE forward, which reads
each block's picks apart (``_block_order``), N / E rounded up likewise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _pool_blocks(n: int, d: int) -> tuple[int, int]:
    return min(triton.next_power_of_2(max(n, 1)), 64), min(triton.next_power_of_2(max(d, 1)), 128)


@triton.jit
def pool_rows_fwd(table, ids, weights, order, bounds, out, N, W, K, E, col_start, chunk, HAS_BLOCKS: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t, e, d-block]: the picks of token t in block e, each column weighted by its core's weight;
    one program per (token, block, d-block). The (N, W) gathered rows never reach memory. With blocks
    the program reads only its block's picks: ``order`` lists each token's picks by block and
    ``bounds[t, e:e + 2]`` where block e's run of them starts and ends (``_block_order``)."""
    t = tl.program_id(0)
    e = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < W
    core = (col_start + cols) // chunk
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    lo = 0
    hi = N
    if HAS_BLOCKS:
        lo = tl.load(bounds + t * (E + 1) + e)
        hi = tl.load(bounds + t * (E + 1) + e + 1)
    for start in range(lo, hi, BLOCK_N):
        s = start + tl.arange(0, BLOCK_N)
        j_ok = s < hi
        j = s
        if HAS_BLOCKS:
            j = tl.load(order + t * N + s, mask=j_ok, other=0)
        ok = j_ok[:, None] & col_ok[None, :]
        rows = tl.load(ids + t * N + j, mask=j_ok, other=0)
        w = tl.load(weights + t * K * N + core[None, :] * N + j[:, None], mask=ok, other=0.0)
        vals = tl.load(table + rows[:, None] * W + cols[None, :], mask=ok, other=0.0)
        acc += tl.sum(vals.to(tl.float32) * w.to(tl.float32), axis=0)
    tl.store(out + (t * E + e) * W + cols, acc.to(out.dtype.element_ty), mask=col_ok)


def _block_order(blocks: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each token's picks ordered by block (stable), the (T, E + 1) int32 bounds of each block's run in
    that order, and the pick block for the forward: a block's expected picks N / E rounded up to a
    power of two (at most 64). Reading only its block's picks, a program of the forward does 1 / E
    of the work it did masking the others (an H200 at paper sizes: 15% of HBM bandwidth before)."""
    tokens, n = blocks.shape
    order = torch.argsort(blocks, dim=1, stable=True)
    counts = torch.zeros(tokens, num_blocks + 1, dtype=torch.int32, device=blocks.device)
    counts.scatter_add_(1, blocks + 1, torch.ones_like(blocks, dtype=torch.int32))
    return order, counts.cumsum(1, dtype=torch.int32), min(triton.next_power_of_2(max(triton.cdiv(n, num_blocks), 1)), 64)


@triton.jit
def pool_rows_bwd_table(grad_out, ids, weights, blocks, grad_table, N, W, K, E, col_start, chunk,
                        HAS_BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_table[ids[t, j], d-block] += weights[t, core, j] * grad_out[t, blk(j), d-block] (atomic: one
    token may pick a row twice, many tokens the same row); one program per (token, d-block)."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < W
    core = (col_start + cols) // chunk
    for start in range(0, N, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < N
        blk = tl.zeros((BLOCK_N,), dtype=tl.int64)
        if HAS_BLOCKS:
            blk = tl.load(blocks + t * N + j, mask=j_ok, other=0)
        ok = j_ok[:, None] & col_ok[None, :]
        rows = tl.load(ids + t * N + j, mask=j_ok, other=0)
        w = tl.load(weights + t * K * N + core[None, :] * N + j[:, None], mask=ok, other=0.0).to(tl.float32)
        g = tl.load(grad_out + (t * E + blk[:, None]) * W + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.atomic_add(grad_table + rows[:, None] * W + cols[None, :], w * g, mask=ok)


@triton.jit
def pool_rows_bwd_weights(grad_out, ids, table, blocks, grad_weights, N, W, K, E, col_start, chunk,
                          HAS_BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_weights[t, k, j] = <grad_out[t, blk(j), chunk k], table[ids[t, j], chunk k]> over the chunk's
    columns in this shard; one program per (token, j-block, core)."""
    t = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(2)
    j_ok = j < N
    blk = tl.zeros((BLOCK_N,), dtype=tl.int64)
    if HAS_BLOCKS:
        blk = tl.load(blocks + t * N + j, mask=j_ok, other=0)
    rows = tl.load(ids + t * N + j, mask=j_ok, other=0)
    lo = tl.maximum(k * chunk - col_start, 0)
    hi = tl.minimum((k + 1) * chunk - col_start, W)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        ok = j_ok[:, None] & (cols < hi)[None, :]
        g = tl.load(grad_out + (t * E + blk[:, None]) * W + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        vals = tl.load(table + rows[:, None] * W + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(vals * g, axis=1)
    tl.store(grad_weights + (t * K + k) * N + j, acc.to(grad_weights.dtype.element_ty), mask=j_ok)


class PoolRows(torch.autograd.Function):
    """ops_fused._pool through the kernels above: saves the table, ids, weights and blocks, not the rows."""

    @staticmethod
    def forward(ctx, table_RV, rows_BTHM, weights_BTHKM, blocks_BTHM, num_blocks, col_start, total_cols):
        b, t, h, m = rows_BTHM.shape
        tokens, n, k = b * t, h * m, weights_BTHKM.shape[-2]
        width = table_RV.shape[1]
        table, ids = table_RV.contiguous(), rows_BTHM.reshape(tokens, n).contiguous()
        weights = weights_BTHKM.transpose(-2, -3).reshape(tokens, k, n).contiguous()  # (T, K, H*M)
        blocks = ids if blocks_BTHM is None else blocks_BTHM.reshape(tokens, n).contiguous()
        out = torch.zeros(tokens, num_blocks * width, dtype=table.dtype, device=table.device)
        block_n, block_d = _pool_blocks(n, width)
        layout = (n, width, k, num_blocks, col_start, total_cols // k)
        if tokens and n and width:
            order, bounds = ids, ids  # not read without blocks
            if blocks_BTHM is not None:
                order, bounds, block_n = _block_order(blocks, num_blocks)
            pool_rows_fwd[(tokens, num_blocks, triton.cdiv(width, block_d))](
                table, ids, weights, order, bounds, out, *layout, HAS_BLOCKS=blocks_BTHM is not None, BLOCK_N=block_n,
                BLOCK_D=block_d)
        ctx.save_for_backward(table, ids, weights, blocks)
        ctx.meta = (layout, blocks_BTHM is not None, (b, t, h, m))
        return out.view(b, t, num_blocks * width)

    @staticmethod
    def backward(ctx, grad_BTX: torch.Tensor):
        table, ids, weights, blocks = ctx.saved_tensors
        layout, has_blocks, (b, t, h, m) = ctx.meta
        n, width, k = layout[:3]
        tokens = ids.shape[0]
        grad = grad_BTX.reshape(tokens, layout[3] * width).contiguous()
        block_n, block_d = _pool_blocks(n, width)
        run = tokens and n and width
        g_table = g_weights = None
        if ctx.needs_input_grad[0]:
            g_table = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
            if run:
                pool_rows_bwd_table[(tokens, triton.cdiv(width, block_d))](
                    grad, ids, weights, blocks, g_table, *layout, HAS_BLOCKS=has_blocks, BLOCK_N=block_n, BLOCK_D=block_d)
            g_table = g_table.to(table.dtype)
        if ctx.needs_input_grad[2]:
            g_weights = torch.zeros_like(weights)
            if run:
                pool_rows_bwd_weights[(tokens, triton.cdiv(n, block_n), k)](
                    grad, ids, table, blocks, g_weights, *layout, HAS_BLOCKS=has_blocks, BLOCK_N=block_n,
                    BLOCK_D=block_d)
            g_weights = g_weights.view(b, t, k, h, m).transpose(2, 3)
        return g_table, None, g_weights, None, None, None, None


def pool_rows(table_RV: torch.Tensor, rows_BTHM: torch.Tensor, weights_BTHKM: torch.Tensor,
              blocks_BTHM: torch.Tensor | None, num_blocks: int, col_start: int, total_cols: int) -> torch.Tensor:
    """The Triton form of ops_fused._pool (gather_core_pool, its shards, gather_ive_pool), same arguments and result."""
    return PoolRows.apply(table_RV, rows_BTHM, weights_BTHKM, blocks_BTHM, num_blocks, col_start, total_cols)
