"""backends/triton_pool.py's kernels under the Triton interpreter (TRITON_INTERPRET=1, on the CPU)
against the unfused ops (gather_rows then core_pool / ive_pool), forward and backward, on awkward
shapes, in float32 and bfloat16."""

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
    return interpreted_kernels(request, "triton_pool.py")


# bf16: the kernels accumulate in float32 and round once; the unfused ops round each product and
# partial sum to bf16 (8 bits of mantissa: 2^-8 relative), so a sum of a few terms differs by a few
# such steps: 3e-2 relative and absolute for values of order 1
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize(("b", "t", "h", "m", "rows", "v", "cores", "blocks", "dtype"), [
    (1, 2, 2, 5, 11, 6, 2, 3, torch.float32),  # non-powers of two, a row picked 3 times, a row nobody picks
    (1, 2, 1, 1, 3, 4, 1, 1, torch.float32),  # top-k of 1, one core, one block
    (1, 1, 3, 30, 7, 130, 5, 4, torch.float32),  # picks over one block, rows over one block, empty bags
    (0, 4, 2, 3, 6, 4, 2, 2, torch.float32),  # an empty token set
    (1, 2, 2, 5, 11, 6, 3, 3, torch.bfloat16),
])
def test_pool_kernel_equals_the_unfused_ops(kernels, b, t, h, m, rows, v, cores, blocks, dtype):
    gen = torch.Generator().manual_seed(rows * v + cores)
    table = torch.randn(rows, v, generator=gen).to(dtype).requires_grad_()
    ids = torch.randint(0, rows - 1, (b, t, h, m), generator=gen)
    if ids.numel() and m > 2:
        ids[0, 0, 0, :3] = 1
    weights = torch.randn(b, t, h, cores, m, generator=gen).to(dtype).requires_grad_()
    block_ids = torch.randint(0, blocks, (b, t, h, m), generator=gen)
    tol = TOLERANCE[dtype]
    grad = torch.randn(b, t, blocks * v, generator=gen).to(dtype)
    want = ops.ive_pool(ops.gather_rows(table, ids), weights, block_ids, blocks)
    got = kernels.pool_rows(table, ids, weights, block_ids, blocks, 0, v)
    cases = [(want, got, grad)]
    if blocks == 1 or dtype == torch.bfloat16:  # UltraMemV2's pooling: no blocks
        cases.append((ops.core_pool(ops.gather_rows(table, ids), weights),
                      kernels.pool_rows(table, ids, weights, None, 1, 0, v), grad[..., :v]))
    for want, got, g in cases:
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        got_grads = torch.autograd.grad(got, (table, weights), g)
        for a, w in zip(got_grads, torch.autograd.grad(want, (table, weights), g)):
            torch.testing.assert_close(a.float(), w.float(), rtol=tol, atol=tol)
            assert a.dtype == dtype
        assert not ids.numel() or not got_grads[0][-1].any()  # the row nobody picks gets no gradient


def test_pool_kernel_on_column_shards(kernels):
    """A dimension-wise shard (columns 3..8 of 12, cores of 4 columns: it straddles two) pools as the whole's columns."""
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(9, 12, generator=gen)
    ids, weights = torch.randint(0, 9, (1, 2, 2, 4), generator=gen), torch.randn(1, 2, 2, 3, 4, generator=gen)
    shard = table[:, 3:9].clone().requires_grad_()
    got = kernels.pool_rows(shard, ids, weights.requires_grad_(), None, 1, 3, 12)
    want = ops.gather_core_pool_columns(shard, ids, weights, 3, 12)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, ops.gather_core_pool(table, ids, weights)[..., 3:9], rtol=1e-5, atol=1e-5)
    g = torch.randn(got.shape, generator=gen)
    for a, w in zip(torch.autograd.grad(got, (shard, weights), g), torch.autograd.grad(want, (shard, weights), g)):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)


def test_ive_forward_reads_each_blocks_picks_in_runs(kernels):
    """The forward reads each block's picks as one run of the picks ordered by block (_block_order):
    a token whose picks all but one fall in one block (a run longer than the pick block: several
    iterations) and blocks nobody picks (empty runs: zeros) pool as the unfused ops do."""
    gen = torch.Generator().manual_seed(5)
    h, m, blocks, v = 2, 45, 4, 8
    table = torch.randn(13, v, generator=gen)
    ids = torch.randint(0, 13, (1, 2, h, m), generator=gen)
    weights = torch.randn(1, 2, h, 2, m, generator=gen)
    block_ids = torch.zeros(1, 2, h, m, dtype=torch.int64)
    block_ids[0, 0, 1, 7] = 3  # token 0: 89 picks in block 0, one in block 3, none in 1 and 2
    block_ids[0, 1] = torch.randint(0, blocks, (h, m), generator=gen)
    order, bounds, block_n = kernels._block_order(block_ids.reshape(2, h * m), blocks)
    assert bounds[0].tolist() == [0, 89, 89, 89, 90] and block_n == 32 and order[0, -1] == m + 7
    got = kernels.pool_rows(table, ids, weights, block_ids, blocks, 0, v)
    want = ops.ive_pool(ops.gather_rows(table, ids), weights, block_ids, blocks)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not got[0, 0, v:3 * v].any()
