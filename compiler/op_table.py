"""The op table: everything ultraplan knows about each op kind, as one record per op.

Every pass and emitter reads these records; no other file keeps a set of op names. A record holds

- ``fn``: the function in the op vocabulary (``ops.py``), the leaf lowering traces;
- ``shape``: the output shape as sympy in ``B`` and ``T`` from the input shapes and attributes;
- ``result``: the output dtype (``float``: the widest floating input's, float32 if none, as torch
  promotes; ``fp32``: at least float32, the losses, which compute in float32 under mixed precision;
  ``int64``; ``first``: the first input's, as ``take`` keeps what it takes);
- ``flops``: forward matrix-product FLOPs (the FlopCounterMode convention, passes/cost.py says
  more); the backward of a product costs twice its forward (``6N``: one product for the input
  gradient, one for the weight gradient), everything else is counted as free;
- ``sparse``: for ops that read only some rows of a weight, which argument and how (a ``Touch``);
- ``bytes_read``: the bytes an op reads when that is not each input once (a lookup reads the rows
  it gathers, the MoE the experts its tokens picked);
- traits: ``index`` (the result holds indices or counts, int64: no gradient flows through),
  ``data_dependent`` (which work is done depends on values: cannot run on meta tensors;
  ``shape_prop`` takes the shape rule's word);
- ``dims``: the op's dims as letters, einsum style (``"*i,oi->*o"`` for linear), from which the
  planner derives the op's SBP signatures on one mesh axis as DTensor derives einsum strategies:
  a letter kept in the output may be split (inputs and output split on it together); a letter in
  ``sums`` (summed over by the op) may be split with a partial-sum output ``P``; one in ``mean``
  (averaged, the loss) likewise, scaled by the share of the split; ``.`` is a dim that may never be
  split, ``*`` any number of leading dims that may (aligned across the tensors that have it);
  letters in ``whole`` may not be split either (a norm's feature dim, rope's positions);
- ``linear``: ``each`` (multilinear: one input ``P`` with the others ``B`` gives ``P``) or ``all``
  (a sum: every input ``P`` gives ``P``);
- ``heads``: letters that hold heads, with the attributes that count them: splitting such a letter
  over n devices needs each count divisible by n and divides them in the shard's call (``localize``);
- ``variants``: shard forms that are not einsum splits, each with its own call, arguments and the
  collectives it runs inside: vocabulary-parallel embedding and cross entropy, expert-parallel
  MoE, number-wise value tables (see ``Variant``);
- ``colour``: the fill colour of its box in plan drawings.
"""

from __future__ import annotations

import inspect
from typing import Any

import sympy

from . import ops, ops_fused
from .op_records import BYTES, OpDef, ReadRule, ShapeRule, Touch
from .op_variants import (
    BAG_COLS_OWNED,
    BAG_ROWS_OWNED,
    BAG_ROWS_ROUTED,
    COLS_OWNED,
    DOT_COLS_OWNED,
    DOT_ROWS_OWNED,
    EXPERT_PARALLEL,
    EXPERT_PARALLEL_BIASED,
    IVE_COLUMNS,
    IVE_PARTIAL_ROWS,
    IVE_POOL_COLUMNS,
    IVE_ROWS_OWNED,
    IVE_ROWS_ROUTED,
    KV_REPLICATED,
    KV_REPLICATED_SDPA,
    POOL_COLS_OWNED,
    POOL_COLUMNS,
    POOL_PARTIAL_ROWS,
    POOL_ROWS_OWNED,
    POOL_ROWS_ROUTED,
    ROWS_OWNED,
    ROWS_ROUTED,
    VALUE_COLUMNS,
    VOCAB_CROSS_ENTROPY,
    VOCAB_EMBEDDING,
)
from .shapes import Shape, numel

# ---- shape rules --------------------------------------------------------------------------------


def _same(shapes: list[Shape], attrs: dict) -> Shape:
    return shapes[0]


def _scalar(shapes: list[Shape], attrs: dict) -> Shape:
    return ()


def _drop_second_last(shapes: list[Shape], attrs: dict) -> Shape:
    """rank_one_scores (contracts the rank axis) and sum_cores (sums the cores axis)."""
    return (*shapes[0][:-2], shapes[0][-1])


def _take_along_last(shapes: list[Shape], attrs: dict) -> Shape:
    """take_ranked and take_cores: the index's batch axes, the source's second-last axis, k picks."""
    return (*shapes[1][:-1], shapes[0][-2], shapes[1][-1])


def _grid(shapes: list[Shape], attrs: dict) -> Shape:
    k = shapes[0][-1]
    return (*shapes[0][:-2], k * k)


def _tokens_by_last(shapes: list[Shape], attrs: dict) -> Shape:
    """(B, T, ..., X) -> (B, T, X): weighted_sum and core_pool pool everything between."""
    return (*shapes[0][:2], shapes[0][-1])


# ---- FLOP rules (2 per multiply-add; passes/cost.py states the convention) ------------------------


def _linear_flops(ins: list[Shape], out: Shape, attrs: dict) -> sympy.Expr:
    out_features, in_features = ins[1]
    return 2 * numel(ins[0][:-1]) * in_features * out_features


def _attention_flops(ins: list[Shape], out: Shape, attrs: dict) -> sympy.Expr:
    batch, seq = ins[0][0], ins[0][1]
    return 4 * batch * attrs["num_heads"] * seq * seq * attrs["head_dim"]


def _pk_scores_flops(ins: list[Shape], out: Shape, attrs: dict) -> sympy.Expr:
    heads, halves, num_keys, width = ins[1]
    return 2 * numel(ins[0][:-1]) * heads * halves * num_keys * width


def _expert_ffn_flops(ins: list[Shape], out: Shape, attrs: dict) -> sympy.Expr:
    _, hidden, dim = ins[3]
    matrices = 3 if attrs["activation"] == "swiglu" else 2
    return 2 * numel(ins[0][:-1]) * ins[1][-1] * hidden * dim * matrices


# UltraMem's retrieval products (ops.py, "Tucker-decomposed query-key retrieval"), as torch runs them.
def _tucker_scores_flops(ins: list[Shape], out: Shape, attrs: dict) -> sympy.Expr:
    """every key of every rank against the query: 2 * tokens * H * 2 * R * N * D_k (shared queries too)"""
    return 2 * numel(out) * ins[1][-1]


def _tucker_grid_flops(ins: list[Shape], out: Shape, attrs: dict) -> sympy.Expr:
    """row x core (2 * tokens * H * C * R * R * M), then x column (2 * tokens * H * C * M * M * R)"""
    return 2 * numel(ins[0][:3]) * ins[1][1] * ins[1][2] * ins[1][3] * ins[0][-1] + 2 * numel(out) * ins[1][2]


# ---- sparse reads -------------------------------------------------------------------------------


def _gather_rows_touch(ins: list[Shape], attrs: dict) -> tuple[tuple[int, Touch], ...]:
    rows, row_elems = ins[0]
    return ((0, Touch(numel(ins[1][2:]), int(rows), int(row_elems))),)  # ids are (B, T, ...)


def _bag_reads(ins: list[Shape], dtypes: list[str], written: sympy.Expr, attrs: dict) -> sympy.Expr:
    """gather_weighted_sum reads the ids, the weights and every row it picks (one per id);
    gather_row_dot likewise, with the hidden (B, T, D) in place of the weights."""
    return _bytes(ins[1], dtypes[1]) + _bytes(ins[2], dtypes[2]) + numel(ins[1]) * ins[0][1] * BYTES[dtypes[0]]


def _expert_touch(ins: list[Shape], attrs: dict) -> tuple[tuple[int, Touch], ...]:
    experts, hidden, dim = (int(s) for s in ins[3])
    touch = Touch(sympy.Integer(int(ins[1][-1])), experts, hidden * dim)
    # the gelu form passes w_up twice (as w_gate too); accounting counts a parameter once per op
    return ((3, touch), (4, touch), (5, touch))


def _biased_expert_touch(ins: list[Shape], attrs: dict) -> tuple[tuple[int, Touch], ...]:
    """The weights' reads, and each picked expert's up (and gate) bias rows."""
    experts, hidden = (int(s) for s in ins[6])
    touch = Touch(sympy.Integer(int(ins[1][-1])), experts, hidden)
    return (*_expert_touch(ins, attrs), (6, touch), (7, touch))


def _expert_bias_touch(ins: list[Shape], attrs: dict) -> tuple[tuple[int, Touch], ...]:
    experts, dim = (int(s) for s in ins[2])
    return ((2, Touch(sympy.Integer(int(ins[0][-1])), experts, dim)),)



def _bytes(shape: Shape, dtype: str) -> sympy.Expr:
    return numel(shape) * BYTES[dtype]


def expected_distinct(rows: int, per_token: sympy.Expr, draws: sympy.Expr) -> sympy.Expr:
    """Expected distinct rows of ``rows`` that ``draws`` tokens read, each ``per_token`` distinct rows
    chosen uniformly: R (1 - (1 - r/R)^draws). Used for experts (tokens of a batch) and value rows
    (decode batch); tests/unit/test_accounting.py checks it against sampling."""
    return rows * (1 - (1 - sympy.Rational(1, rows) * per_token) ** draws)


def _ids_and_rows(ids_arg: int) -> ReadRule:
    """A lookup reads its ids and the rows it gathers (as many bytes as it writes), not the table."""
    return lambda ins, dtypes, written, attrs: _bytes(ins[ids_arg], dtypes[ids_arg]) + written


def _biased_expert_reads(ins: list[Shape], dtypes: list[str], written: sympy.Expr, attrs: dict) -> sympy.Expr:
    """``_expert_reads`` plus the picked experts' up (and gate) bias rows."""
    experts, hidden = (int(s) for s in ins[6])
    vectors = 2 if attrs["activation"] == "swiglu" else 1
    picked = expected_distinct(experts, sympy.Integer(int(ins[1][-1])), numel(ins[0][:-1]))
    return _expert_reads(ins, dtypes, written, attrs) + picked * vectors * hidden * 4


def _expert_bias_reads(ins: list[Shape], dtypes: list[str], written: sympy.Expr, attrs: dict) -> sympy.Expr:
    experts, dim = (int(s) for s in ins[2])
    picked = expected_distinct(experts, sympy.Integer(int(ins[0][-1])), numel(ins[0][:-1]))
    return _bytes(ins[0], dtypes[0]) + _bytes(ins[1], dtypes[1]) + picked * dim * 4


def _expert_reads(ins: list[Shape], dtypes: list[str], written: sympy.Expr, attrs: dict) -> sympy.Expr:
    """Tokens, routes and gates, and the experts any token of the batch picked: E (1 - (1 - k/E)^tokens)
    of them in expectation under uniform routing."""
    experts, hidden, dim = (int(s) for s in ins[3])
    matrices = 3 if attrs["activation"] == "swiglu" else 2
    picked = expected_distinct(experts, sympy.Integer(int(ins[1][-1])), numel(ins[0][:-1]))
    return sum((_bytes(s, d) for s, d in zip(ins[:3], dtypes[:3])), sympy.Integer(0)) + picked * matrices * hidden * dim * 4


def _ive_reads(ins: list[Shape], dtypes: list[str], written: sympy.Expr, attrs: dict) -> sympy.Expr:
    """gather_ive_pool reads what gather_core_pool does (``_bag_reads``) and each pick's block id."""
    return _bag_reads(ins, dtypes, written, attrs) + _bytes(ins[3], dtypes[3])


def _tucker_topk_flops(ins: list[Shape], out: Shape, attrs: dict) -> sympy.Expr:
    """tucker_grid's products over the half_k x half_k grid (``_tucker_grid_flops``), inside the selection"""
    tokens_heads, (_, cores, rank, _), m = numel(ins[1][:3]), ins[2], attrs["half_k"]
    return 2 * tokens_heads * cores * rank * rank * m + 2 * tokens_heads * cores * m * m * rank


def _tucker_grid_topk_flops(ins: list[Shape], out: Shape, attrs: dict) -> sympy.Expr:
    """``_tucker_topk_flops`` with half_k the given picks' last dim."""
    return _tucker_topk_flops(ins, out, {**attrs, "half_k": ins[0][-1]})


def _def(name: str, shape: ShapeRule, **kw: Any) -> OpDef:
    return OpDef(name, getattr(ops, name), shape, **kw)


MATMUL = "#cfe2f3"
NORM = "#fff2cc"
ELEMENTWISE = "#fce5cd"
RETRIEVAL = "#d0e0e3"
INDEXING = "#eeeeee"

OP_TABLE: dict[str, OpDef] = {d.name: d for d in (
    _def("embedding", lambda s, a: (*s[0], s[1][1]), dims="bt,vd->btd", variants=(VOCAB_EMBEDDING,),
         bytes_read=_ids_and_rows(0), colour="#d9ead3"),
    _def("rms_norm", _same, dims="*d,d->*d", whole="d", colour=NORM),
    _def("layer_norm", _same, dims="*d,d,d->*d", whole="d", colour=NORM),
    _def("linear", lambda s, a: (*s[0][:-1], s[1][0]), flops=_linear_flops, dims="*i,oi->*o", sums="i",
         linear="each", colour=MATMUL),
    _def("bias_add", _same, dims="*o,o->*o", colour=ELEMENTWISE),
    _def("head_rms_norm", _same, dims="bth,.->bth", heads={"h": ("num_heads",)}, colour=NORM),
    _def("add_positions", _same, dims="btd,.d->btd", whole="t", colour="#d9ead3"),
    _def("rope", _same, dims="bth->bth", whole="t", heads={"h": ("num_heads",)}, colour="#ead1dc"),
    _def("causal_attention", lambda s, a: (*s[0][:-1], sympy.Integer(a["num_heads"] * a["head_dim"])),
         flops=_attention_flops, dims="bth,bth,bth->bth", whole="t", heads={"h": ("num_heads", "num_kv_heads")},
         variants=(KV_REPLICATED,), colour="#f4cccc"),
    # fused ops (passes/fuse.py puts them in place of the subgraphs they compute)
    _def("sdpa_attention", lambda s, a: (*s[0][:-1], sympy.Integer(a["num_heads"] * a["head_dim"])),
         flops=_attention_flops, dims="bth,bth,bth->bth", whole="t", heads={"h": ("num_heads", "num_kv_heads")},
         variants=(KV_REPLICATED_SDPA,), colour="#f4cccc"),
    _def("gather_weighted_sum", lambda s, a: (*s[1][:2], s[0][1]), flops=lambda i, o, a: 2 * numel(i[1]) * i[0][1],
         sparse=_gather_rows_touch, bytes_read=_bag_reads, dims=".d,bt..,bt..->btd",
         variants=(BAG_ROWS_OWNED, BAG_ROWS_ROUTED, BAG_COLS_OWNED),
         colour=RETRIEVAL),
    _def("swiglu", _same, dims="*,*->*", colour=ELEMENTWISE),
    _def("gather_row_dot", lambda s, a: s[1], flops=lambda i, o, a: 2 * numel(i[1]) * i[0][1],
         sparse=_gather_rows_touch, bytes_read=_bag_reads, dims=".d,bt..,btd->bt..", sums="d",
         variants=(DOT_ROWS_OWNED, DOT_COLS_OWNED), colour=RETRIEVAL),
    # the residual add and the norm of its result, stacked (B, T, 2, D); pair_part reads one (a view)
    _def("add_rms_norm", lambda s, a: (*s[0][:-1], sympy.Integer(2), s[0][-1]), dims="btd,btd,d->bt.d", whole="d",
         colour=NORM),
    _def("pair_part", lambda s, a: (*s[0][:-2], s[0][-1]), result="first", bytes_read=lambda i, d, w, a: sympy.Integer(0),
         dims="bt.d->btd", colour=INDEXING),
    _def("gelu", _same, dims="*->*", colour=ELEMENTWISE),
    _def("add", _same, dims="*,*->*", linear="all", colour="#eeeeee"),
    _def("cross_entropy", _scalar, result="fp32", dims="btv,bt->", mean="bt", variants=(VOCAB_CROSS_ENTROPY,),
         colour="#d9d2e9"),
    # sparse retrieval: product keys, experts
    _def("pk_scores", lambda s, a: (*s[0][:-1], s[1][0], s[1][1], s[1][2]), flops=_pk_scores_flops,
         dims="bt.,....->bt...", colour=RETRIEVAL),
    _def("group_layer_norm", _same, dims="*.,.,.->*.", colour=NORM),
    _def("group_rms_norm", _same, dims="*.,.->*.", colour=NORM),
    _def("group_rms_norm_biased", _same, dims="*.,.,.->*.", colour=NORM),
    _def("group_layer_norm_unbiased", _same, dims="*.,.->*.", colour=NORM),
    _def("leading_features", lambda s, a: (*s[0][:-1], sympy.Integer(a["width"])), dims="*.->*.", colour=INDEXING),
    _def("topk_indices", lambda s, a: (*s[0][:-1], sympy.Integer(a["k"])), index=True, dims="*.->*.",
         colour=INDEXING),
    _def("take", lambda s, a: s[1], result="first", dims="*.,*.->*.", colour=INDEXING),
    _def("grid_scores", _grid, dims="*..->*.", colour=RETRIEVAL),
    _def("grid_indices", _grid, index=True, dims="*..->*.", colour=INDEXING),
    # product-key selection fused (passes/fuse_graph.py): the slots, then their scores from the half scores
    _def("pk_topk", lambda s, a: (*s[0][:3], sympy.Integer(a["k"])), index=True, dims="bt...->bt..", colour=INDEXING),
    _def("pk_slot_scores", lambda s, a: s[1], result="first", dims="bt...,bt..->bt..", colour=RETRIEVAL),
    _def("softmax", _same, dims="*.->*.", colour=ELEMENTWISE),
    _def("sigmoid", _same, dims="*->*", colour=ELEMENTWISE),
    _def("normalize_sum", _same, dims="*.->*.", colour=ELEMENTWISE),
    _def("gather_rows", lambda s, a: (*s[1], s[0][1]), sparse=_gather_rows_touch, bytes_read=_ids_and_rows(1),
         dims=".d,*->*d", variants=(ROWS_OWNED, ROWS_ROUTED, COLS_OWNED),
         colour=RETRIEVAL),
    _def("weighted_sum", _tokens_by_last, flops=lambda i, o, a: 2 * numel(i[0]), dims="bthkd,bthk->btd", sums="hk",
         linear="each", colour=RETRIEVAL),
    _def("row_dot", lambda s, a: s[1][:-1], flops=lambda i, o, a: 2 * numel(i[1]), dims="btd,bthkd->bthk", sums="d",
         linear="each", colour=RETRIEVAL),
    _def("activation", _same, dims="*->*", colour=ELEMENTWISE),
    _def("mul", _same, dims="*,*->*", linear="each", colour=ELEMENTWISE),
    _def("expert_ffn", _same, flops=_expert_ffn_flops, sparse=_expert_touch, bytes_read=_expert_reads,
         data_dependent=True,
         dims="btd,btk,btk,efd,efd,edf->btd", sums="f", whole="dk", variants=(EXPERT_PARALLEL,), colour="#f9cb9c",
         loop="e"),
    _def("expert_ffn_biased", _same, flops=_expert_ffn_flops, sparse=_biased_expert_touch,
         bytes_read=_biased_expert_reads, data_dependent=True, dims="btd,btk,btk,efd,efd,edf,ef,ef->btd", sums="f",
         whole="dk", variants=(EXPERT_PARALLEL_BIASED,), colour="#f9cb9c", loop="e"),
    _def("expert_bias", lambda s, a: (*s[0][:-1], s[2][1]), sparse=_expert_bias_touch, bytes_read=_expert_bias_reads,
         dims="btk,btk,.d->btd", whole="k", linear="each", colour="#f9cb9c"),
    # Tucker-decomposed retrieval (UltraMem, UltraMemV2): token dims split, the rest whole
    _def("tucker_scores", lambda s, a: (*s[0][:-1], *s[1][:4]), flops=_tucker_scores_flops,
         dims="bt.,.....->bt....", colour=RETRIEVAL),
    _def("rank_one_scores", _drop_second_last, flops=lambda i, o, a: 2 * numel(o) * i[0][-2],
         dims="bt....,...->bt...", colour=RETRIEVAL),
    _def("take_ranked", _take_along_last, dims="bt....,bt...->bt....", colour=INDEXING),
    _def("tucker_grid", lambda s, a: (*s[0][:3], s[1][1], s[0][-1] * s[0][-1]), flops=_tucker_grid_flops,
         dims="bt....,....->bt...", colour=RETRIEVAL),
    _def("sum_cores", _drop_second_last, dims="bt...->bt..", colour=RETRIEVAL),
    _def("take_cores", _take_along_last, dims="bt...,bt..->bt...", colour=INDEXING),
    _def("shuffle_rows", _same, index=True, dims="*,.->*", colour=INDEXING),
    _def("expanded_rows", _same, index=True, dims="*,.->*", colour=INDEXING),
    _def("scale_cores", _same, dims="bt...,bt..->bt...", colour=RETRIEVAL),
    _def("core_pool", _tokens_by_last, flops=lambda i, o, a: 2 * numel(i[0]), dims="bt...,bt...->bt.",
         variants=(VALUE_COLUMNS, POOL_PARTIAL_ROWS),
         colour=RETRIEVAL),
    _def("block_of", _same, index=True, dims="*->*", colour=INDEXING),
    _def("row_in_block", _same, index=True, dims="*->*", colour=INDEXING),
    _def("ive_pool", lambda s, a: (*s[0][:2], a["num_blocks"] * s[0][-1]), dims="bt...,bt...,bt..->bt.",
         variants=(IVE_COLUMNS, IVE_PARTIAL_ROWS), colour=RETRIEVAL),
    # UltraMem's fused ops (passes/fuse_graph.py, fuse.py): the selection (its grid inside), the selected
    # scores from 2 R numbers per slot (row x core: 2 tokens H C R^2 M), the poolings without the gathered rows
    _def("tucker_topk", lambda s, a: (*s[0][:3], sympy.Integer(a["k"])), flops=_tucker_topk_flops, index=True,
         dims="bt...,bt....,....->bt..", colour=INDEXING),
    _def("tucker_grid_topk", lambda s, a: (*s[0][:3], sympy.Integer(a["k"])), flops=_tucker_grid_topk_flops,
         index=True, dims="bt...,bt....,....->bt..", colour=INDEXING),
    _def("tucker_slot_scores", lambda s, a: (*s[2][:3], s[1][1], s[2][-1]), result="first",
         flops=lambda i, o, a: 2 * numel(o) * i[1][2] * i[1][3], dims="bt....,....,bt..->bt...", colour=RETRIEVAL),
    _def("gather_core_pool", lambda s, a: (*s[1][:2], s[0][1]), flops=lambda i, o, a: 2 * numel(i[1]) * i[0][1],
         sparse=_gather_rows_touch, bytes_read=_bag_reads, dims="..,bt..,bt...->bt.",
         variants=(POOL_ROWS_OWNED, POOL_ROWS_ROUTED, POOL_COLUMNS, POOL_COLS_OWNED), colour=RETRIEVAL),
    _def("gather_ive_pool", lambda s, a: (*s[1][:2], a["num_blocks"] * s[0][1]), sparse=_gather_rows_touch,
         bytes_read=_ive_reads, dims="..,bt..,bt...,bt..->bt.", variants=(IVE_ROWS_OWNED, IVE_ROWS_ROUTED, IVE_POOL_COLUMNS),
         colour=RETRIEVAL),
    # mixture-of-experts load balancing: whole-batch statistics
    _def("expert_counts", lambda s, a: (sympy.Integer(a["num_experts"]),), index=True, data_dependent=True,
         dims="btk->.", sums="btk", colour=INDEXING),
    _def("column_sums", lambda s, a: (s[0][-1],), dims="*e->e", sums="*", linear="each", colour=INDEXING),
    _def("balance_loss", _scalar, result="fp32", dims=".,.->", colour="#d9d2e9"),
    # UltraMemV2's key-balance loss: whole-batch statistics per key half
    _def("half_key_counts", lambda s, a: (s[0][-2], sympy.Integer(a["num_keys"])), index=True, data_dependent=True,
         dims="bt...->..", sums="bt", colour=INDEXING),
    _def("half_prob_sums", lambda s, a: tuple(s[0][-2:]), dims="bt...->..", sums="bt", linear="each",
         colour=INDEXING),
    _def("key_balance_loss", _scalar, result="fp32", dims="..,..->", colour="#d9d2e9"),
)}

# ops.py functions that are not graph ops: state derived from parameters between steps, the
# shard forms variants call, and the losses' float32 upcast under mixed precision
NOT_GRAPH_OPS = {"rank_one_vectors", "embedding_rows", "attention_kv_shard", "sdpa_attention_kv_shard", "_at_least_fp32",
                 "_owned", "gather_rows_owned", "gather_weighted_sum_owned", "gather_row_dot_owned",
                 "core_pool_columns", "ive_pool_columns", "_into_columns", "_bag", "_accumulator",
                 "_table_gradient", "_row_dots"}


# the fused UltraMem ops' helpers and shard forms
NOT_GRAPH_OPS |= {"_gcd", "_ranked", "stable_topk", "_pool_groups", "_pooled", "_pool", "gather_core_pool_columns",
                  "gather_core_pool_owned",
                  "gather_ive_pool_owned", "gather_ive_pool_columns"}


def op_def(name: str) -> OpDef:
    return OP_TABLE[name]


def _check_table() -> None:
    """Every function of ops.py and ops_fused.py is an op here (or a documented non-graph helper), and back."""
    functions = {n for module in (ops, ops_fused) for n, f in vars(module).items()
                 if inspect.isfunction(f) and f.__module__ == module.__name__}
    missing = functions - set(OP_TABLE) - NOT_GRAPH_OPS
    assert not missing, f"ops.py functions without an op record: {sorted(missing)}"
    assert set(OP_TABLE) <= functions, f"op records without a function: {sorted(set(OP_TABLE) - functions)}"


_check_table()
