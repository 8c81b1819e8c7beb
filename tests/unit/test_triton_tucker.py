"""backends/triton_tucker.py's kernel under the Triton interpreter (TRITON_INTERPRET=1, on the CPU)
against ops.tucker_topk's torch fallback (the same tie rule: lowest index first) and, where no
candidates tie, the unfused ops (topk, take_ranked, tucker_grid, sum_cores, topk, take), on awkward
shapes, in float64, float32 and bfloat16."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch
from ultraplan.compiler import ops

from tests.unit.conftest import interpreted_kernels
from tests.unit.test_fuse_ultramem import _unfused_selection

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def kernels(request):
    return interpreted_kernels(request, "triton_tucker.py")


@pytest.mark.parametrize(("b", "t", "h", "r", "c", "n", "half_k", "k", "case"), [
    (1, 1, 2, 3, 2, 7, 3, 5, "float64"),  # non-powers of two, k > half_k, two heads' cores
    (1, 2, 1, 1, 1, 5, 1, 1, "float32"),  # rank 1, one core, top-k of 1
    (1, 1, 2, 2, 3, 6, 4, 7, "ties"),  # a few integer values: equal scores in the halves and the grid
    (0, 3, 2, 2, 2, 4, 2, 3, "float32"),  # an empty token set
    (1, 1, 2, 2, 2, 9, 3, 3, "bfloat16"),
])
def test_tucker_topk_kernel_equals_the_fallback(kernels, b, t, h, r, c, n, half_k, k, case):
    gen = torch.Generator().manual_seed(n * 10 + k)
    dtype = {"ties": torch.float64}.get(case) or getattr(torch, case)
    scores = torch.randn(b, t, h, 2, r, n, generator=gen, dtype=torch.float64)
    cores = torch.rand(h, c, r, r, generator=gen, dtype=torch.float64)
    rank_one = torch.randn(2, h, r, generator=gen, dtype=torch.float64)
    if case == "ties":
        scores, cores = torch.randint(0, 2, scores.shape, generator=gen).double(), cores.round() + 1
        rank_one = torch.ones_like(rank_one)
    scores, cores = scores.to(dtype), cores.to(dtype)
    filtered = ops.rank_one_scores(scores, rank_one.to(dtype))
    slots = kernels.tucker_topk(filtered, scores, cores, half_k, k, n)
    assert slots.dtype == torch.int64 and slots.shape == (b, t, h, k)
    # the kernel ranks in float32 (float64 for float64): bf16 inputs are ranked as their float32 values
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    want = ops.tucker_topk(filtered.to(wide), scores.to(wide), cores.to(wide), half_k, k, n)
    assert torch.equal(slots, want)
    if case == "ties":  # the rule is the stable order: the selected totals descend, equal ones by position
        total = ops.tucker_slot_scores(scores, cores, slots, n).sum(-2)
        assert torch.all(total[..., :-1] >= total[..., 1:])
        assert all(len(set(row.tolist())) == k for row in slots.reshape(-1, k))
    elif b:  # no ties among random scores: the unfused ops' slots
        assert torch.equal(slots, _unfused_selection(filtered.to(wide), scores.to(wide), cores.to(wide), half_k, k, n)[1])


@pytest.mark.parametrize(("h", "n", "half_k", "k", "ties"), [(2, 7, 3, 4, False), (1, 5, 2, 1, True)])
def test_tucker_grid_topk_kernel_equals_the_fallback(kernels, h, n, half_k, k, ties):
    """The kernel given the halves' picks (UltraMemV2's key-balance loss reads them): the fallback's slots,
    equal grid totals included (integer scores: the lowest grid position first)."""
    gen = torch.Generator().manual_seed(n + k)
    scores = torch.randn(1, 2, h, 2, 2, n, generator=gen, dtype=torch.float64)
    if ties:
        scores = torch.randint(0, 2, scores.shape, generator=gen).double()
    cores = torch.rand(h, 2, 2, 2, generator=gen, dtype=torch.float64).round() + 1
    half_best = ops.topk_indices(ops.rank_one_scores(scores, torch.ones(2, h, 2, dtype=torch.float64)), half_k)
    slots = kernels.tucker_grid_topk(half_best, scores, cores, k, n)
    assert torch.equal(slots, ops.tucker_grid_topk(half_best, scores, cores, k, n))
