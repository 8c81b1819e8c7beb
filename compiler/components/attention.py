"""Causal self-attention with GQA and RoPE; weights stored (out, in) like torch.nn.Linear."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..schema import AttentionSpec, NormSpec
from .base import InitRule, ResidualSublayer, named


class Attention(ResidualSublayer):
    component = "attention"
    def __init__(self, spec: AttentionSpec, norm: NormSpec | None, dim: int) -> None:
        super().__init__(norm, dim)
        self.spec = spec
        assert spec.head_dim is not None and spec.kv_heads is not None  # resolved by validation
        q_width, kv_width = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
        self.wq = nn.Parameter(torch.empty(q_width, dim))
        self.wk = nn.Parameter(torch.empty(kv_width, dim))
        self.wv = nn.Parameter(torch.empty(kv_width, dim))
        self.wo = nn.Parameter(torch.empty(dim, q_width))

    def local_init_rules(self, std: float, out_std: float) -> dict[str, InitRule]:
        normal = InitRule("normal", std)
        return {"wq": normal, "wk": normal, "wv": normal, "wo": InitRule("normal", out_std)}

    def body(self, h: torch.Tensor) -> torch.Tensor:
        s = self.spec
        q = named("q", ops.linear(h, self.wq))
        k = named("k", ops.linear(h, self.wk))
        v = named("v", ops.linear(h, self.wv))
        if s.rotary:
            q = named("q_rot", ops.rope(q, s.heads, s.head_dim, s.rope_theta))
            k = named("k_rot", ops.rope(k, s.kv_heads, s.head_dim, s.rope_theta))
        mixed = named("mixed", ops.causal_attention(q, k, v, s.heads, s.kv_heads, s.head_dim))
        return named("out", ops.linear(mixed, self.wo))
