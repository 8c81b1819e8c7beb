"""UltraMem (ICLR 2025) and UltraMemV2 (2025): memory layers with Tucker-decomposed retrieval.

UltraMemV2: a memory layer beside the FFN of every block.

Per token (UltraMemV2, arXiv 2508.18756 §4.2; D_k key width, r rank, c cores, m kept slots):
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
u and t are recomputed from the cores by ``build.refresh_state`` (following ``state_rules``) once per
optimizer step.

The official code's options (Ultra-Sparse-Memory-Network olmo/ultramem_layer_v2.py): key expansion
E (E n' keys per half, E^2 virtual slots per row, summed: ``expanded_rows``, :120-131, :328-331), the
key-balance loss on the rank-1 scores (``key_balance``, :380-394) and the official query projection
(2 r D_k rows, head h reading group h // 2: ``official_query``, :50-55, :119).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..memory_specs import UltraMemSpec, UltraMemV2Spec
from ..memory_tables import TableSlot
from ..schema import NormSpec
from .base import InitRule, ResidualSublayer, named
from .ultramem_init import OFFICIAL_VALUE_STD, PaperInit


def _norm_kind(field: str, norm: NormSpec | None) -> str:
    """A spec built in Python may still say ``auto`` (the loader resolves it): the sublayer's norm."""
    if field != "auto":
        return field
    return norm.kind if norm is not None else "layer"


def _norm_bias(field: bool | str, kind: str) -> bool:
    """``auto``: a bias exactly for a layer norm (the project's own norms); else as written."""
    return kind == "layer" if field == "auto" else bool(field)


class MemoryTable(nn.Module):
    """Value rows (and pre-value rows) that one or more memory layers read."""

    value_tables = ("values", "pre_values")  # optimizer group 'values' (own LR multiplier)

    def __init__(self, rows: int, value_dim: int, pre_value_dim: int) -> None:
        super().__init__()
        self.values = nn.Parameter(torch.empty(rows, value_dim))
        if pre_value_dim:
            self.pre_values = nn.Parameter(torch.empty(rows, pre_value_dim))

    value_std: float | None = None  # set by a reader that initialises values by the paper's rule

    def init_rules(self, std: float) -> dict[str, InitRule]:
        return {name: InitRule("normal", self.value_std or std) for name, _ in self.named_parameters()}


class TuckerRetrieval(ResidualSublayer):
    """TDQKR, shared by UltraMem and UltraMemV2: query and key LayerNorms, per-rank scores, the
    rank-1 filter, exact bilinear rescoring of the m x m grid by each core, top-m."""

    def __init__(self, spec: UltraMemSpec | UltraMemV2Spec, norm: NormSpec | None, dim: int,
                 query_heads: int, query_ranks: int, query_rows: int = 0) -> None:
        """``query_rows``: the projection's rows when it holds more than the heads read (the official
        mem_q_for_each_tucker_rank layout); the first query_heads * 2 * query_ranks * D_k are read."""
        super().__init__(norm, dim)
        self.spec = spec
        s = spec
        keys = s.effective_keys
        self.query_heads, self.query_ranks = query_heads, query_ranks
        self.query_read = query_heads * 2 * query_ranks * s.key_dim
        self.query_rows = max(query_rows, self.query_read)
        self.w_query = nn.Parameter(torch.empty(self.query_rows, dim))
        self.keys = nn.Parameter(torch.empty(s.heads, 2, s.rank, keys, s.key_dim))
        self.norm_kinds = {which: _norm_kind(getattr(s, f"{which}_norm"), norm) for which in ("query", "key")}
        self.norm_biases = {which: _norm_bias(getattr(s, f"{which}_norm_bias"), kind)
                            for which, kind in self.norm_kinds.items()}
        for which in self.norm_kinds:
            setattr(self, f"{which}_norm_weight", nn.Parameter(torch.empty(s.key_dim)))
            if self.norm_biases[which]:
                setattr(self, f"{which}_norm_bias", nn.Parameter(torch.empty(s.key_dim)))
        self.cores = nn.Parameter(torch.empty(s.heads, s.cores, s.rank, s.rank))
        self.register_buffer("shuffle", torch.empty(keys * keys, dtype=torch.int64))
        self.register_buffer("rank_one", torch.empty(2, s.heads, s.rank))

    def retrieval_init_rules(self, query_std: float, key_std: float, gain: float) -> dict[str, InitRule]:
        rules = {"w_query": InitRule("normal", query_std), "keys": InitRule("normal", key_std),
                 "query_norm_weight": InitRule("constant", gain), "key_norm_weight": InitRule("constant", gain),
                 "cores": InitRule("uniform", 1.0)}
        rules.update({f"{which}_norm_bias": InitRule("zeros") for which, bias in self.norm_biases.items() if bias})
        return rules

    def _normed(self, which: str, x: torch.Tensor) -> torch.Tensor:
        """The query or key norm over groups of D_k: RMSNorm or LayerNorm, with or without a bias
        (zeros at init, olmo/model.py:186-193; the official reset_parameters sets only the weights)."""
        weight = getattr(self, f"{which}_norm_weight")
        rms = self.norm_kinds[which] == "rms"
        if self.norm_biases[which]:
            bias = getattr(self, f"{which}_norm_bias")
            return ops.group_rms_norm_biased(x, weight, bias, 1e-5) if rms else ops.group_layer_norm(x, weight, bias, 1e-5)
        return ops.group_rms_norm(x, weight, 1e-5) if rms else ops.group_layer_norm_unbiased(x, weight, 1e-5)

    def state_rules(self) -> dict[str, tuple[str, ...]]:
        """How each buffer is made: the shuffle is a seeded permutation; u and t derive from the cores."""
        return {"shuffle": ("permutation",), "rank_one": ("derived", "rank_one_vectors", "cores")}

    def retrieve(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-core scores (B, T, H, C, m) and slots (B, T, H, m) of the m best virtual slots, and
        the key-balance loss when it is weighted (else None)."""
        s = self.spec
        query = named("query", ops.linear(h, self.w_query))
        if self.query_rows != self.query_read:  # the official layout's rows no head reads
            query = named("query_read", ops.leading_features(query, self.query_read))
        query = named("query_normed", self._normed("query", query))
        keys = named("keys_normed", self._normed("key", self.keys))
        if self.query_heads != s.heads:
            scores = ops.tucker_scores(query, keys, self.query_ranks, self.query_heads)
        else:
            scores = ops.tucker_scores(query, keys, self.query_ranks)
        scores = named("key_scores", scores)
        filtered = named("rank_one_scores", ops.rank_one_scores(scores, self.rank_one))
        half_best = named("half_topk", ops.topk_indices(filtered, s.topk))
        aux = self.key_balance(filtered, half_best) if getattr(s, "key_balance_weight", 0) else None
        kept = named("half_kept", ops.take_ranked(scores, half_best))
        grid = named("grid_scores", ops.tucker_grid(kept, self.cores))
        total = named("grid_total", ops.sum_cores(grid))
        best = named("topk", ops.topk_indices(total, s.topk))
        core_scores = named("core_scores", ops.take_cores(grid, best))
        slots = named("slots", ops.take(ops.grid_indices(half_best, s.effective_keys), best))
        return core_scores, slots, aux

    def key_balance(self, filtered: torch.Tensor, half_best: torch.Tensor) -> torch.Tensor:
        """The official key-balance loss (olmo/ultramem_layer_v2.py:380-394) from the rank-1 scores
        and the per-half top-m picks; its gradient reaches the scores through the softmax only."""
        s = self.spec
        probs = named("key_probs", ops.softmax(filtered))
        counts = named("key_counts", ops.half_key_counts(half_best, s.effective_keys))
        prob_sums = named("key_prob_sums", ops.half_prob_sums(probs))
        return named("key_balance_loss", ops.key_balance_loss(counts, prob_sums, s.topk, s.key_balance_weight))


class UltraMem(TuckerRetrieval):
    """UltraMem: IVE over E virtual blocks of one physical table, MCS, one projection per block."""

    value_tables = ("values",)  # optimizer group 'values' (own LR multiplier)

    component = "ultramem"

    def __init__(self, spec: UltraMemSpec, norm: NormSpec | None, dim: int) -> None:
        super().__init__(spec, norm, dim, spec.query_heads, 1)
        self.values = nn.Parameter(torch.empty(spec.num_keys**2, spec.value_dim))
        self.w_out = nn.Parameter(torch.empty(dim, spec.expansion * spec.value_dim))

    def local_init_rules(self, std: float, out_std: float) -> dict[str, InitRule]:
        """``UltraMemLayerV1.reset_parameters`` (Ultra-Sparse-Memory-Network olmo/ultramem_layer.py:
        111-127): norm gains D_k^-0.33 (:112-113), W_q and keys N(0, 1/D_k) (:115, :119), W_o
        N(0, 1/(E D_v)) (:116), values N(0, 0.02^2) whatever init_std is (:122-123), cores U(0, 1) (:127)."""
        s = self.spec
        rules = self.retrieval_init_rules(s.key_dim**-0.5, s.key_dim**-0.5, s.key_dim**-0.33)
        rules.update(values=InitRule("normal", OFFICIAL_VALUE_STD),
                     w_out=InitRule("normal", (s.expansion * s.value_dim) ** -0.5))
        return rules

    def body(self, h: torch.Tensor) -> torch.Tensor:
        s = self.spec
        core_scores, slots, _ = self.retrieve(h)
        table_rows = s.num_keys**2
        virtual = named("virtual_rows", ops.shuffle_rows(slots, self.shuffle, 0, s.expansion * table_rows))
        blocks = named("blocks", ops.block_of(virtual, table_rows))
        rows = named("rows", ops.row_in_block(virtual, table_rows))
        value_rows = named("value_rows", ops.gather_rows(self.values, rows))
        pooled = named("pooled", ops.ive_pool(value_rows, core_scores, blocks, s.expansion))
        return named("out", ops.linear(pooled, self.w_out))


class UltraMemV2(TuckerRetrieval):
    component = "ultramem_v2"

    def __init__(self, spec: UltraMemV2Spec, norm: NormSpec | None, dim: int) -> None:
        if spec.official_query:  # 2 rank D_k rows; head h reads group h // 2 (ultramem_layer_v2.py:50-55, 119)
            super().__init__(spec, norm, dim, (spec.heads + 1) // 2, 1, 2 * spec.rank * spec.key_dim)
        else:
            super().__init__(spec, norm, dim, spec.heads, spec.rank if spec.query_per_rank else 1)
        if spec.pre_value_dim:
            self.w_pre = nn.Parameter(torch.empty(spec.pre_value_dim, dim))
        self.w_out = nn.Parameter(torch.empty(dim, spec.value_dim))
        self.hidden = dim
        self._table: list[MemoryTable] = []  # set by attach(); a plain list keeps it out of this module's params
        self.offset = 0
        self.table_rows = 0

    def attach(self, table: MemoryTable, slot: TableSlot, paper: PaperInit | None = None) -> None:
        self._table = [table]
        self.offset = slot.offset
        self.table_rows = slot.rows
        self.paper = paper
        table.value_std = paper.value_std if paper is not None else OFFICIAL_VALUE_STD

    def local_init_rules(self, std: float, out_std: float) -> dict[str, InitRule]:
        """``init: code``, ``UltraMemLayerV2.reset_parameters`` (Ultra-Sparse-Memory-Network
        olmo/ultramem_layer_v2.py:200-253): norm gains D_k^-0.4 (:240-241), W_q N(0, 1/D_k) (:243),
        W_o N(0, 1/D_v) (:244; its input is D_v wide without key expansion), keys N(0, 1/D_k) (:246),
        W_pre N(0, 1/h) (:248), cores U(0, 1) (:252-253); values and pre-values N(0, 0.02^2) whatever
        init_std is (:203-238, set on the table in ``attach``). ``init: paper``: ultramem_init.py
        (linears sqrt(2/5h), gains for mean score 1)."""
        paper = getattr(self, "paper", None)
        if paper is not None:
            rules = self.retrieval_init_rules(paper.linear_std, paper.linear_std, paper.norm_gain)
            rules["w_out"] = InitRule("normal", paper.linear_std)
            rules["w_pre"] = InitRule("normal", paper.linear_std)
            return rules
        s = self.spec
        rules = self.retrieval_init_rules(s.key_dim**-0.5, s.key_dim**-0.5, s.key_dim**-0.4)
        rules["w_out"] = InitRule("normal", s.value_dim**-0.5)
        if s.pre_value_dim:
            rules["w_pre"] = InitRule("normal", self.hidden**-0.5)
        return rules

    def body(self, h: torch.Tensor) -> torch.Tensor:
        s = self.spec
        table = self._table[0]
        core_scores, slots, aux = self.retrieve(h)
        if s.key_expand > 1:  # E^2 virtual slots per row, their outputs summed (value_expand_time 1)
            rows = named("rows", ops.expanded_rows(slots, self.shuffle, s.addressed_keys**2, self.offset,
                                                   self.table_rows))
        else:
            rows = named("rows", ops.shuffle_rows(slots, self.shuffle, self.offset, self.table_rows))
        if s.pre_value_dim:
            pre = named("pre", ops.linear(h, self.w_pre))
            pre_rows = named("pre_rows", ops.gather_rows(table.pre_values, rows))
            gates = named("pre_gates", ops.row_dot(pre, pre_rows))
            if s.pre_value_gelu:  # mem_use_glu_act: F.gelu (exact) on the score (ultramem_layer_v2.py:490-491)
                gates = named("pre_gates_gelu", ops.activation(gates, "gelu_erf"))
            core_scores = named("weights", ops.scale_cores(core_scores, gates))
        value_rows = named("value_rows", ops.gather_rows(table.values, rows))
        pooled = named("pooled", ops.core_pool(value_rows, core_scores))
        out = named("out", ops.linear(pooled, self.w_out))
        return (out, aux) if aux is not None else out
