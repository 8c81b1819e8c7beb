"""Gradient buckets (passes/buckets.py): the plan packs gradients as torch DDP does, and its
communication figures count the buckets it sends.

The reference for the packing is torch's own ``dist._compute_bucket_assignment_by_size`` (the
function DistributedDataParallel calls, torch/nn/parallel/distributed.py), given the same
gradients (meta tensors of each parameter's local shape, in the order the forward first uses
them) and the same caps; DDP then launches the buckets in reverse.
"""

from __future__ import annotations

import math

import pytest
import sympy
import torch
import torch.distributed as dist
from ultraplan.passes.buckets import DEFAULT_BUCKET_CAP_BYTES, DEFAULT_FIRST_BUCKET_CAP_BYTES

from tests.conftest import MODELS
from ultraplan import api


def ddp_buckets(plan, caps: list[int]) -> list[list[str]]:
    """torch's bucket assignment of the plan's gradients, in DDP's launch order (names in each bucket
    in reverse use order, as the plan lists them)."""
    used = {n.name: i for i, n in enumerate(plan.nodes)}
    first_use = {p.name: min(used[n.name] for n in plan.nodes if p.node in n.args) for p in plan.params}
    order = sorted((p for p in plan.params if p.grad_sync), key=lambda p: first_use[p.name])
    tensors = [torch.empty(int(p.grad_sync[0].payload_bytes.value) // 4, device="meta") for p in order]
    indices, _ = dist._compute_bucket_assignment_by_size(tensors, caps, [False] * len(tensors))
    return [[order[i].name for i in reversed(bucket)] for bucket in reversed(indices)]


@pytest.mark.parametrize(("spec", "mesh", "bucket_mb"), [("dense-100m", "8", None), ("dense-tiny", "4", 0.05),
                                                         ("moe-tiny", "2", 0.01), ("dense-gqa-tied", "2", 0.02)])
def test_buckets_are_what_torch_ddp_assigns(spec, mesh, bucket_mb):
    plan = api.plan(MODELS / f"{spec}.yaml", mesh, bucket_mb=bucket_mb, hardware="h200-8")
    caps = [DEFAULT_FIRST_BUCKET_CAP_BYTES, DEFAULT_BUCKET_CAP_BYTES] if bucket_mb is None else [int(bucket_mb * 2**20)]
    expected = ddp_buckets(plan, caps)
    assert len(expected) > 1  # several buckets, so the order is tested too
    assert [list(b.params) for b in plan.grad_buckets] == expected


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
    """dense-tiny dp on 4 devices: 21 gradients, 462 kB, one bucket under DDP's 1 MiB first cap;
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
