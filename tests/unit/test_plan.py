"""The data-parallel plan, its JSON round trip, the boxing table and the explain printout."""

from __future__ import annotations

import json

import pytest
import sympy
import torch
from torch.utils.flop_counter import FlopCounterMode
from ultraplan.compiler.build import build_model
from ultraplan.passes.choose_sbp import PlanError
from ultraplan.passes.plan import PLAN_VERSION, Plan
from ultraplan.passes.sbp import Broadcast, PartialSum, Split, box, parse_sbp

from tests.conftest import MODELS
from ultraplan import api
from ultraplan.cli import main

n = sympy.Symbol("n", positive=True)


@pytest.mark.parametrize("mesh", ["1", "4", "2x2"])
def test_plan_round_trips_exactly(mesh):
    plan = api.plan(MODELS / "dense-gqa-tied.yaml", mesh)
    text = plan.to_json()
    assert Plan.from_json(text) == plan
    assert Plan.from_json(text).to_json() == text


def test_data_parallel_signatures_and_gradient_collectives():
    plan = api.plan(MODELS / "dense-tiny.yaml", "2x2", batch=8)
    assert plan.node("tokens").sbp_out == "S(0),S(0)" and plan.node("tokens").local_shape == ("B/4", "T")
    assert plan.node("layers_0_attention_q").sbp_in == ("S(0),S(0)", "B,B")
    assert plan.node("loss").sbp_out == "P,P" and plan.node("loss").partial_scale == "1/4"
    for p in plan.params:
        assert p.sbp == "B,B"
        assert [(c.collective, c.axis, c.src, c.dst) for c in p.grad_sync] == [
            ("all_reduce", 1, "P", "B"), ("all_reduce", 0, "P", "B")]
        size = 4
        for dim in p.shape:
            size *= dim
        assert all(c.payload_bytes.value == size and c.wire_bytes.value == size for c in p.grad_sync)  # 2(n-1)/n = 1


def test_totals_are_symbolic_and_evaluated():
    plan = api.plan(MODELS / "dense-tiny.yaml", "4", hardware="h200-8")
    step = plan.total("step_time")
    assert {"B", "T", "n0", "bw0", "lat0", "peak"} <= {str(s) for s in sympy.sympify(step.expr).free_symbols}
    expr = sympy.sympify(step.expr)
    hw = api.load_hardware("h200-8")
    values = {"B": plan.batch, "T": plan.seq, "n0": plan.mesh[0], "bw0": hw.intra_node.bandwidth,
              "lat0": hw.intra_node.latency, "peak": hw.peak_flops["fp32"]}
    assert float(expr.subs(values)) == pytest.approx(step.value, rel=1e-12)
    model = build_model(api.load("dense-tiny"), seed=0)  # the FLOPs torch counts for the planned batch
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(plan.batch, plan.seq, dtype=torch.int64))
    assert plan.total("forward_flops").value == counter.get_total_flops()
    assert plan.total("flops_per_token").value * plan.batch * plan.seq == counter.get_total_flops()


def test_batch_must_divide_over_mesh():
    with pytest.raises(PlanError, match="multiple of 4"):
        api.plan(MODELS / "dense-tiny.yaml", "4", batch=6)


def test_bad_mesh_is_a_clear_error(capsys):
    assert main(["plan", "dense-tiny", "--mesh", "4by2"]) == 2
    assert "--mesh takes N or NxM" in capsys.readouterr().err


@pytest.mark.parametrize("src,dst,collective,wire", [
    (PartialSum(), Broadcast(), "all_reduce", 2 * (n - 1) / n * 100),
    (Split(0), Broadcast(), "all_gather", (n - 1) / n * 100),
    (PartialSum(), Split(1), "reduce_scatter", (n - 1) / n * 100),
    (Split(0), Split(1), "all_to_all", (n - 1) / n**2 * 100),
    (Broadcast(), Split(0), "local", 0),
])
def test_boxing_table(src, dst, collective, wire):
    step = box(src, dst, axis=0, nbytes=sympy.Integer(100), n=n)
    assert step.collective == collective and sympy.simplify(step.wire - wire) == 0
    assert parse_sbp(str(src)) == src


def test_boxing_refuses_split_to_partial():
    with pytest.raises(ValueError, match="no boxing"):
        box(Split(0), PartialSum(), axis=0, nbytes=sympy.Integer(8), n=n)


def test_cli_plan_json_and_explain(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["plan", "dense-tiny", "--mesh", "4", "--json", "-o", str(out)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["version"] == PLAN_VERSION == 4 and data["mesh"] == [4] and Plan.from_json(out.read_text()).mesh == (4,)
    assert main(["explain", "dense-tiny", "--mesh", "2", "--stage", "choose_sbp"]) == 0
    text = capsys.readouterr().out
    assert "# Constructed by choose_sbp" in text and "build_plan" not in text
    line = next(x for x in text.splitlines() if x.strip().startswith("layers_0_attention_q ="))
    assert line.endswith("# (B, T, 64)  [S(0)], [B] -> [S(0)]  flops=8192*B*T")


def test_infer_plan_has_no_backward():
    train = api.plan(MODELS / "dense-tiny.yaml", "4")
    infer = api.plan(MODELS / "dense-tiny.yaml", "4", mode="infer")
    assert infer.total("backward_flops").value == 0 and infer.total("comm_wire_bytes").value == 0
    assert all(not p.grad_sync for p in infer.params) and not infer.output_boxing
    assert infer.node(infer.output).sbp_out == "S(0)" and infer.output == "logits"
    assert infer.total("memory_per_device").value < train.total("memory_per_device").value / 3


def test_plan_file_errors_are_messages(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing")]) == 2
    assert "not found; make it with `ultraplan compile" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text('{"version": 1,')
    assert main(["viz", str(tmp_path / "broken.json"), "-o", str(tmp_path / "x.svg")]) == 2
    assert f"{tmp_path / 'broken.json'}:1:15: not valid JSON" in capsys.readouterr().err
    (tmp_path / "other.json").write_text(f'{{"version": {PLAN_VERSION}}}')
    assert main(["viz", str(tmp_path / "other.json"), "-o", str(tmp_path / "x.svg")]) == 2
    assert "not an ultraplan plan" in capsys.readouterr().err


def test_run_refuses_a_process_count_the_plan_was_not_made_for(tmp_path, capsys):
    api.compile(MODELS / "dense-tiny.yaml", "4", tmp_path)
    assert main(["run", str(tmp_path), "--nproc", "3"]) == 2
    assert "compiled for mesh 4 (4 processes), not 3" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--batch", "--seq"])
def test_batch_and_seq_must_be_positive(capsys, flag):
    assert main(["plan", "dense-tiny", flag, "0"]) == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_compile_keeps_unrelated_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    api.compile(MODELS / "dense-tiny.yaml", "1", tmp_path)
    api.compile(MODELS / "dense-tiny.yaml", "2", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert api.read_plan(tmp_path).mesh == (2,)


def test_value_tables_get_their_own_optimizer_group():
    from ultraplan.compiler.build import value_lr_factor

    plan = api.plan(MODELS / "ultramem-v2-tiny.yaml", "2")
    groups = {p.name: p.group for p in plan.params}
    assert groups["memory_tables.ring.values"] == groups["memory_tables.ring.pre_values"] == "values"
    assert groups["layers.0.ultramem_v2.keys"] == groups["embed.weight"] == "default"
    assert (plan.training.value_lr_multiplier, plan.training.value_lr_decay_steps) == (4.0, 10)
    assert [value_lr_factor(s, 4.0, 10) for s in (0, 5, 10, 20)] == [4.0, 2.5, 1.0, 1.0]
    assert value_lr_factor(7, 2.0, 0) == 2.0
    pkm = {p.name: p.group for p in api.plan(MODELS / "pkm-tiny.yaml", "1").params}
    assert [n for n, g in pkm.items() if g == "values"] == ["layers.1.pkm.values"]


@pytest.mark.parametrize(("spec", "mesh"), [("dense-tiny", "4"), ("moe-tiny", "2x2")])
def test_comm_totals_count_every_collective_a_step_runs(spec, mesh):
    """The same enumeration the multi-rank test measures: gradient syncs, the loss's all-reduce, and
    forward boxings with their backward duals."""
    plan = api.plan(MODELS / f"{spec}.yaml", mesh)
    forward = [c for node in plan.nodes for _, steps in node.boxing for c in steps if c.collective != "local"]
    every = [c for b in plan.grad_buckets for c in b.steps] + list(plan.output_boxing) + forward
    every += [c for c in plan.collectives if c.phase == "backward"]
    assert sorted(map(repr, every)) == sorted(map(repr, plan.collectives))
    assert plan.output_boxing and plan.total("comm_wire_bytes").value == pytest.approx(
        sum(c.wire_bytes.value for c in every), rel=1e-12)
    assert plan.total("comm_time").value == pytest.approx(sum(c.time.value for c in every), rel=1e-12)


def test_multi_axis_boxing_sizes_each_step_by_the_layout_before_it():
    """(S0, S0) -> (B, B): after the axis-1 all-gather a device holds B/n0 rows, which the axis-0 step
    gathers; (P, S0) -> (B, B): the axis-0 all-reduce sums the whole, already gathered tensor."""
    from ultraplan.compiler.shapes import B, T
    from ultraplan.passes.choose_sbp import boxings

    row = 64 * 4  # hidden 64, fp32
    n0, n1 = sympy.Symbol("n0", positive=True, integer=True), sympy.Symbol("n1", positive=True, integer=True)
    gather = boxings((Split(0), Split(0)), (Broadcast(), Broadcast()), (B, T, 64), "float32")
    assert [(b.collective, b.axis) for b in gather] == [("all_gather", 1), ("all_gather", 0)]
    assert sympy.simplify(gather[1].payload - row * B * T / n0) == 0
    reduce = boxings((PartialSum(), Split(0)), (Broadcast(), Broadcast()), (B, T, 64), "float32")
    assert [(b.collective, b.axis) for b in reduce] == [("all_gather", 1), ("all_reduce", 0)]
    assert sympy.simplify(reduce[1].payload - row * B * T) == 0
    assert sympy.simplify(gather[0].payload - row * B * T / (n0 * n1)) == 0  # unchanged first step
