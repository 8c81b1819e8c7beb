"""Mixture of experts: a router picks top-k experts per token; dropless; optional shared experts.

Expert weights are stacked (E, F, D) tensors so that one op (``expert_ffn``) owns them: the unit a
planner shards for expert parallelism. Shared experts are always on; S of them of width F are
one dense FFN of width S*F (the sum of their outputs is exactly that FFN's output).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..schema import MoESpec, NormSpec
from .base import InitRule, ResidualSublayer, named
from .ffn import add_biases, ffn_body


class MoE(ResidualSublayer):
    component = "moe"

    def __init__(self, spec: MoESpec, norm: NormSpec | None, dim: int) -> None:
        super().__init__(norm, dim)
        self.spec = spec
        e, f = spec.experts, spec.hidden
        self.w_router = nn.Parameter(torch.empty(e, dim))
        self.w_up = nn.Parameter(torch.empty(e, f, dim))
        if spec.activation == "swiglu":
            self.w_gate = nn.Parameter(torch.empty(e, f, dim))
        self.w_down = nn.Parameter(torch.empty(e, dim, f))
        if spec.shared_experts:
            width = spec.shared_experts * f
            self.w_shared_up = nn.Parameter(torch.empty(width, dim))
            if spec.activation == "swiglu":
                self.w_shared_gate = nn.Parameter(torch.empty(width, dim))
            self.w_shared_down = nn.Parameter(torch.empty(dim, width))
            if spec.bias:
                add_biases(self, "shared_", width, dim, spec.activation)
        if spec.bias:  # per expert (HF transformers modeling_gpt_oss.py's experts carry such biases)
            self.b_up = nn.Parameter(torch.empty(e, f))
            if spec.activation == "swiglu":
                self.b_gate = nn.Parameter(torch.empty(e, f))
            self.b_down = nn.Parameter(torch.empty(e, dim))

    def local_init_rules(self, std: float, out_std: float) -> dict[str, InitRule]:
        return {name: InitRule("zeros") if name.startswith("b_") else InitRule("normal", out_std if "down" in name else std)
                for name, _ in self.named_parameters() if not name.startswith("norm.")}

    def body(self, h: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The routed (and shared) experts' output, with the balance loss when it is weighted."""
        s = self.spec
        logits = named("router_logits", ops.linear(h, self.w_router))
        probs = named("router_probs", ops.softmax(logits) if s.router == "softmax" else ops.sigmoid(logits))
        chosen = named("experts", ops.topk_indices(probs, s.topk))
        gates = named("gates", ops.take(probs, chosen))
        if s.normalize_topk:
            gates = named("gates_normalized", ops.normalize_sum(gates))
        aux = None
        if s.aux_loss_weight:
            counts = named("expert_counts", ops.expert_counts(chosen, s.experts))
            prob_sums = named("prob_sums", ops.column_sums(probs))
            aux = named("balance_loss", ops.balance_loss(counts, prob_sums, s.topk, s.aux_loss_weight))
        gate_weight = self.w_gate if s.activation == "swiglu" else self.w_up
        if s.bias:
            gate_bias = self.b_gate if s.activation == "swiglu" else self.b_up
            out = named("routed_nobias", ops.expert_ffn_biased(h, chosen, gates, self.w_up, gate_weight, self.w_down,
                                                               self.b_up, gate_bias, s.activation))
            out = named("routed", ops.add(out, named("routed_bias", ops.expert_bias(chosen, gates, self.b_down))))
        else:
            out = named("routed", ops.expert_ffn(h, chosen, gates, self.w_up, gate_weight, self.w_down, s.activation))
        if s.shared_experts:
            shared = ffn_body(h, self, s.activation, prefix="shared_")
            out = named("routed_and_shared", ops.add(out, shared))
        return (out, aux) if aux is not None else out
