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
- Parameters are taken in the order the forward first uses them and laid end to end, per key, on
  a line of bytes, and the line is cut every ``width`` bytes (50 MiB by default;
  ``bucket_bytes`` sets another): bucket k holds the parameters whose bytes end in
  (k width, (k+1) width]. On the line a parameter counts at most half the width (25 MiB by
  default, torch's ``_DEFAULT_BUCKET_CAP_MB`` in torch/nn/parallel/distributed.py), so none is
  wider than a bucket and no bucket is empty: a key of S' such clipped bytes fills exactly
  ceil(S' / width) buckets. That count is what lets the sharding search price gradient buckets
  exactly (passes/search_lp.py: an integer column per key).
- Why not torch's own packing. ``compute_bucket_assignment_by_size``
  (torch/csrc/distributed/c10d/reducer.cpp) closes a bucket once it reaches its cap (25 MiB, the
  first 1 MiB) and starts the next from zero, so its count depends on how far each bucket
  overshoots (the order), which no linear count follows: priced by bytes, a searched plan could
  lose to a named one by up to two buckets' latency per key. With the width twice DDP's cap the
  line never needs more buckets than DDP does: every closed DDP bucket holds less than its cap
  plus its last parameter, under two caps of clipped bytes, so S' < 2 cap (DDP's closed buckets
  + 1/2), whence ceil(S' / width) is at most DDP's count. Nor fewer than about half of it. A
  parameter of more than half the width shares its bucket with at most one like it (DDP sends each
  alone): fewer, larger all-reduces, a coarser overlap with the backward.
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
DEFAULT_BUCKET_BYTES = 50 * MIB  # twice torch DDP's cap (_DEFAULT_BUCKET_CAP_MB): never more buckets than DDP


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
    cap_bytes: int  # the line's bucket width


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


def clipped(nbytes: float, width: int) -> int:
    """What a gradient of ``nbytes`` counts on its key's line of buckets ``width`` wide: at most half."""
    return min(round(nbytes), max(1, width // 2))


def bucket_index(end: int, width: int) -> int:
    """The bucket of a gradient whose clipped bytes end at ``end`` on its key's line: (k width, (k+1) width]."""
    return -(-end // width) - 1


def assign_buckets(entries: Sequence[GradEntry], size_of: Callable[[sympy.Expr], float],
                   bucket_bytes: int | None = None) -> list[Bucket]:
    """Buckets in launch order. ``size_of`` evaluates a payload at the plan's point; ``bucket_bytes``
    is the line's bucket width (None: 50 MiB)."""
    width = DEFAULT_BUCKET_BYTES if bucket_bytes is None else int(bucket_bytes)
    order = sorted((e for e in entries if e.steps), key=lambda e: e.first_use)
    line: dict[tuple, int] = {}  # each key's clipped bytes so far
    buckets: dict[tuple[tuple, int], list[GradEntry]] = {}  # in order of their first member
    for entry in order:
        key = _key(entry)
        line[key] = line.get(key, 0) + clipped(size_of(entry.steps[0].payload), width)
        buckets.setdefault((key, bucket_index(line[key], width)), []).append(entry)
    # launched in reverse of the forward order, as DDP's reducer does
    return [Bucket(tuple(reversed(members)), _merged_steps(members), members[0].dtype, width)
            for members in reversed(list(buckets.values()))]
