"""Deterministic initialisation and the synthetic training task, keyed by name and step.

This file must import nothing but torch and the standard library: it is copied verbatim next to
every emitted program (as ``seeded.py``). A parameter's initial value depends only on
(seed, canonical name, rule), and a batch only on (seed, step), never on the rank count, so
1, 2 or 4 ranks start from the same model and see the same global batch as the eager reference.
"""

import hashlib

import torch


def stable_seed(seed: int, key: str) -> int:
    """A 63-bit generator seed from (seed, key), stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_full(name: str, shape: tuple, kind: str, std: float, seed: int) -> torch.Tensor:
    """The full (unsharded) initial value of parameter ``name``, on the CPU, float32."""
    if kind == "ones":
        return torch.ones(shape)
    if kind == "zeros":
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed(stable_seed(seed, name))
    if kind == "normal":
        return torch.randn(shape, generator=generator) * std
    if kind == "uniform":  # U(0, std)
        return torch.rand(shape, generator=generator) * std
    if kind == "constant":  # every element equals std
        return torch.full(shape, float(std))
    if kind == "permutation":  # a fixed random permutation of range(shape[0]), int64
        return torch.randperm(shape[0], generator=generator)
    raise ValueError(f"unknown init kind {kind!r} for {name}")


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
