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
        return ffn_body(h, self, self.spec.activation)


def ffn_body(h: torch.Tensor, module: nn.Module, activation: str, prefix: str = "") -> torch.Tensor:
    """up, (gate,) act, down, each a labelled node (``prefix`` + label), with weights
    ``module.w_{prefix}up`` etc. read where they are used (the traced graph's order): the FFN's
    body, and MoE's always-on shared experts (prefix ``shared_``)."""
    up = named(f"{prefix}up", ops.linear(h, getattr(module, f"w_{prefix}up")))
    if activation == "swiglu":
        gate = named(f"{prefix}gate", ops.linear(h, getattr(module, f"w_{prefix}gate")))
        act = named(f"{prefix}act", ops.swiglu(gate, up))
    else:
        act = named(f"{prefix}act", ops.gelu(up))
    return named(f"{prefix}down", ops.linear(act, getattr(module, f"w_{prefix}down")))
