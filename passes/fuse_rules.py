"""The chain fusion rules of passes/fuse.py, as data: each a chain of op kinds (a pattern), the
op-table record that replaces it, and the cost-model functions of the matched nodes giving the bytes
the fusion saves and the FLOPs it adds (sympy in B, T). Rules whose pattern is a graph, not a chain,
are in fuse_graph.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sympy

from ..compiler.node_info import NodeInfo
from ..compiler.shapes import numel
from .cost import ZERO
from .symbols import BYTES_PER_ELEMENT

# (records of the matched nodes, in pattern order; training?) -> bytes or FLOPs, sympy in B, T
CostRule = Callable[[list[NodeInfo], bool], sympy.Expr]


@dataclass(frozen=True)
class Step:
    """One op of a pattern: its kind, and which of its tensor arguments is the previous step's
    output (``via``; unused for the first step). Every step but the last must have one user."""

    op: str
    via: int = 0
    attrs: tuple[tuple[str, object], ...] = ()  # attribute values the node must have


@dataclass(frozen=True)
class Rule:
    """A fusion rule: ``pattern`` (a chain of steps) becomes one ``fused`` op, whose arguments are
    the chain's tensor arguments from outside it, in order, and whose attributes are the steps'."""

    name: str
    pattern: tuple[Step, ...]
    fused: str
    bytes_saved: CostRule
    extra_flops: CostRule
    why: str
    keep: tuple[str, ...] | None = None  # the attributes the fused op takes (None: all the steps')
    # the first step's value is read elsewhere too (a two-step rule): the fused op returns it and the
    # last step's value stacked, and two ``pair_part`` nodes stand in for the two replaced nodes
    shared: bool = False
    when: Callable[[list[NodeInfo]], bool] | None = None  # a further condition on the matched records
    # where --place splits the first input (a table): the table's SBP entries the fused op has shard forms
    # for (None: any). The UltraMem poolings' have the number-wise (owned and routed) and the column forms,
    # on one or several mesh axes, but not one call for number on one axis and dim on another
    placed_forms: tuple[str, ...] | None = None


def _scores_elements(recs: list[NodeInfo]) -> sympy.Expr:
    """B H T^2: one attention node's score matrix (global shape; shards divide it alike)."""
    batch, seq = recs[0].shape[0], recs[0].shape[1]
    return batch * recs[0].attrs["num_heads"] * seq * seq


def _attention_bytes_saved(recs: list[NodeInfo], train: bool) -> sympy.Expr:
    """ops.causal_attention writes the scores (first matmul), reads and writes them in the scale,
    the mask and the softmax, and reads the probabilities in the second matmul: 4 writes and 4 reads
    of B H T^2 elements. Its backward does at least as much (the saved probabilities read back, the
    softmax, mask and scale gradients); the fused kernel keeps all of it in tiles (FlashAttention,
    Dao et al. 2022, sec. 3.1)."""
    per_pass = 8 * _scores_elements(recs) * BYTES_PER_ELEMENT.get(recs[0].dtype, 4)
    return per_pass * (2 if train else 1)


def _attention_recompute(recs: list[NodeInfo], train: bool) -> sympy.Expr:
    """The flash backward recomputes the scores q k^T (2 B H T^2 E FLOPs; Dao et al. 2022, alg. 4)."""
    return 2 * _scores_elements(recs) * recs[0].attrs["head_dim"] if train else ZERO


def _gate_bytes_saved(recs: list[NodeInfo], train: bool) -> sympy.Expr:
    """silu(gate) * up as two ops writes silu(gate) and reads it back; fused, it stays in registers.
    In training the backward likewise no longer writes and reads the gradient of silu(gate)."""
    per_pass = 2 * numel(recs[-1].shape) * BYTES_PER_ELEMENT.get(recs[-1].dtype, 4)
    return per_pass * (2 if train else 1)


def _rows_bytes_saved(recs: list[NodeInfo], train: bool) -> sympy.Expr:
    """gather_rows writes the (B, T, H, K, D) rows and weighted_sum (row_dot, core_pool, ive_pool) reads them back; in
    training the backward writes their gradient and the scatter-add reads it. Fused, each row is read
    once from the table and summed (dotted) as it arrives (as EmbeddingBag does)."""
    per_pass = 2 * numel(recs[0].shape) * BYTES_PER_ELEMENT.get(recs[0].dtype, 4)
    return per_pass * (2 if train else 1)


def _nothing(recs: list[NodeInfo], train: bool) -> sympy.Expr:
    return ZERO


def _residual_norm_bytes_saved(recs: list[NodeInfo], train: bool) -> sympy.Expr:
    """add then rms_norm: the norm reads the sum back (one read of B T D); in training the norm's
    backward writes the gradient of the sum and autograd reads it back to add the residual's (a write
    and a read). Fused, the sum is normed as it is made and its one gradient is written once."""
    elements = numel(recs[0].shape) * BYTES_PER_ELEMENT.get(recs[0].dtype, 4)
    return elements * (3 if train else 1)


def _same_layer_and_dtype(recs: list[NodeInfo]) -> bool:
    """Both nodes in one layer (so layers stay alike for find_blocks) on (B, T, D) values of one dtype."""
    add, norm = recs
    return (len(add.shape) == 3 and add.dtype == norm.dtype
            and add.layer.split(".")[:2] == norm.layer.split(".")[:2] and add.layer.startswith("layers."))


RULES: tuple[Rule, ...] = (
    Rule("attention->sdpa", (Step("causal_attention"),), "sdpa_attention",
         _attention_bytes_saved, _attention_recompute,
         "scaled_dot_product_attention (is_causal, enable_gqa): the T x T scores stay in tiles"),
    Rule("gather+weighted_sum", (Step("gather_rows"), Step("weighted_sum", via=0)), "gather_weighted_sum",
         _rows_bytes_saved, _nothing, "embedding_bag: the gathered value rows are never stored", keep=()),
    # up * silu(gate) written as an activation and a product (Memory+'s gated memory output, PEER's
    # silu experts) is SwiGLU (Shazeer 2020): the swiglu op, gate first
    Rule("silu*mul->swiglu", (Step("activation", attrs=(("kind", "silu"),)), Step("mul", via=1)), "swiglu",
         _gate_bytes_saved, _nothing, "silu(gate) * up in one op: silu(gate) is not written", keep=()),
    Rule("silu*mul->swiglu", (Step("activation", attrs=(("kind", "silu"),)), Step("mul", via=0)), "swiglu",
         _gate_bytes_saved, _nothing, "silu(gate) * up in one op: silu(gate) is not written", keep=()),
    # each token's hidden against its gathered rows: PEER's down projections, UltraMemV2's pre-value gate
    Rule("gather+row_dot", (Step("gather_rows"), Step("row_dot", via=1)), "gather_row_dot", _rows_bytes_saved,
         _nothing, "the gathered rows are dotted as they are read, not stored for the backward", keep=()),
    # the residual add and the norm of the sum (both read on): one pass, the sum and its norm stacked
    # UltraMem's pooling of its value rows: UltraMemV2's multi-core pooling (column chunk k weighted by core
    # k), UltraMem's implicit value expansion (each pick pooled into its virtual block) with it
    Rule("gather+core_pool", (Step("gather_rows"), Step("core_pool", via=0)), "gather_core_pool", _rows_bytes_saved,
         _nothing, "multi-core pooling as the rows are read: the gathered value rows are never stored", keep=(),
         placed_forms=("S(0)", "S(1)")),
    Rule("gather+ive_pool", (Step("gather_rows"), Step("ive_pool", via=0)), "gather_ive_pool", _rows_bytes_saved,
         _nothing, "implicit value expansion pooled as the rows are read: the gathered value rows are never stored",
         keep=("num_blocks",), placed_forms=("S(0)", "S(1)")),
    Rule("add+rms_norm", (Step("add"), Step("rms_norm", via=0)), "add_rms_norm", _residual_norm_bytes_saved,
         _nothing, "residual add and RMSNorm in one pass: the sum is not read back, its gradient written once",
         shared=True, when=_same_layer_and_dtype),
)
