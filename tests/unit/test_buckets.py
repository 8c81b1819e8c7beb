"""Gradient buckets (passes/buckets.py): the plan lays each key's gradients end to end on a line of
bytes (each counting at most half a bucket) and cuts it every bucket width, and its communication
figures count the buckets it sends.

The reference for the packing is a walk along that line written here (a bucket is closed when the
next gradient would end past its boundary), given each parameter's gradient bytes in the order the
forward first uses them; its counts are ceil(S' / width) (what the search prices,
passes/search_model.py), never more than torch's own ``dist._compute_bucket_assignment_by_size``
(DistributedDataParallel's packing, torch/nn/parallel/distributed.py) makes of the same gradients
with a cap of half the width, and not fewer than about half of that.
"""

from __future__ import annotations

import math
import random

import pytest
import sympy
import torch
import torch.distributed as dist
from ultraplan.passes.buckets import DEFAULT_BUCKET_BYTES, GradEntry, assign_buckets
from ultraplan.passes.sbp import box, parse_sbp

from tests.conftest import MODELS
from ultraplan import api


def walk(sizes: list[int], width: int) -> list[list[int]]:
    """The byte line walked: indices per bucket, in forward order; a bucket closes when the next
    gradient (its bytes clipped to half the width) would end past the bucket's boundary."""
    out: list[list[int]] = [[]]
    end, boundary = 0, width
    for i, size in enumerate(sizes):
        end += min(size, width // 2)
        while end > boundary:
            out.append([])
            boundary += width
        out[-1].append(i)
    assert all(out), "an empty bucket"
    return out


def reference_buckets(plan, cap: int) -> list[list[str]]:
    """The plan's gradients packed by ``walk`` per key (the same collectives and dtype), in launch
    order: buckets by their first member in reverse, names in each in reverse use order."""
    used = {n.name: i for i, n in enumerate(plan.nodes)}
    first_use = {p.name: min(used[n.name] for n in plan.nodes if p.node in n.args) for p in plan.params}
    order = sorted((p for p in plan.params if p.grad_sync), key=lambda p: first_use[p.name])
    keys: dict[tuple, list] = {}
    for p in order:
        keys.setdefault((tuple((c.collective, c.axis, c.src, c.dst) for c in p.grad_sync), p.grad_sync[0].dtype),
                        []).append(p)
    buckets = []
    for members in keys.values():
        sizes = [round(p.grad_sync[0].payload_bytes.value) for p in members]
        buckets += [[members[i] for i in bucket] for bucket in walk(sizes, cap)]
    buckets.sort(key=lambda b: first_use[b[0].name])
    return [[p.name for p in reversed(b)] for b in reversed(buckets)]


@pytest.mark.parametrize(("spec", "mesh", "bucket_mb"), [("dense-100m", "8", None), ("dense-tiny", "4", 0.05),
                                                         ("moe-tiny", "2", 0.01), ("dense-gqa-tied", "2", 0.02),
                                                         ("dense-tiny", "2x2", 0.004)])
def test_buckets_are_the_byte_line_cut_every_cap(spec, mesh, bucket_mb):
    strategy = "dp,tp" if "x" in mesh else None  # two keys: the norms reduce over both axes, the rest over one
    plan = api.plan(MODELS / f"{spec}.yaml", mesh, bucket_mb=bucket_mb, hardware="h200-8", strategy=strategy)
    cap = DEFAULT_BUCKET_BYTES if bucket_mb is None else int(bucket_mb * 2**20)
    expected = reference_buckets(plan, cap)
    assert len(expected) > 1  # several buckets, so the order is tested too
    assert [list(b.params) for b in plan.grad_buckets] == expected
    assert all(b.cap_bytes == cap for b in plan.grad_buckets)


def entries(sizes: list[int]) -> list[GradEntry]:
    """Gradients of one key (an all-reduce on axis 0) of these many bytes, in forward order."""
    return [GradEntry(f"p{i}", f"p{i}", (box(parse_sbp("P"), parse_sbp("B"), axis=0, nbytes=sympy.Integer(n), n=2),),
                      "float32", i) for i, n in enumerate(sizes)]


def test_a_key_fills_ceil_of_its_clipped_bytes_over_the_width_and_never_more_than_ddp():
    rng = random.Random(0)
    width = 2000  # DDP's cap below: 1000
    for case in range(300):
        # gradients from a few bytes to several DDP caps (one larger than half the width counts as half)
        sizes = [4 * rng.choice([rng.randint(1, 50), rng.randint(50, 250), rng.randint(250, 1000)])
                 for _ in range(rng.randint(1, 40))]
        got = assign_buckets(entries(sizes), float, width)
        names = [[int(e.name[1:]) for e in reversed(b.entries)] for b in reversed(got)]  # forward order
        assert names == walk(sizes, width), case
        clipped = sum(min(n, width // 2) for n in sizes)
        assert len(got) == math.ceil(clipped / width), case
        ddp, _ = dist._compute_bucket_assignment_by_size([torch.empty(n // 4, device="meta") for n in sizes],
                                                        [width // 2], [False] * len(sizes))
        assert (len(ddp) - 1) / 2 <= len(got) <= len(ddp), case


def test_every_gradient_is_in_one_bucket_and_the_plan_counts_buckets():
    """dp,tp on 2x2: the replicated norms need a sum over both axes, the tp-split weights over axis 0
    only, so they are two buckets; the step's gradient collectives are the buckets' steps, their bytes
    the sum of the gradients', and the latency of gradient sync is paid per bucket."""
    plan = api.plan(MODELS / "dense-tiny.yaml", "2x2", strategy="dp,tp")
    by_name = {p.name: p for p in plan.params}
    names = [n for b in plan.grad_buckets for n in b.params]
    assert sorted(names) == sorted(p.name for p in plan.params if p.grad_sync)
    assert all(by_name[n].bucket == i for i, b in enumerate(plan.grad_buckets) for n in b.params)
    assert [[(c.collective, c.axis) for c in b.steps] for b in plan.grad_buckets] == [
        [("all_reduce", 1), ("all_reduce", 0)], [("all_reduce", 0)]]
    sync = [c for c in plan.collectives if c.phase == "gradient_sync"]
    assert sync == [c for b in plan.grad_buckets for c in b.steps]
    for b in plan.grad_buckets:
        for i, c in enumerate(b.steps):
            assert c.payload_bytes.value == sum(by_name[n].grad_sync[i].payload_bytes.value for n in b.params)
    _, calls = plan.step_collectives()
    forward_and_backward = sum(1 for c in plan.collectives if c.phase in ("forward", "backward", "loss_logging"))
    assert calls["all_reduce"] == forward_and_backward + 3


def test_latency_of_gradient_sync_counts_buckets_not_parameters():
    """dense-tiny dp on 4 devices: 21 gradients, 462 kB, one 50 MiB bucket;
    the step's latency term is one all-reduce for the bucket and one for the loss (2 (n-1) messages
    each), where one per parameter would be 22."""
    plan = api.plan(MODELS / "dense-tiny.yaml", "4")
    assert len(plan.grad_buckets) == 1 and len(plan.grad_buckets[0].params) == len(plan.params) == 21
    lat0, n0 = sympy.Symbol("lat0"), sympy.Symbol("n0")
    comm = sympy.sympify(plan.total("comm_time").expr)
    assert sympy.simplify(comm.diff(lat0) - 2 * 2 * (n0 - 1)) == 0
    split = api.plan(MODELS / "dense-tiny.yaml", "4", bucket_mb=0.05)
    sizes = [b.steps[0].payload_bytes.value for b in split.grad_buckets]
    assert sum(sizes) == plan.grad_buckets[0].steps[0].payload_bytes.value == 4 * sum(math.prod(p.shape)
                                                                                    for p in plan.params)
    assert sympy.simplify(sympy.sympify(split.total("comm_time").expr).diff(lat0)
                          - 2 * (len(sizes) + 1) * (n0 - 1)) == 0


def test_fsdp_leaves_its_reduce_scatters_to_the_backward():
    """fsdp's gradient reduce-scatter is the dual of each parameter's gather, run inside the
    backward; only gradients still P on some axis (none on a 1-D fsdp mesh) are bucketed."""
    plan = api.plan(MODELS / "dense-tiny.yaml", "4", strategy="fsdp")
    assert plan.grad_buckets == () and all(p.bucket == -1 for p in plan.params)
    two_d = api.plan(MODELS / "dense-gqa-tied.yaml", "2x2", strategy="fsdp,sp")
    assert two_d.grad_buckets and {(c.collective, c.axis) for b in two_d.grad_buckets for c in b.steps} == {
        ("all_reduce", 1)}
