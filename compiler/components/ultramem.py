"""UltraMemV2 (Huang, Bao, Min et al. 2025): a memory layer beside the FFN of every block.

Per token (research/memory_layers.md §5.2; D_k key width, r rank, c cores, m kept slots):
    q = LN(W_q x) split into row/column halves (one query, or one per Tucker rank)
    S_row[r], S_col[r] = keys[r] q            scores of every key, per rank          (tucker_scores)
    s_row = u . S_row, s_col = t . S_col      rank-1 filter; u, t from the cores      (rank_one_scores)
    top-m of s_row and s_col                                                        (topk_indices)
    score_k(i, j) = S_row[:, i]^T C_k S_col[:, j] over the m x m grid               (tucker_grid)
    top-m of sum_k score_k; keep each core's score at those slots          (sum_cores, take_cores)
    rows = (shuffle[slot] + offset) mod table rows                                   (shuffle_rows)
    g = <P_pre[row], W_pre x>     pre-value gate, no activation                     (row_dot)
    pooled = multi-core pooling of V[row] weighted by score_k * g                   (core_pool)
    y = W_o pooled
u and t (the leading singular vectors of sum_k C_k) and the shuffle are state, not parameters:
u and t are recomputed from the cores by ``refresh_state`` once per optimizer step.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..memory_tables import TableSlot
from ..schema import NormSpec, UltraMemV2Spec
from .base import InitRule, ResidualSublayer, named


class MemoryTable(nn.Module):
    """Value rows (and pre-value rows) that one or more memory layers read."""

    def __init__(self, rows: int, value_dim: int, pre_value_dim: int) -> None:
        super().__init__()
        self.values = nn.Parameter(torch.empty(rows, value_dim))
        if pre_value_dim:
            self.pre_values = nn.Parameter(torch.empty(rows, pre_value_dim))

    def init_rules(self, std: float) -> dict[str, InitRule]:
        return {name: InitRule("normal", std) for name, _ in self.named_parameters()}


class UltraMemV2(ResidualSublayer):
    component = "ultramem_v2"

    def __init__(self, spec: UltraMemV2Spec, norm: NormSpec | None, dim: int) -> None:
        super().__init__(norm, dim)
        self.spec = spec
        s = spec
        keys = s.effective_keys
        query_ranks = s.rank if s.query_per_rank else 1
        self.w_query = nn.Parameter(torch.empty(s.heads * 2 * query_ranks * s.key_dim, dim))
        self.query_norm_weight = nn.Parameter(torch.empty(s.key_dim))
        self.query_norm_bias = nn.Parameter(torch.empty(s.key_dim))
        self.keys = nn.Parameter(torch.empty(s.heads, 2, s.rank, keys, s.key_dim))
        self.key_norm_weight = nn.Parameter(torch.empty(s.key_dim))
        self.key_norm_bias = nn.Parameter(torch.empty(s.key_dim))
        self.cores = nn.Parameter(torch.empty(s.heads, s.cores, s.rank, s.rank))
        if s.pre_value_dim:
            self.w_pre = nn.Parameter(torch.empty(s.pre_value_dim, dim))
        self.w_out = nn.Parameter(torch.empty(dim, s.value_dim))
        self.register_buffer("shuffle", torch.empty(keys * keys, dtype=torch.int64))
        self.register_buffer("rank_one", torch.empty(2, s.heads, s.rank))
        self._table: list[MemoryTable] = []  # set by attach(); a plain list keeps it out of this module's params
        self.offset = 0
        self.table_rows = 0

    def attach(self, table: MemoryTable, slot: TableSlot) -> None:
        self._table = [table]
        self.offset = slot.offset
        self.table_rows = slot.rows

    def local_init_rules(self, std: float, out_std: float) -> dict[str, InitRule]:
        """The official code's choices (research §4.5, §5.1): LN gains D_k^-0.4, cores U(0, 1),
        linears N(0, init_std), the output projection scaled like every residual output."""
        gain = InitRule("constant", self.spec.key_dim ** -0.4)
        rules = {"w_query": InitRule("normal", std), "keys": InitRule("normal", std),
                 "query_norm_weight": gain, "query_norm_bias": InitRule("zeros"),
                 "key_norm_weight": gain, "key_norm_bias": InitRule("zeros"),
                 "cores": InitRule("uniform", 1.0), "w_out": InitRule("normal", out_std)}
        if self.spec.pre_value_dim:
            rules["w_pre"] = InitRule("normal", std)
        return rules

    def state_rules(self) -> dict[str, tuple[str, ...]]:
        """How each buffer is made: the shuffle is a seeded permutation; u and t derive from the cores."""
        return {"shuffle": ("permutation",), "rank_one": ("derived", "rank_one_vectors", "cores")}

    def refresh_state(self) -> None:
        """Recompute u and t from the cores (once per optimizer step, outside autograd)."""
        self.rank_one.copy_(ops.rank_one_vectors(self.cores.detach()))

    def body(self, h: torch.Tensor) -> torch.Tensor:
        s = self.spec
        table = self._table[0]
        query_ranks = s.rank if s.query_per_rank else 1
        query = named("query", ops.linear(h, self.w_query))
        query = named("query_normed", ops.group_layer_norm(query, self.query_norm_weight, self.query_norm_bias, 1e-5))
        keys = named("keys_normed", ops.group_layer_norm(self.keys, self.key_norm_weight, self.key_norm_bias, 1e-5))
        scores = named("key_scores", ops.tucker_scores(query, keys, query_ranks))
        filtered = named("rank_one_scores", ops.rank_one_scores(scores, self.rank_one))
        half_best = named("half_topk", ops.topk_indices(filtered, s.topk))
        kept = named("half_kept", ops.take_ranked(scores, half_best))
        grid = named("grid_scores", ops.tucker_grid(kept, self.cores))
        total = named("grid_total", ops.sum_cores(grid))
        best = named("topk", ops.topk_indices(total, s.topk))
        core_scores = named("core_scores", ops.take_cores(grid, best))
        slots = named("slots", ops.take(ops.grid_indices(half_best, s.effective_keys), best))
        rows = named("rows", ops.shuffle_rows(slots, self.shuffle, self.offset, self.table_rows))
        if s.pre_value_dim:
            pre = named("pre", ops.linear(h, self.w_pre))
            pre_rows = named("pre_rows", ops.gather_rows(table.pre_values, rows))
            gates = named("pre_gates", ops.row_dot(pre, pre_rows))
            core_scores = named("weights", ops.scale_cores(core_scores, gates))
        value_rows = named("value_rows", ops.gather_rows(table.values, rows))
        pooled = named("pooled", ops.core_pool(value_rows, core_scores))
        return named("out", ops.linear(pooled, self.w_out))
