"""``explain plan.json``, ``diff`` and ``viz``: their numbers against the plan's totals, the search's
own evaluation and byte counts worked out by hand from the spec's shapes."""

import json
import re

import pytest
from ultraplan.backends.diff import diff, render
from ultraplan.backends.explain_plan import explain_plan
from ultraplan.backends.graphviz import plan_to_dot
from ultraplan.backends.plan_summary import fmt_bytes, fmt_seconds, node_rows, summarise
from ultraplan.passes.alternatives import context_of, plan_choices
from ultraplan.passes.search import build_problem
from ultraplan.passes.search_explain import local_change, touching
from ultraplan.passes.search_ilp import evaluate
from ultraplan.passes.strategies import forced_pins

from ultraplan import api
from ultraplan.cli import main

F32 = 4


@pytest.fixture(scope="module")
def plans():
    return {s: api.plan("dense-tiny", "2", strategy=s) for s in ("dp", "fsdp", "tp", "auto")}


def test_rows_add_up_to_the_plan_totals(plans):
    for plan in plans.values():
        rows, t = summarise(plan), dict(plan.totals)
        assert sum(r.compute_s for r in rows) == pytest.approx(t["compute_time"].value, rel=1e-12)
        state = sum(t[k].value for k in ("memory_parameters", "memory_gradients", "memory_optimizer",
                                         "memory_gathered_parameters"))
        assert sum(r.memory_bytes for r in rows) == pytest.approx(state, rel=1e-12)
        assert sum(r.comm_bytes for r in rows) == pytest.approx(sum(c.payload_bytes.value for c in plan.collectives))
        assert sum(r.comm_s for r in rows) == pytest.approx(t["comm_time"].value, rel=1e-9)
        assert sum(r.flops for r in rows) == pytest.approx(t["forward_flops"].value + t["backward_flops"].value)


def test_tp_all_reduce_bytes_by_hand(plans):
    """Megatron's row-parallel output is P and all-reduced forward and backward: B*T*hidden floats per call."""
    plan = plans["tp"]
    hidden = dict(plan.model)["hidden_size"]
    box = next(n for n in plan.nodes if n.op == "boxing" and n.args == ("layers_0_attention_out",))
    comm = node_rows(plan)[box.name].comm["all_reduce"]
    assert comm.calls == 2 and comm.payload_bytes == 2 * plan.batch * plan.seq * hidden * F32
    text = explain_plan(plan, None)
    line = next(x for x in text.splitlines() if x.startswith("layers.0.attention") and " boxing " in x)
    assert f"all_reduce x2 {fmt_bytes(2 * plan.batch * plan.seq * hidden * F32)}" in line
    assert fmt_seconds(plan.total("step_time").value) in text.splitlines()[0]


def test_candidates_priced_as_the_search_prices_them(plans):
    auto = plans["auto"]
    hw = api.load_hardware(auto.hardware)
    choices = plan_choices(auto, hw)
    assert choices.objective == pytest.approx(auto.total("search_objective").value, rel=1e-12)
    assert choices.memory == pytest.approx(auto.total("memory_per_device").value, rel=1e-12)
    assert all(g.located for g in choices.groups)
    for g in choices.groups:  # the optimum: no single change that stays valid and fits is cheaper
        assert all(a.delta_time >= -1e-12 for a in g.alternatives if a.valid and a.fits), g.nodes
    # a local change equals the full objective's difference (search_ilp.evaluate of the whole assignment)
    ctx, gm = context_of(auto, hw)
    problem, cands, _, _ = build_problem(gm, ctx, {}, forced_pins(gm, ctx))
    choice = [0] * len(cands)
    near = touching(problem)
    base = evaluate(problem, choice)
    for g in range(0, len(cands), 3):
        for k in range(1, len(cands[g])):
            dt, dm, ok = local_change(problem, choice, g, k, near.get(g, []))
            t, m, valid = evaluate(problem, [*choice[:g], k, *choice[g + 1:]])
            assert dt == pytest.approx(t - base[0], abs=1e-12) and dm == pytest.approx(m - base[1], abs=1e-6)
            assert ok == valid  # a few MiB: every assignment fits, so only the pins can make one invalid
    named = plan_choices(plans["fsdp"], hw)
    wq = next(g for g in named.groups if g.nodes[0] == "layers_0_attention_wq")
    assert wq.why == "fsdp on axis 0" and len(wq.nodes) == 2 and wq.alternatives[0].chosen
    assert "stored [S(0)], gathered to [B] for use" == wq.alternatives[0].signature


def test_diff_of_a_plan_with_itself_is_empty(plans):
    d = diff(plans["fsdp"], plans["fsdp"])
    assert d["nodes"] == [] and d["boxings"] == [] and all(v[2] == 0 for v in d["totals"].values())
    assert render(d).endswith("no differences\n")


def test_diff_dp_fsdp_names_parameters_and_collective_bytes(plans):
    dp, fsdp = plans["dp"], plans["fsdp"]
    d = diff(dp, fsdp)
    params = {re.sub(r"layers_\d+_", "layers_*_", p.node) for p in dp.params}
    assert {c["name"] for c in d["nodes"]} == params
    assert all(c["a"] == "stored [B]" and c["b"].startswith("stored [S(") for c in d["nodes"])
    hidden, vocab = dict(dp.model)["hidden_size"], dict(dp.model)["vocab_size"]
    embed = next(c for c in d["boxings"] if c["name"].startswith("embed_weight -> [B]"))
    shard = vocab * hidden * F32 // 2
    assert f"all_gather axis 0 {fmt_bytes(shard)}" in embed["b"] and embed["a"] == "-"
    assert f"reduce_scatter x1 {fmt_bytes(2 * shard)}" in embed["b"]  # the gradient's dual: the whole tensor in
    gathered = sum(c.payload_bytes.value for c in fsdp.collectives if c.collective == "all_gather")
    assert d["totals"]["all_gather_bytes"] == [0.0, gathered, gathered]
    assert d["totals"]["step_time"][2] == pytest.approx(fsdp.total("step_time").value - dp.total("step_time").value)


def test_cli_explain_plan_and_diff_json(plans, tmp_path, capsys):
    for s in ("dp", "fsdp"):
        (tmp_path / f"{s}.json").write_text(plans[s].to_json())
    assert main(["explain", str(tmp_path / "fsdp.json")]) == 0
    text = capsys.readouterr().out
    assert "candidates per node" in text and "why: pinned by fsdp on axis 0" in text
    assert main(["diff", str(tmp_path / "dp.json"), str(tmp_path / "fsdp.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["reduce_scatter_bytes"][0] == 0.0
    elsewhere = tmp_path / "elsewhere.json"  # made with a hardware spec this machine does not have
    elsewhere.write_text(plans["dp"].to_json().replace('"hardware": "cpu"', '"hardware": "their-machine"'))
    assert main(["explain", str(elsewhere)]) == 2
    assert "give its spec with --hardware PATH" in capsys.readouterr().err
    assert main(["explain", str(elsewhere), "--no-candidates"]) == 0 and "candidates" not in capsys.readouterr().out


def test_viz_folds_an_8b_model_and_labels_boxings():
    plan = api.plan("llama3-8b-shape", "8", strategy="fsdp", hardware="h200-8", batch=8, seq=256)
    dot = plan_to_dot(plan)
    declared = [line for line in dot.splitlines() if re.match(r'\s*"[^"]+" \[', line)]
    assert len(declared) <= 40 < len(plan.nodes)  # 32 layers drawn once
    assert "DenseBlock x32 (layers 0-31)" in dot and "next layer" in dot
    hidden = dict(plan.model)["hidden_size"]
    assert f"all_gather axis 0 {fmt_bytes(hidden * hidden * F32 / 8)}" in dot  # wq's shard, gathered
    assert fmt_seconds(plan.total("step_time").value) in dot and fmt_bytes(plan.total("memory_per_device").value) in dot
    unfolded = plan_to_dot(plan, fold=False)
    assert len([x for x in unfolded.splitlines() if re.match(r'\s*"[^"]+" \[', x)]) > 32 * 9
