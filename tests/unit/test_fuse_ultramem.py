"""UltraMem's fused ops (passes/fuse_graph.py's tucker_topk rule, fuse_rules.py's gather+core_pool and
gather+ive_pool) against the unfused ops they replace, forward and backward in float64, on awkward
shapes (non-powers of two, top-k of 1, ties, duplicate ids within a token, rows nobody picks, empty
token sets); their shard forms against the whole; and the rewrite in the UltraMem plans."""

from __future__ import annotations

import pytest
import torch
from ultraplan.compiler import ops

from tests.conftest import MODELS
from ultraplan import api


def _stable_topk(x, k):
    """The tie rule of the fused selection, lowest index first among equals, by a naive loop."""
    rows = x.reshape(-1, x.shape[-1]).tolist()
    picks = [sorted(range(len(row)), key=lambda i, row=row: (-row[i], i))[:k] for row in rows]
    return torch.tensor(picks, dtype=torch.int64).view(*x.shape[:-1], k)


def _unfused_selection(filtered, scores, cores, half_k, k, n, topk=ops.topk_indices):
    half_best = topk(filtered, half_k)
    grid = ops.tucker_grid(ops.take_ranked(scores, half_best), cores)
    best = topk(ops.sum_cores(grid), k)
    return ops.take_cores(grid, best), ops.take(ops.grid_indices(half_best, n), best)


@pytest.mark.parametrize(("b", "t", "h", "r", "c", "n", "half_k", "k", "ties"), [
    (2, 3, 2, 3, 2, 7, 3, 5, False),  # non-powers of two
    (1, 2, 1, 1, 1, 5, 1, 1, False),  # rank 1, one core, top-k of 1
    (2, 2, 1, 2, 3, 6, 4, 4, True),  # equal scores everywhere: the lowest index first (torch.topk has no rule)
    (0, 3, 2, 2, 2, 4, 2, 3, False),  # an empty token set
])
def test_tucker_selection_equals_the_unfused_ops(b, t, h, r, c, n, half_k, k, ties):
    gen = torch.Generator().manual_seed(n * 10 + k)
    scores = torch.randn(b, t, h, 2, r, n, generator=gen, dtype=torch.float64)
    cores = torch.rand(h, c, r, r, generator=gen, dtype=torch.float64)
    if ties:
        scores, cores = torch.randint(0, 2, scores.shape, generator=gen).double(), cores.round()
    scores.requires_grad_(), cores.requires_grad_()
    filtered = ops.rank_one_scores(scores, torch.randn(2, h, r, generator=gen, dtype=torch.float64))
    want_scores, want_slots = _unfused_selection(filtered, scores, cores, half_k, k, n,
                                                 *([_stable_topk] if ties else []))
    slots = ops.tucker_topk(filtered, scores, cores, half_k, k, n)
    got_scores = ops.tucker_slot_scores(scores, cores, slots, n)
    assert slots.dtype == torch.int64 and slots.shape == (b, t, h, k) and torch.equal(slots, want_slots)
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-12, atol=1e-12)
    grad = torch.randn(want_scores.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad(want_scores, (scores, cores), grad, allow_unused=True)
    got = torch.autograd.grad(got_scores, (scores, cores), grad, allow_unused=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w if w is not None else torch.zeros_like(g), rtol=1e-11, atol=1e-11)


def _lookup(b, t, h, m, rows, v, cores, blocks, seed):
    """A table with a row nobody picks (the last), one token picking one row three times, and the
    picks' weights and virtual blocks."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, v, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, rows - 1, (b, t, h, m), generator=gen)
    if ids.numel() and m > 2:
        ids[0, 0, 0, :3] = 1
    weights = torch.randn(b, t, h, cores, m, generator=gen, dtype=torch.float64, requires_grad=True)
    return table, ids, weights, torch.randint(0, blocks, (b, t, h, m), generator=gen), gen


SHAPES = [  # (b, t, h, m, rows, value dim, cores, blocks)
    (2, 3, 2, 5, 11, 6, 2, 3),  # non-powers of two, duplicate ids, a row nobody picks
    (1, 2, 1, 1, 3, 4, 1, 1),  # top-k of 1, one core, one block
    (1, 3, 2, 4, 7, 9, 3, 4),  # more blocks than a token's picks fill: empty (token, block) bags
    (0, 4, 2, 3, 6, 4, 2, 2),  # an empty token set
]


def _check(got, want, inputs, gen):
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for g, w in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad)):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize(("b", "t", "h", "m", "rows", "v", "cores", "blocks"), SHAPES)
def test_gather_ive_pool_equals_gather_then_ive_pool(b, t, h, m, rows, v, cores, blocks):
    table, ids, weights, block_ids, gen = _lookup(b, t, h, m, rows, v, cores, blocks, rows * v)
    want = ops.ive_pool(ops.gather_rows(table, ids), weights, block_ids, blocks)
    got = ops.gather_ive_pool(table, ids, weights, block_ids, blocks)
    assert got.shape == (b, t, blocks * v)
    _check(got, want, (table, weights), gen)
    if ids.numel():
        (g_table,) = torch.autograd.grad(ops.gather_ive_pool(table, ids, weights, block_ids, blocks).sum(), table)
        assert not g_table[-1].any()  # the row nobody picks gets no gradient


@pytest.mark.parametrize(("b", "t", "h", "m", "rows", "v", "cores", "blocks"), SHAPES)
def test_gather_core_pool_equals_gather_then_core_pool(b, t, h, m, rows, v, cores, blocks):
    table, ids, weights, _, gen = _lookup(b, t, h, m, rows, v, cores, 1, rows + v)
    _check(ops.gather_core_pool(table, ids, weights), ops.core_pool(ops.gather_rows(table, ids), weights),
           (table, weights), gen)


@pytest.mark.parametrize(("v", "cores", "widths"), [(12, 3, (6, 6)), (12, 2, (3, 3, 3, 3)), (10, 5, (5, 5))])
def test_pool_shards_equal_the_whole(v, cores, widths):
    """gather_core_pool's dimension-wise shards (widths not aligned to the core chunks) concatenate
    to the whole; the number-wise shards of both poolings sum to it."""
    table, ids, weights, block_ids, _ = _lookup(2, 3, 2, 5, 11, v, cores, 3, v)
    table = table.detach()
    whole = ops.gather_core_pool(table, ids, weights)
    starts = [sum(widths[:i]) for i in range(len(widths))]
    parts = [ops.gather_core_pool_columns(table[:, s:s + w], ids, weights, s, v) for s, w in zip(starts, widths)]
    torch.testing.assert_close(torch.cat(parts, dim=-1), whole, rtol=1e-12, atol=1e-12)
    owned = sum(ops.gather_core_pool_owned(table[s:s + 4], ids, weights, s) for s in (0, 4, 8))
    torch.testing.assert_close(owned, whole, rtol=1e-12, atol=1e-12)
    ive = ops.gather_ive_pool(table, ids, weights, block_ids, 3)
    owned = sum(ops.gather_ive_pool_owned(table[s:s + 6], ids, weights, block_ids, 3, s) for s in (0, 6))
    torch.testing.assert_close(owned, ive, rtol=1e-12, atol=1e-12)
    # IVE's column shards: each block's columns interleave, so the shards' (zero-padded) outputs sum to the
    # whole, fused and unfused alike, and the unfused form's gradient is the whole's share
    rows = ops.gather_rows(table, ids).requires_grad_()
    unfused = ops.ive_pool(rows, weights, block_ids, 3)
    parts = [ops.ive_pool_columns(rows[..., s:s + w], weights, block_ids, 3, s, v) for s, w in zip(starts, widths)]
    torch.testing.assert_close(sum(parts), unfused, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(ops.gather_ive_pool_columns(table[:, s:s + w], ids, weights, block_ids, 3, s, v)
                                   for s, w in zip(starts, widths)), ive, rtol=1e-12, atol=1e-12)
    grad = torch.randn(unfused.shape, dtype=unfused.dtype)
    want = torch.autograd.grad(unfused, (rows, weights), grad)
    got = torch.autograd.grad(sum(parts), (rows, weights), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("spec", "pool"), [("ultramem-tiny", "gather+ive_pool"), ("ultramem-v2-tiny", "gather+core_pool")])
def test_ultramem_plans_fuse_the_selection_and_the_pooling(spec, pool):
    fused = api.plan(MODELS / f"{spec}.yaml", "1")
    plain = api.plan(MODELS / f"{spec}.yaml", "1", fuse=False)
    memories = sum(n.op == "tucker_grid" for n in plain.nodes)
    selections = [f for f in fused.fusions if f.rule == "tucker_topk"]
    pools = [f for f in fused.fusions if f.rule == pool]
    assert memories > 0 and len(selections) == len(pools) == memories
    names = {n.name for n in fused.nodes}
    for f in selections:
        steps = [plain.node(n) for n in f.replaced]
        assert [s.op for s in steps] == ["topk_indices", "take_ranked", "tucker_grid", "sum_cores", "topk_indices",
                                         "take_cores", "grid_indices", "take"]
        scores, slots = fused.node(f.replaced[5]), fused.node(f.replaced[7])
        assert slots.op == "tucker_topk" and scores.op == "tucker_slot_scores" and scores.args[-1] == slots.name
        assert not names & {f.replaced[i] for i in (0, 1, 2, 3, 4, 6)} and f.bytes_saved.value > 0
        assert f.extra_flops.value > 0  # the selected scores are recomputed from the rank vectors
    for f in pools:
        gather = plain.node(f.replaced[0])
        assert fused.node(f.node).op == pool.replace("+", "_").replace("gather_", "gather_") and \
            fused.node(f.node).args[:2] == gather.args
    assert fused.total("memory_activations").value < plain.total("memory_activations").value


@pytest.mark.parametrize(("mesh", "place", "call"), [
    ("2", "number", ("table_parallel.routed_gather_ive_pool", "ops.gather_ive_pool_owned")),
    ("2", "dim", ("ops.gather_ive_pool_columns",)),
    ("2x2", "number,dim", None),  # one split per axis only: kept
])
def test_a_placed_table_fuses_its_pooling_where_a_shard_form_exists(mesh, place, call):
    """--place splits UltraMem's values: number-wise (routed or owned) and dimension-wise, on one or both
    axes, the fused pooling runs its shard form; number on one axis and dim on the other has none, so the
    gather and pooling stay unfused (the selection, which reads no table, is fused either way)."""
    plan = api.plan(MODELS / "ultramem-tiny.yaml", mesh, force=[f"layers.*.ultramem.values={place}"])
    rules = [f.rule for f in plan.fusions]
    assert rules.count("tucker_topk") == 2
    pools = [n for n in plan.nodes if n.op in ("ive_pool", "gather_ive_pool")]
    assert len(pools) == 2 and rules.count("gather+ive_pool") == (0 if call is None else 2)
    if call is not None:
        assert all(n.op == "gather_ive_pool" and n.call in call for n in pools), [n.call for n in pools]


def test_key_balance_loss_keeps_the_half_picks_and_fuses_the_rest(write_spec):
    """UltraMemV2 with its key-balance loss: the loss counts each half's top-m, so those stay a node,
    and the grid, its top-m and the slots' scores fuse into tucker_grid_topk and tucker_slot_scores;
    the fused selection equals the unfused ops on those picks (float64), and the loss reads the
    rank-1 scores (its gradient) as unfused."""
    text = (MODELS / "ultramem-v2-tiny.yaml").read_text().replace("share: ring,", "key_balance_weight: 0.01, share: ring,")
    fused = api.plan(write_spec(text), "1")
    rules = [f.rule for f in fused.fusions]
    assert rules.count("tucker_grid_topk") > 0 and "tucker_topk" not in rules
    for f in (f for f in fused.fusions if f.rule == "tucker_grid_topk"):
        slots = fused.node(f.node)
        picks = fused.node(slots.args[0])
        assert slots.op == "tucker_grid_topk" and picks.op == "topk_indices" and f.bytes_saved.value > 0
        assert any(n.op == "half_key_counts" and picks.name in n.args for n in fused.nodes)
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 3, 2, 2, 2, 7, generator=gen, dtype=torch.float64)
    cores = torch.rand(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    filtered = ops.rank_one_scores(scores, torch.randn(2, 2, 2, generator=gen, dtype=torch.float64))
    half_best = ops.topk_indices(filtered, 3)
    want = ops.take(ops.grid_indices(half_best, 7),
                    ops.topk_indices(ops.sum_cores(ops.tucker_grid(ops.take_ranked(scores, half_best), cores)), 5))
    assert torch.equal(ops.tucker_grid_topk(half_best, scores, cores, 5, 7), want)
