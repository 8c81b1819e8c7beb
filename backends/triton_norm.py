"""Triton kernels for the fused residual add + RMSNorm ``add_rms_norm`` (compiler/ops.py), forward and
backward, and the autograd function that runs them. Imports only torch and triton, so it can sit
beside an emitted program; runs on the CPU under ``TRITON_INTERPRET=1`` (how tests check it).

Replaces ``s = add(x, y); n = rms_norm(s, w)`` with both results read on, stacked (..., 2, D):

    out[r, 0, :] = s = x[r] + y[r]          rstd[r] = 1 / sqrt(mean(s^2) + eps)
    out[r, 1, :] = s * rstd[r] * w
    grad_s[r]    = g_sum[r] + rstd * (g_norm * w - s * rstd * mean(g_norm * w * s * rstd))
    grad_w      += g_norm[r] * s * rstd      (per-row partial products, summed by torch)

Bytes per row (fp32): forward x, y read and the sum and its norm written (4 D), against the
unfused ops' extra read of the sum (D); backward the two output gradients and the sum read and one
gradient written, against the unfused extra write and read of the norm's input gradient (2 D).
Block rule: one program per row, the feature block D rounded up to a power of two (a whole row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def add_rms_norm_fwd(x, y, w, out, rstd, D, eps, BLOCK_D: tl.constexpr):
    """One row: the sum and its norm into out (rows of 2 D), 1/rms into rstd."""
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    s = tl.load(x + r * D + cols, mask=ok, other=0.0).to(tl.float32) + tl.load(y + r * D + cols, mask=ok,
                                                                                other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / D + eps)
    weight = tl.load(w + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + r * 2 * D + cols, s.to(out.dtype.element_ty), mask=ok)
    tl.store(out + r * 2 * D + D + cols, (s * inv * weight).to(out.dtype.element_ty), mask=ok)
    tl.store(rstd + r, inv)


@triton.jit
def add_rms_norm_bwd(grad, out, w, rstd, grad_s, grad_w_rows, D, BLOCK_D: tl.constexpr):
    """One row: the sum's one gradient (the residual's plus the norm's) and the row's share of the
    weight's gradient."""
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    g_sum = tl.load(grad + r * 2 * D + cols, mask=ok, other=0.0).to(tl.float32)
    g_norm = tl.load(grad + r * 2 * D + D + cols, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(out + r * 2 * D + cols, mask=ok, other=0.0).to(tl.float32)
    inv = tl.load(rstd + r)
    normed = s * inv
    gw = g_norm * tl.load(w + cols, mask=ok, other=0.0).to(tl.float32)
    g = g_sum + inv * (gw - normed * (tl.sum(gw * normed, axis=0) / D))
    tl.store(grad_s + r * D + cols, g.to(grad_s.dtype.element_ty), mask=ok)
    tl.store(grad_w_rows + r * D + cols, g_norm * normed, mask=ok)


class AddRmsNorm(torch.autograd.Function):
    """ops.add_rms_norm through the kernels above: saves the stacked output and 1/rms per row."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        d = x.shape[-1]
        rows = x.numel() // d if d else 0
        out = torch.empty((*x.shape[:-1], 2, d), dtype=x.dtype, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        if rows:
            add_rms_norm_fwd[(rows,)](x.contiguous(), y.contiguous(), weight.contiguous(), out, rstd, d, eps,
                                      BLOCK_D=triton.next_power_of_2(d))
        ctx.save_for_backward(out, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, rstd, weight = ctx.saved_tensors
        d = out.shape[-1]
        rows = rstd.shape[0]
        grad_s = torch.empty((*out.shape[:-2], d), dtype=out.dtype, device=out.device)
        grad_w_rows = torch.empty(rows, d, dtype=torch.float32, device=out.device)
        if rows:
            add_rms_norm_bwd[(rows,)](grad.contiguous(), out, weight.contiguous(), rstd, grad_s, grad_w_rows, d,
                                      BLOCK_D=triton.next_power_of_2(d))
        grad_w = grad_w_rows.sum(dim=0).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return grad_s, grad_s, grad_w, None


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Triton form of ops.add_rms_norm, same arguments and result."""
    return AddRmsNorm.apply(x, y, weight, eps)
