"""backends/triton_norm.py's kernels under the Triton interpreter (TRITON_INTERPRET=1, on the CPU)
against add then rms_norm, forward and backward, with both results read on."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch
from ultraplan.compiler import ops

from tests.unit.conftest import interpreted_kernels

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def kernels(request):
    return interpreted_kernels(request, "triton_norm.py")


@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 1, 7), (0, 3, 6)])  # odd widths, one row, no rows
def test_kernel_equals_add_then_norm(kernels, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x, y = (torch.randn(shape, generator=gen, requires_grad=True) for _ in range(2))
    weight = torch.randn(shape[-1], generator=gen, requires_grad=True)
    total = ops.add(x, y)
    want = (total, ops.rms_norm(total, weight, 1e-6))
    pair = kernels.add_rms_norm(x, y, weight, 1e-6)
    got = (ops.pair_part(pair, 0), ops.pair_part(pair, 1))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    grads = [torch.randn(shape, generator=gen) for _ in range(2)]
    for g, w in zip(torch.autograd.grad(got, (x, y, weight), grads), torch.autograd.grad(want, (x, y, weight), grads)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
