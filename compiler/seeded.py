"""Deterministic initialisation and the synthetic training task, keyed by name and step.

This file must import nothing but torch and the standard library: it is copied verbatim next to
every emitted program (as ``seeded.py``). A parameter's initial value depends only on
(seed, canonical name, rule), and a batch only on (seed, step), never on the rank count, so
1, 2 or 4 ranks start from the same model and see the same global batch as the eager reference.
``init_shard`` makes any slice of that value alone (block-seeded draws), so a rank builds only
its own shard of a parameter and never the whole.
"""

import hashlib

import torch


def stable_seed(seed: int, key: str) -> int:
    """A 63-bit generator seed from (seed, key), stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# Elements per generator block. Each block of consecutive dim-0 rows is drawn from its own
# generator, so any shard can be made alone: a rank draws only the blocks its rows touch, one at
# a time, and never holds more than its shard plus one block. The size is a constant so that a
# block's extent depends only on the tensor's shape (never on the rank count or the shard asked
# for), which is what makes every shard a slice of the same full tensor.
BLOCK_ELEMENTS = 65536

RANDOM_KINDS = ("normal", "uniform")  # drawn block by block
FILLED_KINDS = ("ones", "zeros", "constant")  # no generator


def block_rows(shape: tuple) -> int:
    """Rows of dim 0 per generator block: about BLOCK_ELEMENTS elements, at least one row."""
    row = 1
    for size in tuple(shape)[1:]:
        row *= size
    return max(1, BLOCK_ELEMENTS // max(row, 1))


def block_seed(seed: int, name: str, block: int) -> int:
    """The generator seed of block ``block`` of parameter ``name`` (NUL cannot occur in a name,
    so no (name, block) pair collides with another name's key)."""
    return stable_seed(seed, f"{name}\x00block{block}")


def _draw(kind: str, shape: tuple, std: float, generator: torch.Generator) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(shape, generator=generator).mul_(std)
    return torch.rand(shape, generator=generator).mul_(std)  # uniform: U(0, std)


def init_shard(name: str, shape: tuple, kind: str, std: float, seed: int, ranges: tuple,
               stats: dict | None = None) -> torch.Tensor:
    """Exactly ``init_full(name, shape, kind, std, seed)[slices]`` for ``ranges`` = ((start, stop), ...)
    per dim, made without the full tensor: CPU, float32 (int64 for ``permutation``).

    Random kinds draw dim 0 in blocks of ``block_rows(shape)`` rows, block i from its own generator
    seeded by ``block_seed(seed, name, i)``; only the blocks the shard's rows touch are drawn, one
    at a time, each sliced into the preallocated shard and dropped. So at most the shard plus one
    block is alive. A 0-dim tensor is one block of one element. ``permutation`` (buffers, never
    sharded) stays one whole ``randperm(shape[0])``, then sliced.

    If ``stats`` is a dict, ``stats["peak_bytes"]`` is set to the bytes this call held at most
    (the shard plus the largest block, or the whole permutation), so a caller can show the bound.
    """
    shape = tuple(int(s) for s in shape)
    ranges = tuple((int(a), int(b)) for a, b in ranges)
    if len(ranges) != len(shape):
        raise ValueError(f"{name}: {len(ranges)} ranges for a {len(shape)}-dim shape {shape}")
    for dim, ((start, stop), size) in enumerate(zip(ranges, shape)):
        if not 0 <= start <= stop <= size:
            raise ValueError(f"{name}: range {start}:{stop} of dim {dim} is outside its size {size}")
    out_shape = tuple(stop - start for start, stop in ranges)
    peak = 0
    if kind in FILLED_KINDS:
        value = {"ones": 1.0, "zeros": 0.0}.get(kind, float(std))  # constant: every element equals std
        out = torch.full(out_shape, value)
    elif kind == "permutation":  # a fixed random permutation of range(shape[0]), int64
        generator = torch.Generator().manual_seed(stable_seed(seed, name))
        whole = torch.randperm(shape[0], generator=generator)
        out = whole[ranges[0][0]:ranges[0][1]].clone()
        peak = whole.numel() * whole.element_size()
        del whole
    elif kind in RANDOM_KINDS:
        out = torch.empty(out_shape)
        if len(shape) == 0:  # one element, one block
            block = _draw(kind, (), std, torch.Generator().manual_seed(block_seed(seed, name, 0)))
            out.copy_(block)
            peak = block.element_size()
        elif out.numel() > 0:
            rows = block_rows(shape)
            start, stop = ranges[0]
            inner = tuple(slice(a, b) for a, b in ranges[1:])
            for index in range(start // rows, (stop - 1) // rows + 1):
                first, last = index * rows, min((index + 1) * rows, shape[0])
                generator = torch.Generator().manual_seed(block_seed(seed, name, index))
                block = _draw(kind, (last - first, *shape[1:]), std, generator)
                lo, hi = max(start, first), min(stop, last)
                out[lo - start:hi - start] = block[(slice(lo - first, hi - first), *inner)]
                peak = max(peak, block.numel() * block.element_size())
                del block
    else:
        raise ValueError(f"unknown init kind {kind!r} for {name}")
    if stats is not None:
        stats["peak_bytes"] = peak + out.numel() * out.element_size()
    return out


def init_full(name: str, shape: tuple, kind: str, std: float, seed: int) -> torch.Tensor:
    """The full (unsharded) initial value of parameter ``name``: ``init_shard`` over every index."""
    shape = tuple(int(s) for s in shape)
    return init_shard(name, shape, kind, std, seed, tuple((0, s) for s in shape))


def permutation_walk_batch(seed: int, step: int, batch: int, seq_len: int, vocab: int) -> torch.Tensor:
    """A (batch, seq_len + 1) int64 batch of the 'permutation walk' task.

    A fixed random permutation ``perm`` of the vocabulary (from ``seed``) defines the walk
    ``x[i+1] = perm[x[i]]`` from a random start token per row. Every next token is determined by
    the current one, so a model learns it quickly and the loss falls from ln(vocab) toward 0:
    a loss curve that proves training works, in a few dozen CPU steps.
    """
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(stable_seed(seed, "task/perm")))
    gen = torch.Generator().manual_seed(stable_seed(seed, f"task/batch/{step}"))
    tokens = torch.empty(batch, seq_len + 1, dtype=torch.int64)
    tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
    for i in range(seq_len):
        tokens[:, i + 1] = perm[tokens[:, i]]
    return tokens
