"""seeded.init_shard makes any slice of init_full alone, with at most the slice plus one block alive."""

from __future__ import annotations

import pytest
import torch
from ultraplan.compiler import seeded

KINDS = ("normal", "uniform", "ones", "zeros", "constant")


def slices(ranges):
    return tuple(slice(a, b) for a, b in ranges)


def rows_of(shape):
    return seeded.block_rows(shape)


# (shape, ranges): inside one block, across blocks, the last partial block, column ranges, 1-D, 0-dim, empty
CASES = [
    ((300, 500), ((0, 300), (0, 500))),  # whole; 131 rows a block, so 3 blocks, the last partial
    ((300, 500), ((10, 20), (0, 500))),  # inside block 0
    ((300, 500), ((100, 200), (0, 500))),  # across blocks 0 and 1
    ((300, 500), ((262, 300), (0, 500))),  # the last, partial block only
    ((300, 500), ((0, 300), (250, 500))),  # a column range over every block
    ((300, 500), ((130, 132), (3, 4))),  # one column at a block boundary
    ((8, 64), ((4, 8), (0, 32))),  # a small tensor: one block
    ((200_000,), ((0, 200_000),)),  # 1-D over four blocks
    ((200_000,), ((65_530, 65_540),)),  # 1-D across a boundary
    ((200_000,), ((150_000, 200_000),)),
    ((7,), ((2, 5),)),
    ((), ()),  # 0-dim
    ((4, 6, 70_000), ((1, 3), (2, 4), (0, 70_000))),  # a row bigger than a block: one row a block
    ((4, 6, 70_000), ((0, 4), (5, 6), (69_990, 70_000))),
    ((5, 3), ((2, 2), (0, 3))),  # empty
    ((0, 3), ((0, 0), (0, 3))),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,ranges", CASES)
def test_shard_equals_full_sliced(shape, ranges, kind):
    full = seeded.init_full("layers.0.w", shape, kind, 0.02, 7)
    assert full.shape == torch.Size(shape) and full.dtype == torch.float32
    shard = seeded.init_shard("layers.0.w", shape, kind, 0.02, 7, ranges)
    assert torch.equal(shard, full[slices(ranges)])


def test_permutation_is_whole_and_sliceable():
    full = seeded.init_full("buf", (100,), "permutation", 0.0, 3)
    assert full.dtype == torch.int64 and torch.equal(full.sort().values, torch.arange(100))
    assert torch.equal(seeded.init_shard("buf", (100,), "permutation", 0.0, 3, ((20, 60),)), full[20:60])


def test_draws_have_the_asked_distribution():
    w = seeded.init_full("w", (512, 512), "normal", 0.02, 0)
    assert abs(w.std().item() - 0.02) < 2e-4 and abs(w.mean().item()) < 2e-4
    u = seeded.init_full("u", (512, 512), "uniform", 0.5, 0)
    assert 0 <= u.min().item() and u.max().item() < 0.5 and abs(u.mean().item() - 0.25) < 2e-3
    assert torch.equal(seeded.init_full("c", (3, 2), "constant", 1.5, 0), torch.full((3, 2), 1.5))


def test_blocks_are_not_copies_of_each_other():
    w = seeded.init_full("w", (200_000,), "normal", 1.0, 0)
    first, second = w[:65536], w[65536:131072]
    assert not torch.equal(first, second)
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1].item()) < 0.02


def test_deterministic_and_keyed_by_name_and_seed():
    a = seeded.init_full("a", (64, 32), "normal", 1.0, 0)
    assert torch.equal(a, seeded.init_full("a", (64, 32), "normal", 1.0, 0))
    assert not torch.equal(a, seeded.init_full("b", (64, 32), "normal", 1.0, 0))
    assert not torch.equal(a, seeded.init_full("a", (64, 32), "normal", 1.0, 1))
    # the value depends on the shape, never on how a caller splits it
    assert torch.equal(seeded.init_shard("a", (64, 32), "normal", 1.0, 0, ((0, 32), (0, 32))), a[:32])


def test_peak_is_the_shard_plus_one_block():
    shape = (4096, 1024)  # 64 rows a block: 256 kB blocks, 16 MB in all
    stats = {}
    shard = seeded.init_shard("w", shape, "normal", 0.02, 0, ((1000, 1100), (0, 512)), stats=stats)
    block_bytes = rows_of(shape) * shape[1] * 4
    assert rows_of(shape) == 64
    assert stats["peak_bytes"] == shard.numel() * 4 + block_bytes
    stats = {}
    seeded.init_shard("w", shape, "ones", 0.0, 0, ((0, 10), (0, 1024)), stats=stats)
    assert stats["peak_bytes"] == 10 * 1024 * 4


@pytest.mark.parametrize("shape", [(), (1,), (3,), (1, 1), (2, 3, 4)])
def test_small_shapes(shape):
    full = seeded.init_full("s", shape, "normal", 1.0, 0)
    assert full.shape == torch.Size(shape)
    ranges = tuple((0, s) for s in shape)
    assert torch.equal(seeded.init_shard("s", shape, "normal", 1.0, 0, ranges), full)


def test_bad_arguments():
    with pytest.raises(ValueError, match="outside"):
        seeded.init_shard("w", (4, 4), "normal", 1.0, 0, ((0, 5), (0, 4)))
    with pytest.raises(ValueError, match="ranges"):
        seeded.init_shard("w", (4, 4), "normal", 1.0, 0, ((0, 4),))
    with pytest.raises(ValueError, match="unknown init kind"):
        seeded.init_full("w", (4,), "xavier", 1.0, 0)
