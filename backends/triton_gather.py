"""Triton kernels for the fused memory lookups ``gather_weighted_sum`` and ``gather_row_dot``
(compiler/ops.py), forward and backward, and the autograd functions that run them. Imports only
torch and triton, so it can sit beside an emitted program; runs on the CPU under
``TRITON_INTERPRET=1`` (how tests check it).

Replaces the subgraph ``weighted_sum(gather_rows(table, ids), weights)``:

    out[t, :]       = sum_j weights[t, j] * table[ids[t, j], :]          (j over H*K selections)
    grad_table[r, :] += weights[t, j] * grad_out[t, :]   for ids[t, j] = r (atomic scatter-add)
    grad_w[t, j]    = <grad_out[t, :], table[ids[t, j], :]>

``gather_row_dot(table, ids, x)`` (``row_dot(x, gather_rows(table, ids))``: PEER's down rows,
UltraMemV2's pre-value gate) is the same three products read the other way round, so it runs the
same kernels: its forward is ``_bwd_weights`` with x as the output gradient, its input gradient
``_fwd`` with the score gradient as the weights, its table gradient ``_bwd_table`` likewise.

Bytes moved per token (fp32): forward N ids (8 B) + N weights + N rows of D + one output row of D,
against the unfused ops' extra N*D written and read back; backward the same rows read again and
N*D scatter-added. Block sizes follow one rule: the feature block is D rounded up to a power of
two, capped at 128 (one program covers a 128-wide slice of a row; larger D uses more programs),
and the selection block is N rounded up to a power of two, capped at 64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _blocks(n: int, d: int) -> tuple[int, int]:
    return min(triton.next_power_of_2(max(n, 1)), 64), min(triton.next_power_of_2(max(d, 1)), 128)


@triton.jit
def gather_weighted_sum_fwd(table, ids, weights, out, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t, d-block] = sum_j weights[t, j] * table[ids[t, j], d-block]; one program per (token,
    d-block). Replaces gather_rows + weighted_sum: the (N, D) gathered rows never reach memory."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < N
        rows = tl.load(ids + t * N + j, mask=j_ok, other=0)
        w = tl.load(weights + t * N + j, mask=j_ok, other=0.0).to(tl.float32)
        vals = tl.load(table + rows[:, None] * D + cols[None, :], mask=j_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(vals.to(tl.float32) * w[:, None], axis=0)
    tl.store(out + t * D + cols, acc.to(out.dtype.element_ty), mask=col_ok)


@triton.jit
def gather_weighted_sum_bwd_table(grad_out, ids, weights, grad_table, N, D, BLOCK_N: tl.constexpr,
                                  BLOCK_D: tl.constexpr):
    """grad_table[ids[t, j], d-block] += weights[t, j] * grad_out[t, d-block] (atomic: one token may
    pick a row twice, many tokens the same row). Replaces the gather's scatter-add backward."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    g = tl.load(grad_out + t * D + cols, mask=col_ok, other=0.0)
    for start in range(0, N, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < N
        rows = tl.load(ids + t * N + j, mask=j_ok, other=0)
        w = tl.load(weights + t * N + j, mask=j_ok, other=0.0)
        tl.atomic_add(grad_table + rows[:, None] * D + cols[None, :], w[:, None] * g[None, :],
                      mask=j_ok[:, None] & col_ok[None, :])


@triton.jit
def gather_weighted_sum_bwd_weights(grad_out, ids, table, grad_weights, N, D, BLOCK_N: tl.constexpr,
                                    BLOCK_D: tl.constexpr):
    """grad_weights[t, j] = <grad_out[t, :], table[ids[t, j], :]>; one program per (token, j-block).
    Replaces weighted_sum's backward for the weights (which read the stored gathered rows)."""
    t = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = j < N
    rows = tl.load(ids + t * N + j, mask=j_ok, other=0)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        g = tl.load(grad_out + t * D + cols, mask=col_ok, other=0.0).to(tl.float32)
        vals = tl.load(table + rows[:, None] * D + cols[None, :], mask=j_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(vals.to(tl.float32) * g[None, :], axis=1)
    tl.store(grad_weights + t * N + j, acc.to(grad_weights.dtype.element_ty), mask=j_ok)


class GatherWeightedSum(torch.autograd.Function):
    """ops.gather_weighted_sum through the kernels above: saves the ids and weights, not the rows."""

    @staticmethod
    def forward(ctx, table_RD: torch.Tensor, indices_BTHK: torch.Tensor, weights_BTHK: torch.Tensor) -> torch.Tensor:
        b, t = indices_BTHK.shape[:2]
        n, d = indices_BTHK.shape[2:].numel(), table_RD.shape[1]
        table, ids = table_RD.contiguous(), indices_BTHK.reshape(b * t, n).contiguous()
        weights = weights_BTHK.reshape(b * t, n).contiguous()
        out = torch.empty(b * t, d, dtype=table.dtype, device=table.device)
        block_n, block_d = _blocks(n, d)
        if b * t and n:
            gather_weighted_sum_fwd[(b * t, triton.cdiv(d, block_d))](table, ids, weights, out, n, d,
                                                                         BLOCK_N=block_n, BLOCK_D=block_d)
        else:
            out.zero_()
        ctx.save_for_backward(table, ids, weights)
        ctx.lead = (b, t, *indices_BTHK.shape[2:])
        return out.view(b, t, d)

    @staticmethod
    def backward(ctx, grad_BTD: torch.Tensor):
        table, ids, weights = ctx.saved_tensors
        tokens, n = ids.shape
        d = table.shape[1]
        grad = grad_BTD.reshape(tokens, d).contiguous()
        block_n, block_d = _blocks(n, d)
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_table = torch.zeros_like(table)
            if tokens and n:
                gather_weighted_sum_bwd_table[(tokens, triton.cdiv(d, block_d))](
                    grad, ids, weights, grad_table, n, d, BLOCK_N=block_n, BLOCK_D=block_d)
        if ctx.needs_input_grad[2]:
            grad_weights = torch.zeros_like(weights)
            if tokens and n:
                gather_weighted_sum_bwd_weights[(tokens, triton.cdiv(n, block_n))](
                    grad, ids, table, grad_weights, n, d, BLOCK_N=block_n, BLOCK_D=block_d)
            grad_weights = grad_weights.view(ctx.lead)
        return grad_table, None, grad_weights


def gather_weighted_sum(table_RD: torch.Tensor, indices_BTHK: torch.Tensor, weights_BTHK: torch.Tensor) -> torch.Tensor:
    """The Triton form of ops.gather_weighted_sum, same arguments and result."""
    return GatherWeightedSum.apply(table_RD, indices_BTHK, weights_BTHK)


class GatherRowDot(torch.autograd.Function):
    """ops.gather_row_dot through the kernels above: saves the ids and the hidden, not the rows."""

    @staticmethod
    def forward(ctx, table_RD: torch.Tensor, indices_BTHK: torch.Tensor, x_BTD: torch.Tensor) -> torch.Tensor:
        b, t = indices_BTHK.shape[:2]
        n, d = indices_BTHK.shape[2:].numel(), table_RD.shape[1]
        table, ids, x = table_RD.contiguous(), indices_BTHK.reshape(b * t, n).contiguous(), x_BTD.reshape(b * t, d)
        x = x.contiguous()
        out = torch.zeros(b * t, n, dtype=table.dtype, device=table.device)
        block_n, block_d = _blocks(n, d)
        if b * t and n:
            gather_weighted_sum_bwd_weights[(b * t, triton.cdiv(n, block_n))](x, ids, table, out, n, d,
                                                                               BLOCK_N=block_n, BLOCK_D=block_d)
        ctx.save_for_backward(table, ids, x)
        return out.view(indices_BTHK.shape)

    @staticmethod
    def backward(ctx, grad_BTHK: torch.Tensor):
        table, ids, x = ctx.saved_tensors
        tokens, n = ids.shape
        d = table.shape[1]
        grad = grad_BTHK.reshape(tokens, n).contiguous()
        block_n, block_d = _blocks(n, d)
        grad_table = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_table = torch.zeros_like(table)
            if tokens and n:
                gather_weighted_sum_bwd_table[(tokens, triton.cdiv(d, block_d))](
                    x, ids, grad, grad_table, n, d, BLOCK_N=block_n, BLOCK_D=block_d)
        if ctx.needs_input_grad[2]:
            grad_x = torch.zeros_like(x)
            if tokens and n:
                gather_weighted_sum_fwd[(tokens, triton.cdiv(d, block_d))](table, ids, grad, grad_x, n, d,
                                                                            BLOCK_N=block_n, BLOCK_D=block_d)
            grad_x = grad_x.view(*grad_BTHK.shape[:2], d)
        return grad_table, None, grad_x


def gather_row_dot(table_RD: torch.Tensor, indices_BTHK: torch.Tensor, x_BTD: torch.Tensor) -> torch.Tensor:
    """The Triton form of ops.gather_row_dot, same arguments and result."""
    return GatherRowDot.apply(table_RD, indices_BTHK, x_BTD)
