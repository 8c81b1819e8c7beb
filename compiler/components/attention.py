"""Causal self-attention with GQA, RoPE, optional QK-norm and projection biases; weights stored
(out, in) like torch.nn.Linear.

QK-norm (``qk_norm``): ``full`` (or ``true``) is OLMoE's and OLMo-2's RMSNorm over the whole q and k
projections (HF transformers modeling_olmoe.py: ``q_norm = OlmoeRMSNorm(hidden_size)``, ``k_norm`` of
``head_dim * num_key_value_heads``); ``head`` is Qwen3's, one RMSNorm of ``head_dim`` applied to each
head (modeling_qwen3.py). Both run before rotary, as those models do. Biases (``bias``): GPT-2's
c_attn / c_proj biases, one per projection.
"""

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
        if spec.bias:
            self.bq = nn.Parameter(torch.empty(q_width))
            self.bk = nn.Parameter(torch.empty(kv_width))
            self.bv = nn.Parameter(torch.empty(kv_width))
            self.bo = nn.Parameter(torch.empty(dim))
        mode = spec.qk_norm_mode
        if mode is not None:
            self.q_norm = nn.Parameter(torch.empty(q_width if mode == "full" else spec.head_dim))
            self.k_norm = nn.Parameter(torch.empty(kv_width if mode == "full" else spec.head_dim))

    def local_init_rules(self, std: float, out_std: float) -> dict[str, InitRule]:
        normal = InitRule("normal", std)
        rules = {"wq": normal, "wk": normal, "wv": normal, "wo": InitRule("normal", out_std)}
        if self.spec.bias:
            rules |= {name: InitRule("zeros") for name in ("bq", "bk", "bv", "bo")}
        if self.spec.qk_norm_mode is not None:
            rules |= {"q_norm": InitRule("ones"), "k_norm": InitRule("ones")}
        return rules

    def _project(self, label: str, h: torch.Tensor, weight: str) -> torch.Tensor:
        out = ops.linear(h, getattr(self, f"w{weight}"))
        if self.spec.bias:
            out = ops.bias_add(named(f"{label}_nobias", out), getattr(self, f"b{weight}"))
        return named(label, out)

    def _qk_norm(self, label: str, x: torch.Tensor, weight: torch.Tensor, heads: int) -> torch.Tensor:
        s = self.spec
        if s.qk_norm_mode == "full":
            return named(label, ops.rms_norm(x, weight, s.qk_norm_eps))
        return named(label, ops.head_rms_norm(x, weight, heads, s.qk_norm_eps))

    def body(self, h: torch.Tensor) -> torch.Tensor:
        s = self.spec
        q = self._project("q", h, "q")
        k = self._project("k", h, "k")
        v = self._project("v", h, "v")
        if s.qk_norm_mode is not None:
            q = self._qk_norm("q_normed", q, self.q_norm, s.heads)
            k = self._qk_norm("k_normed", k, self.k_norm, s.kv_heads)
        if s.rotary:
            q = named("q_rot", ops.rope(q, s.heads, s.head_dim, s.rope_theta))
            k = named("k_rot", ops.rope(k, s.kv_heads, s.head_dim, s.rope_theta))
        mixed = named("mixed", ops.causal_attention(q, k, v, s.heads, s.kv_heads, s.head_dim))
        return self._project("out", mixed, "o")
