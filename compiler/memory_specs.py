"""The memory sublayers' specs: product-key memories (PKM, Memory+, PEER) and UltraMem / UltraMemV2.

Kept apart from schema.py (which imports them back) because they are the bulk of the schema; the
field metadata is read by validation and documented in docs/spec-language.md and docs/memory-layers.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .fields import doc

TuckerNorm = Literal["auto", "rms", "layer"]
TUCKER_NORM_DOC = ("rms (RMSNorm: x / rms(x) * weight) or layer (LayerNorm: (x - mean) / std * weight), each over "
                   "groups of D_k; auto: the kind of this sublayer's norm (else the model's), as the official code "
                   "builds it from layer_norm_type")
NormBias = bool | Literal["auto"]
NORM_BIAS_DOC = ("true: the norm adds a learned bias after its weight (either kind), false: weight only; auto: "
                 "a bias exactly for layer norms (this project's norms), as the official bias_for_layer_norm "
                 "sets it for both kinds")

MEMORY_TO_FFN_DOC = doc("memory-to-FFN compute ratio: memory FLOPs / FFN FLOPs per token of this block; sizes "
                        "the block's ffn, which must say hidden: auto (UltraMemV2's rebalancing)",
                        minimum=0, exclusive=True)


@dataclass(frozen=True)
class ProductKeySpec:
    """Product-key retrieval (Lample et al. 2019): N = num_keys^2 slots, two half-key tables per head."""

    num_keys: int = field(metadata=doc("keys per half table (n); slots N = n^2", minimum=1))
    topk: int = field(metadata=doc("slots selected per head (k, also the per-half top-k)", minimum=1))
    key_dim: int = field(metadata=doc("query/key width D_k per head, split into two halves", minimum=2))
    heads: int = field(default=1, metadata=doc("retrieval heads; their outputs are summed", minimum=1))
    query_norm: bool = field(default=False, metadata=doc("LayerNorm each half-query (width key_dim/2) before scoring"))
    memory_to_ffn: float | None = field(default=None, metadata=MEMORY_TO_FFN_DOC)


@dataclass(frozen=True)
class PKMSpec(ProductKeySpec):
    """Product Key Memory: softmax over the k selected scores, weighted sum of value rows."""

    value_dim: int | None = field(default=None, metadata=doc("value width; defaults to hidden (else projected)",
                                                             minimum=1))
    gated: bool = field(default=False, metadata=doc(
        "Memory+ output: W_out (pooled * silu(W_gate x)), two value_dim x hidden projections"))
    shared_values: bool = field(default=False, metadata=doc(
        "one value table for every pkm layer that sets this (Memory+'s shared values)"))


@dataclass(frozen=True)
class PEERSpec(ProductKeySpec):
    """PEER (He 2024): each slot is a one-neuron expert with a down and an up embedding."""

    activation: Literal["gelu", "relu", "silu"] = field(default="gelu", metadata=doc("on the expert's hidden unit"))


@dataclass(frozen=True)
class UltraMemV2Spec:
    """UltraMemV2 (Huang et al. 2025): Tucker-decomposed retrieval (TDQKR), pre-value gates, multi-core
    pooling of value rows, one output projection; value tables may be shared across layers.

    ``share``: ``none`` (each layer owns n^2 rows), ``ring`` (one table of L_m n^2 rows; layer l
    addresses share_layers * n^2 of them starting at l n^2, wrapping) or ``block`` (groups of
    share_layers layers share share_layers * n^2 rows). A sharing layer addresses
    n' = floor(sqrt(share_layers) n) keys per half (UltraMemV2, Huang et al. 2025, arXiv:2508.18756).
    """

    num_keys: int = field(metadata=doc("keys per half of a layer's own share (n); its rows are n^2", minimum=1))
    topk: int = field(metadata=doc("slots kept per head (m), also the per-half top-m", minimum=1))
    key_dim: int = field(metadata=doc("query/key width D_k", minimum=1))
    value_dim: int = field(metadata=doc("value width D_v", minimum=1))
    pre_value_dim: int = field(default=0, metadata=doc("pre-value width D_p; 0 leaves pre-values out", minimum=0))
    rank: int = field(default=2, metadata=doc("Tucker rank r", minimum=1))
    cores: int = field(default=2, metadata=doc("Tucker cores c (multi-core scoring); divides value_dim", minimum=1))
    heads: int = field(default=1, metadata=doc("retrieval heads", minimum=1))
    query_per_rank: bool = field(default=False, metadata=doc("a separate query for each Tucker rank"))
    official_query: bool = field(default=False, metadata=doc(
        "the official mem_q_for_each_tucker_rank projection (rank 2, heads 1, 2 or 4): 2 rank D_k wide, of "
        "which head h reads the (h // 2)-th 2 D_k as its row and column query, shared by the ranks; rows no "
        "head reads are parameters without gradient, counted as the published figures count them"))
    query_norm: TuckerNorm = field(default="auto", metadata=doc("the query norm: " + TUCKER_NORM_DOC))
    key_norm: TuckerNorm = field(default="auto", metadata=doc("the key norm: " + TUCKER_NORM_DOC))
    query_norm_bias: NormBias = field(default="auto", metadata=doc("the query norm's bias: " + NORM_BIAS_DOC))
    key_norm_bias: NormBias = field(default="auto", metadata=doc("the key norm's bias: " + NORM_BIAS_DOC))
    key_expand: int = field(default=1, metadata=doc(
        "key expansion E, the official mem_key_expand_time: E n' keys per half address E^2 virtual slots per "
        "value row (slot s reads row s mod n'^2 after the shuffle); the rows' pooled outputs are summed",
        minimum=1))
    key_balance_weight: float = field(default=0.0, metadata=doc(
        "weight of the key-balance loss added to the training loss, the official mem_key_balance_reg_coef: "
        "per half, N sum_i f_i P_i over its N keys (f_i: share of the top-m picks, P_i: mean softmax of the "
        "rank-1 scores); 0 leaves it out", minimum=0))
    pre_value_gelu: bool = field(default=False, metadata=doc(
        "GELU (exact) on the pre-value score, the official mem_use_glu_act; off in the published configs"))
    share: Literal["none", "ring", "block"] = field(default="none", metadata=doc("value-table sharing scheme"))
    share_layers: int = field(default=1, metadata=doc("layers' shares one layer addresses (g)", minimum=1))
    init: Literal["code", "paper"] = field(default="code", metadata=doc(
        "code: the official scripts' init; paper: Appendix A (needs pre-values and an ffn in the block)"))
    memory_to_ffn: float | None = field(default=None, metadata=MEMORY_TO_FFN_DOC)

    @property
    def addressed_keys(self) -> int:
        """n' = floor(sqrt(g) n): the official knum of a layer that reads g layers' shares; it addresses
        n'^2 value rows (ultramem_layer_v2.py:127-129)."""
        import math

        return math.isqrt(self.share_layers * self.num_keys**2)

    @property
    def effective_keys(self) -> int:
        """E n': keys per half, the official key_num = key_expand_time * knum (ultramem_layer_v2.py:131)."""
        return self.key_expand * self.addressed_keys


@dataclass(frozen=True)
class UltraMemSpec:
    """UltraMem (Huang et al., ICLR 2025): TDQKR retrieval, implicit value expansion (E virtual
    blocks over one physical table, each with its own slice of the output projection) and
    multi-core scoring; no softmax. Usually placed ``parallel`` to a block's FFN with
    ``deliver_after`` set (the skip-layer arrangement of UltraMem, arXiv:2411.12364)."""

    num_keys: int = field(metadata=doc("physical keys per half (n); the table has n^2 rows", minimum=1))
    topk: int = field(metadata=doc("slots kept per head (m)", minimum=1))
    key_dim: int = field(metadata=doc("query/key width D_k", minimum=1))
    value_dim: int = field(metadata=doc("value width D_v", minimum=1))
    heads: int = field(default=2, metadata=doc("retrieval heads", minimum=1))
    share_query: bool = field(default=True, metadata=doc("one query serves each pair of heads"))
    query_norm: TuckerNorm = field(default="auto", metadata=doc("the query norm: " + TUCKER_NORM_DOC))
    key_norm: TuckerNorm = field(default="auto", metadata=doc("the key norm: " + TUCKER_NORM_DOC))
    query_norm_bias: NormBias = field(default="auto", metadata=doc("the query norm's bias: " + NORM_BIAS_DOC))
    key_norm_bias: NormBias = field(default="auto", metadata=doc("the key norm's bias: " + NORM_BIAS_DOC))
    rank: int = field(default=2, metadata=doc("Tucker rank r", minimum=1))
    cores: int = field(default=2, metadata=doc("Tucker cores c; divides value_dim", minimum=1))
    expansion: int = field(default=4, metadata=doc(
        "IVE factor E, a perfect square: sqrt(E) n keys per half (the official key_expand_time = "
        "sqrt(value_expand_time), olmo/ultramem_layer.py:81-84: V1's key expansion)", minimum=1))
    memory_to_ffn: float | None = field(default=None, metadata=MEMORY_TO_FFN_DOC)

    @property
    def effective_keys(self) -> int:
        import math

        return math.isqrt(self.expansion) * self.num_keys

    @property
    def query_heads(self) -> int:
        return self.heads // 2 if self.share_query else self.heads
