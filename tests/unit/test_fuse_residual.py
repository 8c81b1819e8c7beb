"""The residual add + RMSNorm fusion (passes/fuse.py's ``add+rms_norm`` rule, ops.add_rms_norm and
ops.pair_part): the fused op against ``add`` then ``rms_norm`` forward and backward in float64 on
awkward shapes, what it saves for the backward against autograd's saved tensors, and the pass's
decisions in the Plan."""

from __future__ import annotations

import pytest
import torch
from ultraplan.compiler import ops

from tests.conftest import MODELS
from ultraplan import api


@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 1, 7), (3, 4, 1), (0, 3, 6), (2, 6, 64)])
def test_add_rms_norm_equals_add_then_norm(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x, y = (torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight = torch.randn(shape[-1], generator=gen, dtype=torch.float64, requires_grad=True)
    total = ops.add(x, y)
    want = (total, ops.rms_norm(total, weight, 1e-6))
    pair = ops.add_rms_norm(x, y, weight, 1e-6)
    got = (ops.pair_part(pair, 0), ops.pair_part(pair, 1))
    assert pair.shape == (*shape[:-1], 2, shape[-1])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)  # the same arithmetic in the same order
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2)]
    # both results read on, as in a layer: the residual stream and the norm's reader
    want_grads = torch.autograd.grad(want, (x, y, weight), grads)
    got_grads = torch.autograd.grad(got, (x, y, weight), grads)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_add_rms_norm_only_the_norm_read():
    """A gradient for one result only (the other unused) is still the unfused one."""
    gen = torch.Generator().manual_seed(3)
    x, y = (torch.randn(2, 5, 9, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight = torch.randn(9, generator=gen, dtype=torch.float64, requires_grad=True)
    want = ops.rms_norm(ops.add(x, y), weight, 1e-5).sum()
    got = ops.pair_part(ops.add_rms_norm(x, y, weight, 1e-5), 1).sum()
    for g, w in zip(torch.autograd.grad(got, (x, y, weight)), torch.autograd.grad(want, (x, y, weight))):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_add_rms_norm_saves_what_its_memory_rule_says():
    """passes/memory.py: the stacked output (the sum is a view of it) and one 1/rms per row."""
    b, t, d = 2, 3, 8
    x, y = (torch.randn(b, t, d, requires_grad=True) for _ in range(2))
    weight = torch.nn.Parameter(torch.randn(d))
    storages: dict[int, int] = {}

    def pack(v: torch.Tensor) -> torch.Tensor:
        if not isinstance(v, torch.nn.Parameter):
            storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
        return v

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        ops.add_rms_norm(x, y, weight, 1e-6)
    assert sum(storages.values()) == (2 * b * t * d + b * t) * 4


def test_plan_fuses_the_residual_add_into_the_next_norm():
    """dense-tiny: in each layer the add after attention and the FFN's norm of it become one node;
    the adds that end a layer (read by the next layer's norm) are left alone, so layers stay alike."""
    fused = api.plan(MODELS / "dense-tiny.yaml", "2", strategy="tp")
    plain = api.plan(MODELS / "dense-tiny.yaml", "2", strategy="tp", fuse=False)
    found = [f for f in fused.fusions if f.rule == "add+rms_norm"]
    layers = sum(n.op == "causal_attention" for n in plain.nodes)
    assert len(found) == layers > 0
    for f in found:
        add, norm = (plain.node(n) for n in f.replaced)
        assert add.op == "add" and norm.op == "rms_norm" and norm.args[0] == add.name
        node = fused.node(f.node)
        assert node.op == "add_rms_norm" and node.args == (*add.args, norm.args[1])
        parts = [fused.node(n) for n in f.replaced]  # the replaced names now hold the views
        assert [p.op for p in parts] == ["pair_part", "pair_part"] and all(p.args == (f.node,) for p in parts)
        d = int(node.shape[-1])
        assert f.bytes_saved.value == 3 * fused.batch * fused.seq * d * 4
    assert fused.total("forward_flops").value == plain.total("forward_flops").value
    assert len(fused.blocks) == len(plain.blocks)  # the layers are still one repeated block


@pytest.mark.parametrize(("b", "t", "h", "k", "rows", "d"), [
    (2, 3, 2, 4, 11, 5),  # non-powers of two
    (1, 2, 1, 1, 3, 2),  # top-k of 1
    (0, 4, 2, 3, 6, 5),  # an empty token set
])
def test_gather_row_dot_equals_gather_then_dot(b, t, h, k, rows, d):
    gen = torch.Generator().manual_seed(rows + d)
    table = torch.randn(rows, d, generator=gen, dtype=torch.float64, requires_grad=True)
    indices = torch.randint(0, rows - 1, (b, t, h, k), generator=gen)  # the last row: nobody selects it
    if indices.numel() and k > 1:
        indices[0, 0, 0, :] = 1  # one token selects the same row k times
    x = torch.randn(b, t, d, generator=gen, dtype=torch.float64, requires_grad=True)
    want = ops.row_dot(x, ops.gather_rows(table, indices))
    got = ops.gather_row_dot(table, indices, x)
    assert got.shape == want.shape == (b, t, h, k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    grad = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, (table, x), grad)
    for g, w in zip(got_grads, torch.autograd.grad(want, (table, x), grad)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert not got_grads[0][-1].any()  # the unselected row gets no gradient


def test_memory_lookups_fuse_gather_and_row_dot():
    """PEER's down projections and UltraMemV2's pre-value gate become gather_row_dot nodes that keep
    the ids and the hidden instead of the gathered rows."""
    for spec in ("peer-tiny", "ultramem-v2-tiny"):
        fused = api.plan(MODELS / f"{spec}.yaml", "1")
        plain = api.plan(MODELS / f"{spec}.yaml", "1", fuse=False)
        found = [f for f in fused.fusions if f.rule == "gather+row_dot"]
        assert len(found) == sum(n.op == "row_dot" for n in plain.nodes) > 0
        for f in found:
            gather, dot = (plain.node(n) for n in f.replaced)
            node = fused.node(f.node)
            assert node.op == "gather_row_dot" and node.args == (*gather.args, dot.args[0])
            assert node.flops.value == dot.flops.value  # FLOPs counted as before
        assert fused.total("memory_activations").value < plain.total("memory_activations").value
