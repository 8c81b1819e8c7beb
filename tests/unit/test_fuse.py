"""The fusion pass (passes/fuse.py) and its fused ops: each fused op against the unfused ops it
replaces (forward and backward, float64), its FLOP rule against torch's FlopCounterMode, its
saved-activation rule against autograd's saved tensors, and the pass's decisions in the Plan,
``--no-fuse`` and ``explain``."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import sympy
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from ultraplan.compiler import ops
from ultraplan.compiler.op_table import OP_TABLE
from ultraplan.passes.context import Mesh
from ultraplan.passes.fuse import RULES
from ultraplan.passes.pipeline import make_plan

from tests.conftest import MODELS
from ultraplan import api
from ultraplan.cli import main


def _qkv(b: int, t: int, heads: int, kv: int, e: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(heads * 100 + kv * 10 + t)
    return tuple(torch.randn(b, t, n * e, generator=gen, dtype=torch.float64, requires_grad=True)
                 for n in (heads, kv, kv))


@pytest.mark.parametrize(("b", "t", "heads", "kv", "e"), [(2, 7, 4, 4, 8), (1, 5, 6, 2, 3), (3, 1, 4, 1, 5),
                                                          (2, 9, 3, 1, 2)])
def test_sdpa_attention_equals_masked_softmax(b, t, heads, kv, e):
    q, k, v = _qkv(b, t, heads, kv, e)
    want = ops.causal_attention(q, k, v, heads, kv, e)
    got = ops.sdpa_attention(q, k, v, heads, kv, e)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(want)
    for g_want, g_got in zip(torch.autograd.grad(want, (q, k, v), grad), torch.autograd.grad(got, (q, k, v), grad)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-10)


def test_sdpa_kv_shard_equals_the_whole():
    q, k, v = (x.detach() for x in _qkv(2, 5, 8, 2, 3))
    whole = ops.causal_attention(q, k, v, 8, 2, 3)
    for shards in (2, 4, 8):
        width = 8 // shards * 3
        parts = [ops.sdpa_attention_kv_shard(q[..., i * width:(i + 1) * width], k, v, 8 // shards, 8, 2, 3,
                                             i * 8 // shards) for i in range(shards)]
        torch.testing.assert_close(torch.cat(parts, dim=-1), whole, rtol=1e-12, atol=1e-12)


def test_sdpa_flop_rule_is_what_torch_counts():
    """torch's CPU flash kernel has no FlopCounterMode formula; its math backend (the same
    products) is counted, and the record's rule must equal it, as the masked softmax's does."""
    b, t, heads, kv, e = 2, 6, 4, 2, 8
    q, k, v = (x.float() for x in _qkv(b, t, heads, kv, e))
    attrs = {"num_heads": heads, "num_kv_heads": kv, "head_dim": e}
    shapes = [tuple(x.shape) for x in (q, k, v)]
    rule = OP_TABLE["sdpa_attention"].flops(shapes, (b, t, heads * e), attrs)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fused:
        ops.sdpa_attention(q, k, v, heads, kv, e)
    with FlopCounterMode(display=False) as unfused:
        ops.causal_attention(q, k, v, heads, kv, e)
    assert rule == fused.get_total_flops() == unfused.get_total_flops()


def test_sdpa_saves_what_its_memory_rule_says():
    """passes/memory.py: q, k, v, the output and a float logsumexp per (batch, head, position)."""
    b, t, heads, kv, e = 2, 16, 4, 2, 8
    q, k, v = (x.detach().float().requires_grad_() for x in _qkv(b, t, heads, kv, e))
    storages: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = ops.sdpa_attention(q, k, v, heads, kv, e)
    predicted = (q.numel() + k.numel() + v.numel() + out.numel() + b * heads * t) * 4
    assert sum(storages.values()) == predicted


def test_plan_records_each_fusion_and_no_fuse_turns_it_off():
    fused = api.plan(MODELS / "dense-gqa-tied.yaml", "2", strategy="tp")
    plain = api.plan(MODELS / "dense-gqa-tied.yaml", "2", strategy="tp", fuse=False)
    attention = [n.name for n in plain.nodes if n.op == "causal_attention"]
    assert attention and [f.node for f in fused.fusions if f.rule == "attention->sdpa"] == attention
    assert not plain.fusions
    assert all(fused.node(name).op == "sdpa_attention" for name in attention)
    heads = dict(fused.node(attention[0]).attrs)["num_heads"]
    assert fused.fusions[0].bytes_saved.value == 2 * 8 * fused.batch * heads * fused.seq ** 2 * 4
    # FLOPs are counted as before; the T x T probabilities are no longer saved for the backward
    assert fused.total("forward_flops").value == plain.total("forward_flops").value
    probs = fused.batch * (heads // 2) * fused.seq ** 2 * 4 * len(attention)  # per device, heads split in 2
    saved = plain.total("memory_activations").value - fused.total("memory_activations").value
    assert saved >= probs


def test_fusion_is_declined_when_memory_is_fast_enough():
    """The decision is the cost model's: with memory traffic free, the backward's recomputation
    of the scores is not worth it and every attention stays as written."""
    spec = api.load("dense-tiny")
    hw = dataclasses.replace(api.load_hardware("cpu"), memory_bandwidth=1e30)
    plan, _, reports = make_plan(spec, hw, Mesh((1,)))
    attention = [f for f in plan.fusions if f.rule == "attention->sdpa"]
    assert not attention and any(n.op == "causal_attention" for n in plan.nodes)
    assert any("kept" in d for r in reports if r.name == "fuse" for d in r.decisions)
    infer, _, _ = make_plan(spec, hw, Mesh((1,)), mode="infer")  # no backward, nothing recomputed
    assert len([f for f in infer.fusions if f.rule == "attention->sdpa"]) == spec.num_layers


def test_rules_are_op_table_records():
    for rule in RULES:
        assert rule.fused in OP_TABLE and all(step.op in OP_TABLE for step in rule.pattern)


def test_cli_explain_lists_fusions_and_no_fuse(capsys):
    assert main(["explain", "dense-tiny", "--stage", "fuse"]) == 0
    out = capsys.readouterr().out
    assert "attention->sdpa at layers_0_attention_mixed: fused, saves" in out and "ops_sdpa_attention" in out
    assert main(["explain", "dense-tiny", "--stage", "fuse", "--no-fuse"]) == 0
    out = capsys.readouterr().out
    assert "off (--no-fuse)" in out and "sdpa_attention" not in out


@pytest.mark.parametrize("via", [0, 1])
def test_swiglu_equals_silu_then_mul(via):
    gen = torch.Generator().manual_seed(via)
    gate, up = (torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    act = ops.activation(gate, "silu")
    want = ops.mul(act, up) if via == 0 else ops.mul(up, act)
    got = ops.swiglu(gate, up)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    grad = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(want, (gate, up), grad), torch.autograd.grad(got, (gate, up), grad)):
        torch.testing.assert_close(b, a, rtol=1e-14, atol=1e-14)


def test_silu_gate_times_output_becomes_swiglu():
    """Memory+'s gated output, mul(out, silu(linear(h))), is one swiglu(gate, out) node."""
    fused = api.plan(MODELS / "memory-plus-tiny.yaml", "1")
    plain = api.plan(MODELS / "memory-plus-tiny.yaml", "1", fuse=False)
    gated = [f for f in fused.fusions if f.rule == "silu*mul->swiglu"]
    assert gated and all(len(f.replaced) == 2 for f in gated)
    for f in gated:
        act, mul = (plain.node(n) for n in f.replaced)
        assert act.op == "activation" and dict(act.attrs)["kind"] == "silu" and mul.op == "mul"
        node = fused.node(f.node)
        outside = [a for a in mul.args if a != act.name]
        assert node.op == "swiglu" and node.args == (act.args[0], *outside) and not node.attrs
        assert f.bytes_saved.value == 2 * 2 * fused.batch * fused.seq * int(node.shape[-1]) * 4
    names = {n.name for n in fused.nodes}
    assert all(f.replaced[0] not in names and f.replaced[1] in names for f in gated)


@pytest.mark.parametrize(("b", "t", "h", "k", "rows", "d"), [
    (2, 3, 2, 4, 11, 5),  # non-powers of two
    (1, 2, 1, 1, 3, 2),  # top-k of 1
    (2, 5, 3, 7, 13, 9),
    (0, 4, 2, 3, 6, 5),  # an empty token set
])
def test_gather_weighted_sum_equals_gather_then_sum(b, t, h, k, rows, d):
    gen = torch.Generator().manual_seed(rows)
    table = torch.randn(rows, d, generator=gen, dtype=torch.float64, requires_grad=True)
    indices = torch.randint(0, rows - 1, (b, t, h, k), generator=gen)  # the last row: nobody selects it
    if indices.numel() and k > 1:
        indices[0, 0, 0, :] = 1  # one token selects the same row k times
    weights = torch.randn(b, t, h, k, generator=gen, dtype=torch.float64, requires_grad=True)
    want = ops.weighted_sum(ops.gather_rows(table, indices), weights)
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (table, weights), grad)
    # the torch form, and its bfloat16-on-CUDA form (torch has no embedding_bag weight gradient there)
    for got in (ops.gather_weighted_sum(table, indices, weights), ops._LowPrecisionBag.apply(table, indices, weights)):
        assert got.shape == want.shape == (b, t, d)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        got_grads = torch.autograd.grad(got, (table, weights), grad)
        for a, g in zip(want_grads, got_grads):
            torch.testing.assert_close(g, a, rtol=1e-10, atol=1e-10)
        assert not got_grads[0][-1].any()  # the unselected row gets no gradient


def test_gather_weighted_sum_saves_what_its_memory_rule_says():
    b, t, h, k, d = 2, 3, 2, 5, 7
    table = torch.nn.Parameter(torch.randn(17, d))
    indices, weights = torch.randint(0, 17, (b, t, h, k)), torch.randn(b, t, h, k, requires_grad=True)
    storages: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.nn.Parameter):
            storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        ops.gather_weighted_sum(table, indices, weights)
    assert sum(storages.values()) == indices.numel() * 8 + weights.numel() * 4 + 3 * 8 * b * t


def test_memory_lookups_fuse_gather_and_weighted_sum():
    for spec in ("pkm-tiny", "peer-tiny", "memory-plus-tiny"):
        fused = api.plan(MODELS / f"{spec}.yaml", "1")
        plain = api.plan(MODELS / f"{spec}.yaml", "1", fuse=False)
        bags = [f for f in fused.fusions if f.rule == "gather+weighted_sum"]
        assert len(bags) == sum(n.op == "weighted_sum" for n in plain.nodes) > 0
        for f in bags:
            gather, total = (plain.node(n) for n in f.replaced)
            node = fused.node(f.node)
            assert node.op == "gather_weighted_sum" and node.args == (*gather.args, total.args[1])
            assert node.flops.value == total.flops.value  # FLOPs counted as before
            rows = 1
            for dim in gather.shape:
                rows *= int(sympy.sympify(dim).subs({"B": fused.batch, "T": fused.seq}))
            assert f.bytes_saved.value == 2 * 2 * rows * 4
        assert fused.total("memory_activations").value < plain.total("memory_activations").value


def test_table_gradient_is_a_naive_scatter_summed_in_float32():
    """The torch forms' table gradient (ops._table_gradient): row indices[t, h, k] gets per_pick[t, h, k] *
    per_token[t], as a naive loop adds them; for bfloat16 inputs summed in float32 and rounded once (on
    CUDA a bf16 index_add_ rounds every atomic add; the CPU's already sums in float32)."""
    gen = torch.Generator().manual_seed(3)
    b, t, h, k, rows, d = 2, 3, 2, 5, 4, 6
    indices = torch.randint(0, rows, (b, t, h, k), generator=gen)
    per_pick, per_token = torch.randn(b, t, h, k, generator=gen), torch.randn(b, t, d, generator=gen)
    want = torch.zeros(rows, d, dtype=torch.float64)
    for bi, ti, hi, ki in itertools.product(range(b), range(t), range(h), range(k)):
        want[indices[bi, ti, hi, ki]] += per_pick[bi, ti, hi, ki].double() * per_token[bi, ti].double()
    table = torch.zeros(rows, d)
    torch.testing.assert_close(ops._table_gradient(table, indices, per_pick, per_token).double(), want, rtol=1e-6, atol=1e-6)
    low = ops._table_gradient(table.bfloat16(), indices, per_pick.bfloat16(), per_token.bfloat16())
    wide = ops._table_gradient(table, indices, per_pick.bfloat16().float(), per_token.bfloat16().float())
    assert low.dtype == torch.bfloat16 and torch.equal(low, wide.bfloat16())
