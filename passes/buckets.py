"""Gradient buckets: which parameters' gradients travel together, in what order, in how large a buffer.

Data parallelism needs every gradient a device holds as a partial sum (``P``) on an axis summed
over that axis. One collective per parameter after the backward pays one latency per parameter
and leaves the network idle while the backward computes; torch's DistributedDataParallel
instead packs gradients into flat buckets and launches each bucket's all-reduce as soon as its
last gradient is ready, while the backward carries on (Li et al., "PyTorch Distributed:
Experiences on Accelerating Data Parallel Training", VLDB 2020, sections 3.2.2-3.2.3). This pass makes
the same decision, for the plan to state and the program to spell:

- Gradients share a bucket only when they need the same collectives (kind, mesh axis, SBP
  change, in the same order) and have the same dtype: one flat buffer, one call per step.
- Parameters are taken in the order the forward first uses them, and a bucket is closed once its
  bytes reach the cap, as torch's ``compute_bucket_assignment_by_size``
  (torch/csrc/distributed/c10d/reducer.cpp) does: the cap of the first bucket is small (1 MiB,
  ``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES``) and of every later one 25 MiB
  (``_DEFAULT_BUCKET_CAP_MB`` in torch/nn/parallel/distributed.py); a bucket may exceed its cap
  by its last parameter. The first bucket holds the parameters the forward uses first, whose
  gradients the backward makes last, so little traffic is left once the backward ends. A cap
  given by hand (``bucket_cap_bytes``) applies to every bucket, as DDP's ``bucket_cap_mb`` does.
- Buckets are launched in reverse of that order (distributed.py reverses the bucket list: "to
  approximate the order in which their gradients are produced"), and always in that order, so
  every rank issues the same collectives in the same order (the paper's section 3.2.3: no rank may
  launch bucket i+1 before bucket i).

The cost is one collective per bucket and step instead of one per parameter: the latency term of
gradient synchronisation counts buckets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sympy

from .sbp import Boxing, box, parse_sbp
from .symbols import axis_size

MIB = 1024 * 1024
DEFAULT_BUCKET_CAP_BYTES = 25 * MIB  # torch/nn/parallel/distributed.py, _DEFAULT_BUCKET_CAP_MB
DEFAULT_FIRST_BUCKET_CAP_BYTES = MIB  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES


@dataclass(frozen=True)
class GradEntry:
    """One parameter's gradient as the bucketing sees it."""

    name: str  # canonical parameter name
    node: str  # its graph node
    steps: tuple[Boxing, ...]  # the collectives its gradient needs, in order (all_reduce per P axis)
    dtype: str
    first_use: int  # position of its first consumer in the forward graph


@dataclass(frozen=True)
class Bucket:
    """Gradients sent as one flat buffer, one collective per step (``steps`` sized by the sum)."""

    entries: tuple[GradEntry, ...]  # in the order their gradients are expected to be ready
    steps: tuple[Boxing, ...]
    dtype: str
    cap_bytes: int


def _key(entry: GradEntry) -> tuple:
    return tuple((b.collective, b.axis, b.src, b.dst) for b in entry.steps), entry.dtype


def _merged_steps(entries: Sequence[GradEntry]) -> tuple[Boxing, ...]:
    """The bucket's collectives: each step of its members' (identical) sequence, on their summed bytes."""
    out = []
    for i, step in enumerate(entries[0].steps):
        if step.collective != "all_reduce":
            raise ValueError(f"a gradient bucket reduces by all_reduce; {entries[0].name} needs {step.collective}")
        nbytes = sympy.Add(*(e.steps[i].payload for e in entries))
        out.append(box(parse_sbp(step.src), parse_sbp(step.dst), axis=step.axis, nbytes=nbytes, n=axis_size(step.axis)))
    return tuple(out)


def assign_buckets(entries: Sequence[GradEntry], size_of: Callable[[sympy.Expr], float],
                   cap_bytes: int | None = None) -> list[Bucket]:
    """Buckets in launch order. ``size_of`` evaluates a payload at the plan's point; ``cap_bytes``
    None means DDP's defaults (a 1 MiB first bucket, then 25 MiB), a number that cap for all."""
    caps = [DEFAULT_FIRST_BUCKET_CAP_BYTES, DEFAULT_BUCKET_CAP_BYTES] if cap_bytes is None else [int(cap_bytes)]
    order = sorted((e for e in entries if e.steps), key=lambda e: e.first_use)
    open_: dict[tuple, list[GradEntry]] = {}
    filled: dict[tuple, float] = {}
    cap_index: dict[tuple, int] = {}
    closed: list[tuple[list[GradEntry], int]] = []
    for entry in order:
        key = _key(entry)
        members = open_.setdefault(key, [])
        members.append(entry)
        filled[key] = filled.get(key, 0.0) + size_of(entry.steps[0].payload)
        limit = caps[cap_index.get(key, 0)]
        if filled[key] >= limit:
            closed.append((members, limit))
            open_[key], filled[key] = [], 0.0
            cap_index[key] = min(cap_index.get(key, 0) + 1, len(caps) - 1)
    closed += [(members, caps[cap_index.get(key, 0)]) for key, members in open_.items() if members]
    position = {id(e): i for i, e in enumerate(order)}
    closed.sort(key=lambda bucket: min(position[id(e)] for e in bucket[0]))  # reducer.cpp: by smallest index
    return [Bucket(tuple(reversed(members)), _merged_steps(members), members[0].dtype, limit)
            for members, limit in reversed(closed)]
