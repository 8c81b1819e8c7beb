"""Product-key selection fused (passes/fuse_graph.py, ops.pk_topk and ops.pk_slot_scores): the same
slots and scores as the seven unfused ops, with ties, top-k of 1, non-powers of two and an empty
token set, forward and backward in float64; and the rewrite in a PKM plan."""

from __future__ import annotations

import pytest
import torch
from ultraplan.compiler import ops

from tests.conftest import MODELS
from ultraplan import api


def _unfused(half: torch.Tensor, half_k: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    half_best = ops.topk_indices(half, half_k)
    grid = ops.grid_scores(ops.take(half, half_best))
    best = ops.topk_indices(grid, k)
    return ops.take(grid, best), ops.take(ops.grid_indices(half_best, n), best)


@pytest.mark.parametrize(("b", "t", "h", "n", "half_k", "k", "ties"), [
    (2, 3, 2, 7, 3, 5, False),  # non-powers of two
    (1, 2, 1, 5, 1, 1, False),  # top-k of 1
    (2, 4, 3, 6, 4, 4, True),  # many equal scores: the tie-breaking must be the unfused ops'
    (0, 3, 2, 4, 2, 3, False),  # an empty token set
])
def test_pk_topk_equals_the_unfused_selection(b, t, h, n, half_k, k, ties):
    gen = torch.Generator().manual_seed(n * 10 + k)
    half = torch.randn(b, t, h, 2, n, generator=gen, dtype=torch.float64)
    if ties:
        half = torch.randint(0, 3, half.shape, generator=gen).to(torch.float64)
    half.requires_grad_()
    want_scores, want_slots = _unfused(half, half_k, k, n)
    slots = ops.pk_topk(half, half_k, k, n)
    scores = ops.pk_slot_scores(half, slots, n)
    assert slots.dtype == torch.int64 and slots.shape == (b, t, h, k)
    assert torch.equal(slots, want_slots)
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=0)
    grad = torch.randn(scores.shape, generator=gen, dtype=torch.float64)
    (want,) = torch.autograd.grad(want_scores, half, grad)
    (got,) = torch.autograd.grad(scores, half, grad)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_product_key_plans_fuse_the_selection():
    """pkm-tiny (PEER's selection is the same code, components/product_keys.py's retrieve)."""
    for spec in ("pkm-tiny",):
        fused = api.plan(MODELS / f"{spec}.yaml", "1")
        plain = api.plan(MODELS / f"{spec}.yaml", "1", fuse=False)
        found = [f for f in fused.fusions if f.rule == "product_key_topk"]
        assert len(found) == sum(n.op == "grid_scores" for n in plain.nodes) > 0
        names = {n.name for n in fused.nodes}
        for f in found:
            steps = [plain.node(n) for n in f.replaced]
            assert [s.op for s in steps] == ["topk_indices", "take", "grid_scores", "grid_indices", "topk_indices",
                                             "take", "take"]
            scores, slots = (fused.node(n) for n in f.replaced[-2:])  # the outputs keep their names
            assert slots.op == "pk_topk" and scores.op == "pk_slot_scores" and scores.args == (steps[0].args[0],
                                                                                              slots.name)
            assert not names & set(f.replaced[:-2])  # the grid and the other intermediates are gone
            assert f.bytes_saved.value > 0
        assert fused.total("memory_activations").value < plain.total("memory_activations").value
        assert fused.total("forward_flops").value == plain.total("forward_flops").value
