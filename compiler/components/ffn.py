"""Feed-forward networks: SwiGLU (gate, up, down) or GELU (up, down)."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..schema import FFNSpec, NormSpec
from .base import InitRule, ResidualSublayer, named


class FFN(ResidualSublayer):
    component = "ffn"
    def __init__(self, spec: FFNSpec, norm: NormSpec | None, dim: int) -> None:
        super().__init__(norm, dim)
        self.spec = spec
        if spec.activation == "swiglu":
            self.w_gate = nn.Parameter(torch.empty(spec.width, dim))
        self.w_up = nn.Parameter(torch.empty(spec.width, dim))
        self.w_down = nn.Parameter(torch.empty(dim, spec.width))

    def local_init_rules(self, std: float, out_std: float) -> dict[str, InitRule]:
        rules = {"w_up": InitRule("normal", std), "w_down": InitRule("normal", out_std)}
        if self.spec.activation == "swiglu":
            rules["w_gate"] = InitRule("normal", std)
        return rules

    def body(self, h: torch.Tensor) -> torch.Tensor:
        up = named("up", ops.linear(h, self.w_up))
        if self.spec.activation == "swiglu":
            gate = named("gate", ops.linear(h, self.w_gate))
            act = named("act", ops.swiglu(gate, up))
        else:
            act = named("act", ops.gelu(up))
        return named("down", ops.linear(act, self.w_down))
