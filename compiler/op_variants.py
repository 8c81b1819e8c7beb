"""The op table's shard forms that are not einsum splits (``Variant``s): vocabulary-parallel embedding and
cross entropy, expert-parallel MoE, the value tables' number-wise and dimension-wise placements (owned and
routed, fused and unfused), and attention with replicated key/value heads. Each names the call its shard
runs, that call's arguments and the collectives it runs inside; compiler/op_table.py attaches them to
their ops.
"""

from __future__ import annotations

import dataclasses

import sympy

from .op_records import BYTES, MESH, InternalComm, Variant, chunk_start, shard_start
from .shapes import Shape, numel


def _cross_entropy_comms(ins: list[Shape], dtypes: list[str], attrs: dict, n: sympy.Expr,
                         train: bool) -> list[InternalComm]:
    """runtime.vocab_parallel_cross_entropy: per axis, one all-reduce of each position's max, one of
    its sum of exponentials stacked with its target logit; the backward is local. In float32 even
    from bfloat16 logits (it computes in at least float32, as ops.cross_entropy)."""
    positions = numel(ins[1])
    return [InternalComm("forward", "all_reduce", "each position's max", positions * 4),
            InternalComm("forward", "all_reduce", "each position's sum of exponentials and target logit",
                         2 * positions * 4)]


def _expert_parallel_comms(ins: list[Shape], dtypes: list[str], attrs: dict, n: sympy.Expr,
                           train: bool) -> list[InternalComm]:
    """runtime.expert_parallel_ffn: the routing counts, then each (token, slot)'s expert id and row
    to the expert's device, the results back; the backward sends the result gradients out and the
    row gradients back. What a device receives depends on routing; its mean over devices is what
    each sends, so the plan predicts that mean. On several axes each is one call over the group
    spanning them (``spanning``): n is the product of their sizes."""
    assignments = numel(ins[0][:-1]) * ins[1][-1]
    rows, x = assignments * ins[0][-1] * BYTES[dtypes[0]], dtypes[0]  # rows travel in x's dtype
    out = [InternalComm("forward", "all_to_all", "routing counts", n * 8, dtype="int64"),
           InternalComm("forward", "all_to_all", "expert ids", assignments * 8, dtype="int64"),
           InternalComm("forward", "all_to_all", "token rows", rows, dtype=x),
           InternalComm("forward", "all_to_all", "expert outputs", rows, data_dependent=True, dtype=x)]
    if train:
        out += [InternalComm("backward", "all_to_all", "expert output gradients", rows, dtype=x),
                InternalComm("backward", "all_to_all", "token row gradients", rows, data_dependent=True, dtype=x)]
    return out


VOCAB_EMBEDDING = Variant(
    "vocab_parallel", ("B", "S(0)"), "P", "ops.embedding_rows",
    "vocabulary-parallel embedding: each device looks up the ids in its rows of the table and "
    "writes zeros for the rest, so the devices' outputs sum to the lookup (Megatron-LM, Shoeybi et al. 2019)",
    args=lambda s, a, axes, sizes: (("row_start", shard_start(s[1][0], axes)),))
VOCAB_CROSS_ENTROPY = Variant(
    "vocab_parallel", ("S(2)", "B"), "P", "runtime.vocab_parallel_cross_entropy",
    "cross entropy over the split vocabulary: all-reduces of each position's max, sum of exponentials "
    "and target logit, never the logits (Megatron-LM's vocab-parallel cross entropy)",
    args=lambda s, a, axes, sizes: (("mesh", MESH), ("axes", tuple(axes)),
                                    ("vocab_start", shard_start(s[0][-1], axes))),
    comms=_cross_entropy_comms)
EXPERT_PARALLEL = Variant(
    "expert_parallel", ("S(0)", "S(0)", "S(0)", "S(0)", "S(0)", "S(0)"), "S(0)", "runtime.expert_parallel_ffn",
    "expert parallelism: each (token, slot) goes to the device holding its expert by all_to_all with "
    "variable splits, and the results come back the same way (GShard, Lepikhin et al. 2020)",
    args=lambda s, a, axes, sizes: (("activation", a["activation"]), ("mesh", MESH),
                                    ("axis", axes[0]) if len(axes) == 1 else ("axes", tuple(axes)),
                                    ("num_experts", int(s[3][0]))),
    comms=_expert_parallel_comms, uneven=(3, 4, 5), spanning=True)  # the experts in torch.chunk's shares

EXPERT_PARALLEL_BIASED = Variant(
    "expert_parallel", ("S(0)",) * 8, "S(0)", "runtime.expert_parallel_ffn",
    EXPERT_PARALLEL.why + "; each expert's up (and gate) biases travel with it",
    args=EXPERT_PARALLEL.args, comms=_expert_parallel_comms, uneven=(3, 4, 5, 6, 7), spanning=True)


# Value-table placements (number-wise: rows split; dimension-wise is the einsum split of the value
# dim ``d`` that gather_rows' and gather_weighted_sum's dims already give). The UltraMem paper
# (Huang et al. 2025, sec. 4.7 "training partition") names both partitions; passes/placement.py
# prices and reports them.
ROWS_OWNED = Variant(
    "rows_owned", ("S(0)", "B"), "P", "ops.gather_rows_owned",
    "number-wise table: each device holds a block of rows and looks up every token's ids, writing zeros "
    "for rows it does not hold, so the devices' outputs sum to the lookup; the ids are all-gathered "
    "before and the partial outputs reduced after by ordinary boxing (as Megatron-LM's vocabulary-parallel "
    "embedding; UltraMem's number-wise partition, Huang et al. 2025)",
    args=lambda s, a, axes, sizes: (("row_start", chunk_start(s[0][0], axes, sizes)),), uneven=(0,))
BAG_ROWS_OWNED = dataclasses.replace(
    ROWS_OWNED, inputs=("S(0)", "B", "B"), call="ops.gather_weighted_sum_owned",
    why=ROWS_OWNED.why + "; the fused bag pools the rows it holds, weighted, and the partial bags are summed")
DOT_ROWS_OWNED = dataclasses.replace(
    ROWS_OWNED, inputs=("S(0)", "B", "B"), call="ops.gather_row_dot_owned",
    why=ROWS_OWNED.why + "; each pick's dot with its token's hidden is taken where its row lives, 0 elsewhere")


def _routed_comms(ins: list[Shape], dtypes: list[str], attrs: dict, n: sympy.Expr, train: bool) -> list[InternalComm]:
    """table_parallel.routed_gather_rows: per axis the routing counts, each pick's id to the row's owner,
    the row back; the backward sends the rows' gradients to the owners. What a device receives depends
    on the ids; its mean over devices is what each sends, which the plan predicts."""
    picks = numel(ins[1])
    rows = picks * ins[0][1] * BYTES[dtypes[0]]
    out = [InternalComm("forward", "all_to_all", "routing counts", n * 8, dtype="int64"),
           InternalComm("forward", "all_to_all", "row ids to their owners", picks * 8, dtype="int64"),
           InternalComm("forward", "all_to_all", "rows back", rows, data_dependent=True, dtype=dtypes[0])]
    if train:
        out.append(InternalComm("backward", "all_to_all", "row gradients to their owners", rows, dtype=dtypes[0]))
    return out


ROWS_ROUTED = Variant(
    "rows_routed", ("S(0)", "S(0)"), "S(0)", "table_parallel.routed_gather_rows",
    "number-wise table, routed: each device holds a block of rows; every (token, pick) id goes to the "
    "device owning its row by all_to_all with variable splits and the row comes back the same way "
    "(UltraMem's number-wise partition, Huang et al. 2025; GShard's dispatch)",
    args=lambda s, a, axes, sizes: (("mesh", MESH), ("axes", tuple(axes)), ("num_rows", int(s[0][0]))),
    comms=_routed_comms, uneven=(0,))
BAG_ROWS_ROUTED = dataclasses.replace(
    ROWS_ROUTED, inputs=("S(0)", "S(0)", "S(0)"), call="table_parallel.routed_gather_weighted_sum",
    why=ROWS_ROUTED.why + "; the weights stay with their tokens, which pool the rows that came back")


# A dimension-wise table whose value dim does not divide: each device reads its columns (torch.chunk's
# share) of every picked row and writes them at their place in a zero row of the whole width, so the
# devices' outputs sum to the lookup (as rows_owned does for rows); the partial output is then reduced by
# ordinary boxing. Offered only where the columns do not divide (the einsum split of ``d`` is the even form:
# an activation split on the value dim, which only an even split may be).
COLS_OWNED = Variant(
    "cols_owned", ("S(1)", "B"), "P", "table_parallel.gather_rows_columns",
    "dimension-wise table, value dim in torch.chunk's shares: each device reads its columns of every picked "
    "row into a zero row of the whole width, so the devices' outputs sum to the lookup (UltraMem's "
    "dimension-wise partition, Huang et al. 2025, with DTensor's uneven Shard)",
    args=lambda s, a, axes, sizes: (("col_start", chunk_start(s[0][1], axes, sizes)), ("total_cols", int(s[0][1]))),
    uneven=(0,), uneven_only=True)
BAG_COLS_OWNED = dataclasses.replace(
    COLS_OWNED, inputs=("S(1)", "B", "B"), call="table_parallel.gather_weighted_sum_columns",
    why=COLS_OWNED.why + "; the fused bag pools its columns, weighted, and the partial bags are summed")
# UltraMemV2's pre-value gate (gather_row_dot): a dot product over the value dim is a sum over its columns, so
# each device dots its columns of every picked row with the same columns of the token's hidden and the partial
# dots add up (the einsum split of ``d`` is its even form, the hidden split with the table)
DOT_COLS_OWNED = dataclasses.replace(
    COLS_OWNED, inputs=("S(1)", "B", "B"), call="table_parallel.gather_row_dot_columns",
    why=COLS_OWNED.why + "; each device dots its columns of each pick with its token's hidden's same columns, and "
    "the partial dots are summed")


# UltraMem's multi-core scoring pools chunk k of the value columns with core k's scores; a value table
# split on its columns (dimension-wise) pools its own columns, each with its chunk's core: the pooling
# lines up with the partition instead of gathering the rows' columns first
VALUE_COLUMNS = Variant(
    "value_columns", ("S(4)", "B"), "S(2)", "ops.core_pool_columns",
    "dimension-wise table: each device pools the value columns it holds, each with the weights of the core "
    "whose chunk holds the column (UltraMem's multi-core scoring), so the split value dim reaches the output",
    args=lambda s, a, axes, sizes: (("col_start", shard_start(s[0][-1], axes)), ("total_cols", int(s[0][-1]))))


# the fused poolings' shard forms (passes/fuse.py): number-wise, the picks of rows held elsewhere weigh 0
# (as BAG_ROWS_OWNED); dimension-wise, UltraMemV2's pooling of the columns a device holds (as VALUE_COLUMNS)
POOL_ROWS_OWNED = dataclasses.replace(
    ROWS_OWNED, inputs=("S(0)", "B", "B"), call="ops.gather_core_pool_owned",
    why=ROWS_OWNED.why + "; the fused pooling pools the rows it holds, weighted by their cores, and the partial "
    "outputs are summed")
IVE_ROWS_OWNED = dataclasses.replace(
    ROWS_OWNED, inputs=("S(0)", "B", "B", "B"), call="ops.gather_ive_pool_owned", why=POOL_ROWS_OWNED.why,
    args=lambda s, a, axes, sizes: (("num_blocks", a["num_blocks"]), ("row_start", chunk_start(s[0][0], axes, sizes))))
# routed: the rows come back from their owners and the fused pooling reads them where they arrived
POOL_ROWS_ROUTED = dataclasses.replace(
    ROWS_ROUTED, inputs=("S(0)", "S(0)", "S(0)"), call="table_parallel.routed_gather_core_pool",
    why=ROWS_ROUTED.why + "; the fused pooling reads each row where it arrived, never copying them into pick order")
IVE_ROWS_ROUTED = dataclasses.replace(
    ROWS_ROUTED, inputs=("S(0)",) * 4, call="table_parallel.routed_gather_ive_pool", why=POOL_ROWS_ROUTED.why,
    args=lambda s, a, axes, sizes: (("num_blocks", a["num_blocks"]), *ROWS_ROUTED.args(s, a, axes, sizes)))
POOL_COLUMNS = dataclasses.replace(
    VALUE_COLUMNS, inputs=("S(1)", "B", "B"), call="ops.gather_core_pool_columns",
    args=lambda s, a, axes, sizes: (("col_start", shard_start(s[0][-1], axes)), ("total_cols", int(s[0][-1]))))
# its uneven form: the pooled columns of this device's share in a zero row of the whole width, a partial sum
# (as COLS_OWNED), since an activation cannot be split unevenly
POOL_COLS_OWNED = dataclasses.replace(
    COLS_OWNED, inputs=("S(1)", "B", "B"), call="table_parallel.gather_core_pool_columns",
    why=COLS_OWNED.why + "; the fused pooling pools each of its columns with its core's weights, and the partial "
    "poolings are summed")

# UltraMem's IVE pooling on a dimension-wise table: each device pools its columns of every block; the E
# blocks interleave the columns in the (B, T, E * V) output, so the shards' outputs are a partial sum
IVE_COLUMNS = Variant(
    "value_columns", ("S(4)", "B", "B"), "P", "ops.ive_pool_columns",
    "dimension-wise table under implicit value expansion: each device pools the value columns it holds into "
    "each pick's virtual block, weighted by the core whose chunk holds the column, and writes zeros for the "
    "other columns (the blocks interleave them), so the devices' outputs sum to the pooling",
    args=lambda s, a, axes, sizes: (("num_blocks", a["num_blocks"]), ("col_start", shard_start(s[0][-1], axes)),
                                    ("total_cols", int(s[0][-1]))))
# fused, the table is the input, so its columns may be torch.chunk's shares (the output is a partial sum either way)
IVE_POOL_COLUMNS = dataclasses.replace(
    IVE_COLUMNS, inputs=("S(1)", "B", "B", "B"), call="ops.gather_ive_pool_columns",
    args=lambda s, a, axes, sizes: (("num_blocks", a["num_blocks"]),
                                    ("col_start", chunk_start(s[0][-1], axes, sizes)), ("total_cols", int(s[0][-1]))),
    uneven=(0,))


# The unfused poolings are weighted sums of the gathered rows (by core, and for IVE into blocks), so linear in
# the rows: rows that are a partial sum over the devices (an uneven column lookup's zero-padded shares, COLS_OWNED;
# or a number-wise ROWS_OWNED lookup's) pool to a partial sum, reduced after the pooling, V or E * V per token
# instead of the H * M * V gathered rows. Not ``linear="each"``: the weights are linear too but IVE's block ids
# are not (a zero block id is block 0), so only the rows may be P.
POOL_PARTIAL_ROWS = Variant(
    "partial_rows", ("P", "B"), "P", "ops.core_pool",
    "rows a partial sum over the devices (a column or row shard's lookup, zeros elsewhere): the pooling is linear "
    "in the rows, so each device pools what it holds and the pooled outputs are summed (the reduction moves the "
    "pooled width, not the gathered rows)",
    args=lambda s, a, axes, sizes: ())
IVE_PARTIAL_ROWS = dataclasses.replace(
    POOL_PARTIAL_ROWS, inputs=("P", "B", "B"), call="ops.ive_pool",
    args=lambda s, a, axes, sizes: (("num_blocks", a["num_blocks"]),))


def _prod(sizes: list[int]) -> int:
    out = 1
    for n in sizes:
        out *= n
    return out


KV_REPLICATED = Variant(
    "kv_replicated", ("S(2)", "B", "B"), "S(2)", "ops.attention_kv_shard",
    "query heads split, key/value heads replicated because there are fewer of them than devices (MQA, "
    "small-group GQA): each device reads the kv head its query heads use (Megatron-LM's GQA tensor "
    "parallelism replicates kv heads the same way)",
    args=lambda s, a, axes, sizes: (("num_heads", a["num_heads"] // _prod(sizes)), ("total_heads", a["num_heads"]),
                                    ("num_kv_heads", a["num_kv_heads"]), ("head_dim", a["head_dim"]),
                                    ("q_head_start", shard_start(a["num_heads"], axes))),
    applies=lambda a, n: a["num_heads"] % n == 0 and a["num_kv_heads"] % n != 0 and n % a["num_kv_heads"] == 0)


# the fused attention's shard form: as KV_REPLICATED, through scaled_dot_product_attention
KV_REPLICATED_SDPA = dataclasses.replace(KV_REPLICATED, call="ops.sdpa_attention_kv_shard")
