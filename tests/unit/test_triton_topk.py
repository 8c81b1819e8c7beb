"""backends/triton_topk.py's kernels under the Triton interpreter (TRITON_INTERPRET=1, on the CPU)
against the unfused product-key selection (topk, take, grid, topk, take), forward and backward, on
awkward shapes, in float32 and bfloat16."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch
from ultraplan.compiler import ops

from tests.unit.conftest import interpreted_kernels
from tests.unit.test_fuse_pk import _unfused

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def kernels(request):
    return interpreted_kernels(request, "triton_topk.py")


@pytest.mark.parametrize(("b", "t", "h", "n", "half_k", "k", "case"), [
    (1, 2, 2, 7, 3, 5, "float32"),  # non-powers of two, k > half_k
    (1, 2, 1, 5, 1, 1, "float32"),  # top-k of 1
    (1, 2, 2, 6, 4, 3, "ties"),  # a few values only: equal scores within halves and across the grid
    (0, 3, 2, 4, 2, 3, "float32"),  # an empty token set
    (1, 2, 2, 9, 3, 3, "bfloat16"),
])
def test_pk_kernels_equal_the_unfused_selection(kernels, b, t, h, n, half_k, k, case):
    gen = torch.Generator().manual_seed(n * 10 + k)
    half = torch.randn(b, t, h, 2, n, generator=gen)
    if case == "ties":
        half = torch.randint(0, 3, half.shape, generator=gen).float()
    half = half.to(torch.bfloat16 if case == "bfloat16" else torch.float32).requires_grad_()
    slots = kernels.pk_topk(half, half_k, k, n)
    assert slots.dtype == torch.int64 and slots.shape == (b, t, h, k)
    # the kernel ranks in float32: bf16 half scores are selected as their float32 values are
    want_scores, want_slots = _unfused(half.detach().float(), half_k, k, n)
    if case == "ties":  # any tied choice is right: the selected values (sorted) and distinct slots
        got = ops.pk_slot_scores(half.detach(), slots, n)
        assert torch.equal(got.sort(-1).values, want_scores.sort(-1).values)
        assert all(len(set(row.tolist())) == k for row in slots.reshape(-1, k))
    else:
        assert torch.equal(slots, want_slots)
    scores = kernels.pk_slot_scores(half, slots, n)
    want = ops.pk_slot_scores(half, slots, n)  # the torch form (test_fuse_pk: equal to the unfused takes)
    # bf16: one step of bf16 (2^-7 relative): the kernel adds in float32 and the interpreter rounds the
    # sum to bf16 toward zero, torch to nearest; backward sums of a few such steps
    tol = 0 if half.dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(scores, want, rtol=tol, atol=tol)
    grad = torch.randn(want.shape, generator=gen).to(half.dtype)
    (got_grad,) = torch.autograd.grad(scores, half, grad)
    (want_grad,) = torch.autograd.grad(want, half, grad)
    torch.testing.assert_close(got_grad, want_grad, rtol=max(tol * 3, 1e-6), atol=max(tol * 3, 1e-6))
