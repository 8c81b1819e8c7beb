"""What every component shares: value labels for lowering, init rules, the pre-norm residual."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import ops
from ..schema import NormSpec


@dataclass(frozen=True)
class InitRule:
    """How a parameter is initialised: ``normal`` (mean 0, std), ``ones`` or ``zeros``."""

    kind: str
    std: float = 0.0


def named(label: str, value: Any) -> Any:
    """Label a value for lowering; a no-op on real tensors.

    While torch.fx traces, ``value`` is a Proxy whose node we tag, so the graph node (and the
    emitted variable) is called e.g. ``layers_0_attention_q`` instead of ``linear_3``.
    """
    node = getattr(value, "node", None)
    if node is not None and hasattr(node, "meta") and not isinstance(value, torch.Tensor):
        node.meta["ultraplan.label"] = label
    return value


class Norm(nn.Module):
    """RMSNorm or LayerNorm with a learned scale (and bias for LayerNorm)."""

    def __init__(self, spec: NormSpec, dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.ones(dim))
        if spec.kind == "layer":
            self.bias = nn.Parameter(torch.zeros(dim))

    def init_rules(self) -> dict[str, InitRule]:
        rules = {"weight": InitRule("ones")}
        if self.spec.kind == "layer":
            rules["bias"] = InitRule("zeros")
        return rules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.kind == "rms":
            return named("normed", ops.rms_norm(x, self.weight, self.spec.eps))
        return named("normed", ops.layer_norm(x, self.weight, self.bias, self.spec.eps))


class ResidualSublayer(nn.Module):
    """``x + body(norm(x))``: the pre-norm residual wrapper every sublayer kind shares."""

    def __init__(self, norm: NormSpec | None, dim: int) -> None:
        super().__init__()
        self.norm = Norm(norm, dim) if norm is not None else None

    def body(self, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def local_init_rules(self, std: float, out_std: float) -> dict[str, InitRule]:  # pragma: no cover
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, read: torch.Tensor | None = None, normed: torch.Tensor | None = None,
        deliver_later: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns (the residual stream after this sublayer, its normed input, a delayed output,
        an auxiliary loss or None); ``body`` may return (output, auxiliary loss).

        ``read`` is the stream to read when it is not ``x`` (a parallel sublayer), ``normed`` a
        normed input to share instead of norming; with ``deliver_later`` the output is returned
        for a later block to add instead of being added now.
        """
        source = x if read is None else read
        h = normed if normed is not None else (self.norm(source) if self.norm is not None else source)
        out = self.body(h)
        aux = None
        if isinstance(out, tuple):
            out, aux = out
        if deliver_later:
            return x, h, named("delayed", out), aux
        return named("residual", ops.add(x, out)), h, None, aux
