"""The op vocabulary of ultraplan: plain torch functions, one per graph node kind.

This file must import nothing but torch: it is copied verbatim next to every emitted program
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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight, over the last dim."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def linear(x: torch.Tensor, weight_OI: torch.Tensor) -> torch.Tensor:
    """x @ weight.T with weight stored (out, in), as torch.nn.Linear stores it; no bias."""
    return F.linear(x, weight_OI)


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


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU gating (Shazeer 2020): silu(gate) * up."""
    return F.silu(gate) * up


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (as in GPT-2)."""
    return F.gelu(x, approximate="tanh")


def add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Residual addition."""
    return x + y


def cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over every position of this batch."""
    return F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())
