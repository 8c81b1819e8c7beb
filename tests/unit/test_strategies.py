"""Signatures from the op table, the strategies' pins, the generic propagation and --force.

The multi-rank runs of every strategy are in tests/dist/test_strategies.py; these are the fast
checks of what the planner decides, on small graphs, with the expected decisions written out.
"""

from __future__ import annotations

from collections import Counter

import pytest
from ultraplan.compiler.op_table import OP_TABLE
from ultraplan.passes.context import PlanError
from ultraplan.passes.signatures import axis_signatures

from tests.conftest import MODELS
from ultraplan import api
from ultraplan.cli import main


def describe(op: str, shapes, out, attrs=None, n=2) -> list[str]:
    return [s.describe() for s in axis_signatures(OP_TABLE[op], shapes, out, attrs or {}, n)]


def test_linear_signatures_are_the_einsum_splits():
    """x (B, T, I) @ w (O, I): batch, sequence and output splits, the contracted I gives P, and P in
    either input with the other B gives P (as DTensor derives einsum strategies)."""
    assert describe("linear", [(8, 4, 6), (10, 6)], (8, 4, 10)) == [
        "B, B -> B",
        "S(0), B -> S(0) (split '0')",
        "S(1), B -> S(1) (split '1')",
        "S(2), S(1) -> P (split 'i')",
        "B, S(0) -> S(2) (split 'o')",
        "P, B -> P",
        "B, P -> P",
    ]


def test_attention_splits_heads_only_when_both_counts_divide():
    q, kv = (2, 4, 8 * 4), (2, 4, 2 * 4)
    attrs = {"num_heads": 8, "num_kv_heads": 2, "head_dim": 4}
    assert "S(2), S(2), S(2) -> S(2) (split 'h')" in describe("causal_attention", [q, kv, kv], q, attrs, n=2)
    assert "S(2), S(2), S(2) -> S(2) (split 'h')" not in describe("causal_attention", [q, kv, kv], q, attrs, n=4)
    assert not any("S(1)" in s for s in describe("causal_attention", [q, kv, kv], q, attrs, n=2))  # positions


def test_cross_entropy_means_and_the_vocabulary_parallel_variant():
    found = describe("cross_entropy", [(8, 4, 16), (8, 4)], ())
    assert found == ["B, B -> B", "S(0), S(0) -> P (split 'b')", "S(1), S(1) -> P (split 't')",
                     "S(2), B -> P (variant vocab_parallel)"]


def collectives(plan) -> Counter:
    return Counter((c.collective, c.phase) for c in plan.collectives)


def test_tensor_parallel_is_megatron():
    """Per layer: one all-reduce after attention and one after the FFN in the forward, their duals in
    the backward; the embedding's P all-reduced once; the cross entropy's two all-reduces; the
    replicated norms' gradients all-reduced; no all-gather of logits."""
    plan = api.plan(MODELS / "dense-tiny.yaml", "2", strategy="tp")
    layers = 2
    assert collectives(plan) == Counter({("all_reduce", "forward"): 1 + 2 * layers + 2,
                                         ("all_reduce", "backward"): 1 + 2 * layers,
                                         ("all_reduce", "gradient_sync"): 1,
                                         ("all_reduce", "loss_logging"): 1})
    assert [len(b.params) for b in plan.grad_buckets] == [2 * layers + 1]  # the norms' gradients, one bucket
    assert plan.node("layers_0_attention_q").sbp_in == ("B", "S(0)") and plan.node("layers_0_attention_q").sbp_out == "S(2)"
    assert dict(plan.node("layers_0_attention_mixed").local_attrs)["num_heads"] == 2
    assert plan.node("layers_0_attention_out").sbp_out == "P"
    assert plan.node("loss").call == "runtime.vocab_parallel_cross_entropy"
    assert plan.node("x").call == "ops.embedding_rows"


def test_sequence_parallel_gathers_into_and_scatters_out_of_each_region():
    plan = api.plan(MODELS / "dense-tiny.yaml", "2", strategy="sp")
    forward = Counter(c.collective for c in plan.collectives if c.phase == "forward")
    assert forward == Counter({"all_gather": 2 * 2 + 1, "reduce_scatter": 2 * 2 + 1, "all_reduce": 2})
    assert plan.node("layers_0_attention_norm_normed").sbp_out == "S(1)"
    assert plan.node("layers_0_attention_residual").sbp_out == "S(1)"


def test_fsdp_stores_shards_and_gathers_before_use():
    plan = api.plan(MODELS / "dense-tiny.yaml", "4", strategy="fsdp")
    assert all(p.sbp == "S(0)" and p.used == "B" for p in plan.params)
    assert all(not p.grad_sync for p in plan.params)
    kinds = collectives(plan)
    grouped = [name for g in plan.gather_groups for name in g.params]  # one collective per layer (gather groups)
    assert len(grouped) == len(set(grouped)) == len(plan.params)  # every parameter gathers in a group
    model_level = {name for g in plan.gather_groups if g.layer == -1 for name in g.params}
    assert model_level == {"embed.weight", "final_norm.weight", "lm_head.weight"} and \
        all(len(g.params) == 1 for g in plan.gather_groups if g.layer == -1)  # the Model's own: one each
    expected = len(plan.params) - len(grouped) + len(plan.gather_groups)
    assert kinds[("all_gather", "forward")] == kinds[("reduce_scatter", "backward")] == expected
    dp = api.plan(MODELS / "dense-tiny.yaml", "4")
    assert sum(p.bytes_per_device.value for p in plan.params) * 4 == sum(p.bytes_per_device.value for p in dp.params)


def test_fsdp_keeps_the_sources_of_derived_state_whole():
    plan = api.plan(MODELS / "ultramem-tiny.yaml", "2", strategy="fsdp")
    cores = [p for p in plan.params if p.name.endswith(".cores")]
    assert cores and all(p.sbp == "B" for p in cores)


def test_expert_parallel_dispatches_by_all_to_all():
    plan = api.plan(MODELS / "moe-tiny.yaml", "2x2", strategy="dp,ep")
    experts = [p for p in plan.params if p.name.endswith(("moe.w_up", "moe.w_gate", "moe.w_down"))]
    assert experts and all(p.sbp == "B,S(0)" for p in experts)
    routed = plan.node("layers_1_moe_routed")
    assert routed.call == "runtime.expert_parallel_ffn" and dict(routed.local_attrs)["axis"] == 1
    a2a = [c for c in plan.collectives if c.collective == "all_to_all"]
    assert len(a2a) == 2 * 6 and sum(c.data_dependent for c in a2a) == 2 * 2


def test_two_axes_split_different_dims_of_a_parameter():
    """fsdp picks a dim tensor parallelism does not split (a dim split twice would need a strided layout)."""
    plan = api.plan(MODELS / "dense-tiny.yaml", "2x2", strategy="fsdp,tp")
    params = {p.name: p for p in plan.params}
    assert params["layers.0.attention.wq"].sbp == "S(1),S(0)" and params["layers.0.attention.wq"].used == "B,S(0)"
    assert params["layers.0.attention.wo"].sbp == "S(0),S(1)"


def test_kv_heads_fewer_than_devices_are_replicated():
    """MQA (one kv head) over 2 devices: q split by heads, k and v whole, each device reads the kv
    head its query heads use (tested against eager on ranks in tests/dist/test_strategies.py)."""
    plan = api.plan(MODELS / "dense-deep-groups.yaml", "2", strategy="tp")
    mixed = plan.node("layers_1_attention_mixed")
    assert mixed.sbp_in == ("S(2)", "B", "B") and mixed.call == "ops.sdpa_attention_kv_shard"  # fused (passes/fuse.py)
    unfused = api.plan(MODELS / "dense-deep-groups.yaml", "2", strategy="tp", fuse=False)
    assert unfused.node("layers_1_attention_mixed").call == "ops.attention_kv_shard"
    assert dict(mixed.local_attrs)["q_head_start"] == {"shard_start": [4, [0]]}
    params = {p.name: p.sbp for p in plan.params}
    assert params["layers.1.attention.wk"] == "B" and params["layers.1.attention.wq"] == "S(0)"


def test_attention_shard_reads_the_kv_heads_its_query_heads_use():
    import torch
    from ultraplan.compiler import ops

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 8 * 3), torch.randn(2, 5, 2 * 3), torch.randn(2, 5, 2 * 3)
    whole = ops.causal_attention(q, k, v, 8, 2, 3)
    for shards in (2, 4, 8):
        width = 8 // shards * 3
        parts = [ops.attention_kv_shard(q[..., i * width:(i + 1) * width], k, v, 8 // shards, 8, 2, 3, i * 8 // shards)
                 for i in range(shards)]
        assert torch.allclose(torch.cat(parts, dim=-1), whole, atol=1e-6)


def test_strategy_errors_name_the_size(capsys):
    with pytest.raises(PlanError, match=r"layers.0.attention has heads = 8, not divisible by 3"):
        api.plan(MODELS / "dense-gqa-tied.yaml", "3", strategy="tp", batch=3)
    with pytest.raises(PlanError, match="sequence length is 32, not divisible by 3"):
        api.plan(MODELS / "dense-tiny.yaml", "3", strategy="sp", batch=3)
    with pytest.raises(PlanError, match=r"axis 0 \(dp\)"):
        api.plan(MODELS / "dense-tiny.yaml", "2x2", strategy="dp,tp", batch=3)
    api.plan(MODELS / "dense-tiny.yaml", "2x2", strategy="tp,tp", batch=3)  # nothing splits the batch
    assert main(["plan", "dense-tiny", "--mesh", "2x2", "--strategy", "dp,zp"]) == 2
    assert "unknown strategy 'zp'; choose from dp, fsdp, tp, sp, ep" in capsys.readouterr().err
    assert main(["plan", "dense-tiny", "--mesh", "2x2", "--strategy", "dp,tp,tp"]) == 2
    assert "3 strategies (dp,tp,tp) for a mesh of 2 axes" in capsys.readouterr().err


def test_force_pins_a_node_and_the_propagation_plans_around_it():
    plan = api.plan(MODELS / "dense-tiny.yaml", "2", strategy="tp", force=["layers_*_attention_mixed=B"])
    gathers = [n for n in plan.nodes if n.op == "boxing" and n.args[0].endswith("attention_mixed")]
    assert len(gathers) == 2 and all(n.sbp_out == "B" for n in gathers)
    assert [c.collective for _, cs in gathers[0].boxing for c in cs] == ["all_gather"]
    # the row-parallel wo then takes the gathered input whole, its weight as stored: a signature with
    # the input B and the weight S(1) does not exist, so the input is split again locally
    assert plan.node("layers_0_attention_out").sbp_in == ("S(2)", "S(1)")
    assert plan.forces == (("layers_*_attention_mixed", "B"),)


def test_forced_choices_that_cannot_work_are_errors(capsys):
    cases = {
        "layers_0_attention_wq=P": "a parameter cannot be P",
        "layers_0_attention_wq=S(2)": "cannot be S(2)",
        "nothing_*=B": "no node matches 'nothing_*'",
        "layers_0_attention_q=S(0)x": "not an SBP",
        "layers_0_attention_q": "--force takes NODE=SBP",
    }
    for force, message in cases.items():
        assert main(["plan", "dense-tiny", "--mesh", "2", "--force", force]) == 2, force
        assert message in capsys.readouterr().err, force
    # a pin the propagation can meet only by undoing the batch split: legal, and the plan says how
    plan = api.plan(MODELS / "dense-tiny.yaml", "2", force=["layers_0_attention_q=P"])
    assert plan.node("layers_0_attention_q").sbp_out == "B"
    assert plan.node("layers_0_attention_q_P").sbp_out == "P"


def test_plan_and_compile_say_which_defaults_they_used(tmp_path, capsys):
    """A batch, sequence length or learning rate nobody wrote changes the numbers: say where it came from."""
    assert main(["plan", "dense-tiny", "--mesh", "2"]) == 0
    err = capsys.readouterr().err
    assert "batch 8 (train.batch_size; --batch to change)" in err and "sequence length 32 (model.seq_len" in err
    assert "learning rate" not in err  # dense-tiny sets train.lr
    assert main(["plan", "dense-tiny", "--mesh", "2", "--batch", "4", "--seq", "8"]) == 0
    assert "defaults" not in capsys.readouterr().err
    spec = tmp_path / "bare.yaml"
    text = (MODELS / "dense-tiny.yaml").read_text()
    spec.write_text(text[:text.index("train:")])
    assert main(["compile", str(spec), "--mesh", "2", "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "batch 8 (the default train.batch_size" in err and "learning rate 0.003 (the default" in err
