"""Feed-forward networks: SwiGLU (gate, up, down) or GELU (up, down), optionally with biases (GPT-2's
c_fc and c_proj biases; HF transformers modeling_gpt2.py GPT2MLP)."""

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
        if spec.bias:
            add_biases(self, "", spec.width, dim, spec.activation)

    def local_init_rules(self, std: float, out_std: float) -> dict[str, InitRule]:
        rules = {"w_up": InitRule("normal", std), "w_down": InitRule("normal", out_std)}
        if self.spec.activation == "swiglu":
            rules["w_gate"] = InitRule("normal", std)
        if self.spec.bias:
            rules |= {name: InitRule("zeros") for name, _ in self.named_parameters() if name.startswith("b_")}
        return rules

    def body(self, h: torch.Tensor) -> torch.Tensor:
        return ffn_body(h, self, self.spec.activation)


def add_biases(module: nn.Module, prefix: str, width: int, dim: int, activation: str) -> None:
    """``b_{prefix}up`` (and ``b_{prefix}gate``) of ``width``, ``b_{prefix}down`` of ``dim``."""
    module.register_parameter(f"b_{prefix}up", nn.Parameter(torch.empty(width)))
    if activation == "swiglu":
        module.register_parameter(f"b_{prefix}gate", nn.Parameter(torch.empty(width)))
    module.register_parameter(f"b_{prefix}down", nn.Parameter(torch.empty(dim)))


def _project(label: str, h: torch.Tensor, module: nn.Module, which: str) -> torch.Tensor:
    """``h @ w_which.T`` (+ ``b_which`` when the module has it: its own ``bias_add`` node)."""
    out = ops.linear(h, getattr(module, f"w_{which}"))
    bias = getattr(module, f"b_{which}", None)
    if bias is not None:
        out = ops.bias_add(named(f"{label}_nobias", out), bias)
    return named(label, out)


def ffn_body(h: torch.Tensor, module: nn.Module, activation: str, prefix: str = "") -> torch.Tensor:
    """up, (gate,) act, down, each a labelled node (``prefix`` + label), with weights
    ``module.w_{prefix}up`` etc. read where they are used (the traced graph's order): the FFN's
    body, and MoE's always-on shared experts (prefix ``shared_``)."""
    up = _project(f"{prefix}up", h, module, f"{prefix}up")
    if activation == "swiglu":
        gate = _project(f"{prefix}gate", h, module, f"{prefix}gate")
        act = named(f"{prefix}act", ops.swiglu(gate, up))
    else:
        act = named(f"{prefix}act", ops.gelu(up))
    return _project(f"{prefix}down", act, module, f"{prefix}down")
