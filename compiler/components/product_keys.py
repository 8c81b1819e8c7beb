"""Product-key retrieval shared by PKM and PEER, and the two memory layers built on it.

Retrieval, per head (Lample et al. 2019, "Large Memory Layers with Product Keys"):
    q = W_q x, split into halves q1, q2;  s1 = K1 q1, s2 = K2 q2  (n keys each)
    top-k of s1 and of s2;  the k*k grid of sums s1[i] + s2[j] at slots i*n + j;  top-k of the grid.
The grid holds the exact top-k of all n^2 slot scores (each is a sum of one row and one column
score, so a top-k slot's row and column are both in their halves' top-k). Each step is one op.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..memory_specs import PEERSpec, PKMSpec, ProductKeySpec
from ..schema import NormSpec
from .base import InitRule, ResidualSublayer, named


class ProductKeyRetrieval(ResidualSublayer):
    """Holds the query projection and the half-key tables; ``retrieve`` returns (scores, slots)."""

    def __init__(self, spec: ProductKeySpec, norm: NormSpec | None, dim: int) -> None:
        super().__init__(norm, dim)
        self.spec = spec
        self.w_query = nn.Parameter(torch.empty(spec.heads * spec.key_dim, dim))
        self.keys = nn.Parameter(torch.empty(spec.heads, 2, spec.num_keys, spec.key_dim // 2))
        if spec.query_norm:
            self.query_norm_weight = nn.Parameter(torch.empty(spec.key_dim // 2))
            self.query_norm_bias = nn.Parameter(torch.empty(spec.key_dim // 2))

    def retrieval_init_rules(self, std: float) -> dict[str, InitRule]:
        rules = {"w_query": InitRule("normal", std), "keys": InitRule("normal", 1 / math.sqrt(self.spec.key_dim))}
        if self.spec.query_norm:
            rules.update(query_norm_weight=InitRule("ones"), query_norm_bias=InitRule("zeros"))
        return rules

    def retrieve(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        query = named("query", ops.linear(h, self.w_query))
        if s.query_norm:
            query = named("query_normed", ops.group_layer_norm(query, self.query_norm_weight, self.query_norm_bias, 1e-5))
        half_scores = named("half_scores", ops.pk_scores(query, self.keys))
        half_best = named("half_topk", ops.topk_indices(half_scores, s.topk))
        half_kept = named("half_kept", ops.take(half_scores, half_best))
        grid = named("grid_scores", ops.grid_scores(half_kept))
        grid_slots = named("grid_slots", ops.grid_indices(half_best, s.num_keys))
        best = named("topk", ops.topk_indices(grid, s.topk))
        scores = named("scores", ops.take(grid, best))
        slots = named("slots", ops.take(grid_slots, best))
        return scores, slots


class PKM(ProductKeyRetrieval):
    """softmax over the selected scores; output sum over heads and slots of w * V[slot]."""

    value_tables = ("values",)  # optimizer group 'values' (own LR multiplier)

    component = "pkm"

    def __init__(self, spec: PKMSpec, norm: NormSpec | None, dim: int) -> None:
        super().__init__(spec, norm, dim)
        self.value_dim = spec.value_dim or dim
        if not spec.shared_values:
            self.values = nn.Parameter(torch.empty(spec.num_keys**2, self.value_dim))
        if spec.gated:
            self.w_gate = nn.Parameter(torch.empty(self.value_dim, dim))
        if spec.gated or self.value_dim != dim:
            self.w_out = nn.Parameter(torch.empty(dim, self.value_dim))
        self._table: list[nn.Module] = []  # the shared table, set by attach()

    def attach(self, table: nn.Module, slot: object) -> None:
        self._table = [table]

    def local_init_rules(self, std: float, out_std: float) -> dict[str, InitRule]:
        rules = dict(self.retrieval_init_rules(std))
        if not self.spec.shared_values:
            rules["values"] = InitRule("normal", 1 / math.sqrt(self.value_dim))
        if hasattr(self, "w_gate"):
            rules["w_gate"] = InitRule("normal", std)
        if hasattr(self, "w_out"):
            rules["w_out"] = InitRule("normal", out_std)
        return rules

    def body(self, h: torch.Tensor) -> torch.Tensor:
        values = self._table[0].values if self.spec.shared_values else self.values
        scores, slots = self.retrieve(h)
        weights = named("weights", ops.softmax(scores))
        rows = named("rows", ops.gather_rows(values, slots))
        out = named("pooled", ops.weighted_sum(rows, weights))
        if self.spec.gated:
            gate = named("gate", ops.activation(ops.linear(h, self.w_gate), "silu"))
            out = named("gated", ops.mul(out, gate))
        if hasattr(self, "w_out"):
            out = named("out", ops.linear(out, self.w_out))
        return out


class PEER(ProductKeyRetrieval):
    """Each slot i is an expert act(u_i . x) v_i; gates are the softmax of the selected scores."""

    value_tables = ("down", "up")  # optimizer group 'values' (own LR multiplier)

    component = "peer"

    def __init__(self, spec: PEERSpec, norm: NormSpec | None, dim: int) -> None:
        super().__init__(spec, norm, dim)
        self.down = nn.Parameter(torch.empty(spec.num_keys**2, dim))
        self.up = nn.Parameter(torch.empty(spec.num_keys**2, dim))

    def local_init_rules(self, std: float, out_std: float) -> dict[str, InitRule]:
        return {**self.retrieval_init_rules(std), "down": InitRule("normal", std), "up": InitRule("normal", out_std)}

    def body(self, h: torch.Tensor) -> torch.Tensor:
        scores, slots = self.retrieve(h)
        gates = named("gates", ops.softmax(scores))
        down_rows = named("down_rows", ops.gather_rows(self.down, slots))
        hidden = named("hidden", ops.activation(ops.row_dot(h, down_rows), self.spec.activation))
        weights = named("weights", ops.mul(hidden, gates))
        up_rows = named("up_rows", ops.gather_rows(self.up, slots))
        return named("out", ops.weighted_sum(up_rows, weights))
