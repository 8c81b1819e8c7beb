"""calibrate's fit and spec (ultraplan/calibrate.py), the host terms a calibrated spec adds to a plan
(passes/host_cost.py) and the runner's step-time report, against independent arithmetic."""

from __future__ import annotations

import dataclasses
import math
import runpy

import pytest
from ultraplan.compiler.validate import load_hardware_spec
from ultraplan.passes.context import Mesh
from ultraplan.passes.host_cost import collective_figure
from ultraplan.passes.pipeline import make_plan

from tests.conftest import ROOT
from ultraplan import api
from ultraplan.calibrate import calibrate
from ultraplan.calibrate_fit import fit_link, ring_terms
from ultraplan.calibrate_spec import render_spec
from ultraplan.runner import step_report

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


def ring(kind: str, n: int, payload: float) -> tuple[float, float]:
    """The ring model of the NCCL tests' performance notes (docs/PERFORMANCE.md of nccl-tests): an
    all-reduce sends 2 (n-1)/n of its buffer in 2 (n-1) steps; an all-gather of n shards of
    ``payload`` and a reduce-scatter of ``payload`` send (n-1)/n of the whole buffer in n-1 steps; an
    all-to-all of ``payload`` sends the (n-1)/n of it bound for the others (written out here, not
    taken from passes/sbp.py)."""
    if kind == "all_reduce":
        return 2 * (n - 1), 2 * (n - 1) / n * payload
    if kind == "all_gather":
        return n - 1, (n - 1) * payload
    if kind == "reduce_scatter":
        return n - 1, (n - 1) / n * payload
    return n - 1, (n - 1) / n * payload


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [2, 4, 8])
def test_ring_terms_are_the_ring_model(kind, n):
    messages, wire = ring_terms(kind, n, 65536.0)
    assert (messages, wire) == pytest.approx(ring(kind, n, 65536.0))


def test_fit_link_recovers_latency_and_bandwidth():
    latency, bandwidth = 7.5e-5, 3.2e9
    rows = [{"kind": k, "n": n, "payload_bytes": p,
             "seconds": ring(k, n, p)[0] * latency + ring(k, n, p)[1] / bandwidth}
            for k in KINDS for n in (2, 4) for p in (1024, 65536, 4 * 2**20)]
    fit = fit_link(rows)
    assert fit["latency"] == pytest.approx(latency, rel=1e-9)
    assert fit["bandwidth"] == pytest.approx(bandwidth, rel=1e-9)
    assert fit["median_rel_error"] < 1e-9


def test_fit_link_clamps_a_negative_latency_to_zero():
    rows = [{"kind": "all_reduce", "n": 2, "payload_bytes": p, "seconds": p / 1e9 * (1 + 0.2 * (-1) ** i)}
            for i, p in enumerate((1024, 4096, 65536, 2**20))]
    fit = fit_link(rows)
    assert fit["latency"] >= 0 and fit["bandwidth"] > 0


FIGURES = {"peak_flops": {"fp32": 5.0e10, "bf16": 2.5e10}, "memory_bandwidth": 8.0e9, "op_overhead": 2.0e-4,
           "optimizer_tensor": 1.0e-4, "optimizer_element": 1.0e-8, "loop_pass": 5.0e-5,
           "collective_overhead": 3.0e-5, "collective_by_kind": {"all_reduce": 3.0e-5},
           "collective_beyond": {"all_reduce": {2: [3.0e-5]}}, "host_cores": 2,
           "link": {"latency": 1.0e-4, "bandwidth": 1.0e9, "median_rel_error": 0.1},
           "link_by_group_size": {2: {"latency": 1.0e-4, "bandwidth": 1.0e9, "median_rel_error": 0.1}}}


@pytest.fixture
def calibrated(tmp_path):
    path = tmp_path / "measured.yaml"
    path.write_text(render_spec("measured", 2, FIGURES, {"threads_per_rank": 1}, "ultraplan calibrate -o x"))
    return path


def test_rendered_spec_loads_with_every_figure(calibrated):
    hw = load_hardware_spec(calibrated)
    assert (hw.name, hw.devices_per_node, hw.nodes) == ("measured", 2, 1)
    assert hw.peak_flops == FIGURES["peak_flops"]
    assert (hw.memory_bandwidth, hw.op_overhead, hw.optimizer_tensor, hw.optimizer_element) == (8.0e9, 2.0e-4,
                                                                                               1.0e-4, 1.0e-8)
    assert hw.intra_node == hw.inter_node
    assert (hw.intra_node.bandwidth, hw.intra_node.latency) == (1.0e9, 1.0e-4)
    assert (hw.collective_overhead, hw.loop_pass) == (3.0e-5, 5.0e-5)


def test_host_terms_of_a_calibrated_spec(calibrated):
    """step_time gains memory_time + overhead_time; overhead_time is op_overhead per launch, the
    collective overhead per collective and AdamW's per tensor and per element over the plan's own
    parameter list; without op_overhead nothing changes."""
    hw = load_hardware_spec(calibrated)
    spec = api.load("dense-tiny")
    plan, gm, _ = make_plan(spec, hw, Mesh((2,)), strategies=("fsdp",))
    bare, _, _ = make_plan(spec, dataclasses.replace(hw, op_overhead=0.0), Mesh((2,)), strategies=("fsdp",))
    totals, base = dict(plan.totals), dict(bare.totals)
    assert "overhead_time" not in base and "memory_time" not in base
    assert totals["step_time"].value == pytest.approx(
        base["step_time"].value + totals["memory_time"].value + totals["overhead_time"].value)
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.meta["ultraplan"].cost is not None]
    local_elements = sum(p.bytes_per_device.value / 4 for p in plan.params)  # fp32 masters
    calls = len(plan.collectives)  # the step's collectives, gradient buckets included
    rest = totals["overhead_time"].value - 1.0e-4 * len(plan.params) - 1.0e-8 * local_elements - 3.0e-5 * calls
    assert rest / 2.0e-4 == pytest.approx(round(rest / 2.0e-4), abs=1e-6)
    launches = round(rest / 2.0e-4)
    assert len(ops) < launches - calls <= 2 * len(ops)  # every op forward, those the backward reaches again
    traffic = sum(n.bytes_read.value + n.bytes_written.value for n in plan.nodes if n.op != "boxing")
    assert 0 < totals["memory_time"].value <= 3 * traffic / 8.0e9


def test_step_report_takes_the_median_after_the_warmup():
    plan = api.plan("dense-tiny", "1")
    report = step_report(plan, [9.0, 5.0, 0.3, 0.1, 0.2, 0.4, 100.0])
    assert report["step_time_measured_s"] == pytest.approx(0.3)
    assert report["step_time_warmup_steps"] == 2
    assert report["step_time_predicted_s"] == plan.total("step_time").value
    assert step_report(plan, [0.5])["step_time_measured_s"] == 0.5
    assert math.isfinite(report["step_time_predicted_s"])


def test_step_time_bench_order_check():
    """bench/step_time.py's order check: pairs measured more than 25% apart, and of those the ones the
    model puts in the same order."""
    bench = runpy.run_path(str(ROOT / "bench" / "step_time.py"))
    rows = [{"measured": 1.0, "predicted": 1.0}, {"measured": 1.2, "predicted": 0.5},  # within 25%: not judged
            {"measured": 2.0, "predicted": 3.0}, {"measured": 4.0, "predicted": 2.0}]
    # judged: (1.0, 2.0) ok, (1.0, 4.0) ok, (1.2, 2.0) ok, (1.2, 4.0) ok, (2.0, 4.0) wrong
    assert bench["order_check"](rows) == (5, 4)


def test_step_time_bench_runs_a_short_program_for_its_seconds():
    """bench/step_time.py's steps per run: a program planned under a second a step runs 2 warm-up steps
    and steps enough for --run-seconds (at least --steps, at most MAX_STEPS); a longer one --long-steps."""
    import argparse

    bench = runpy.run_path(str(ROOT / "bench" / "step_time.py"))
    args = argparse.Namespace(steps=10, long_steps=12, run_seconds=3.0)
    assert bench["steps_for"](0.02, args) == 152  # 2 + 3 s / 20 ms
    assert bench["steps_for"](0.001, args) == bench["MAX_STEPS"] == 200
    assert bench["steps_for"](0.9, args) == 10
    assert bench["steps_for"](1.5, args) == 12


def test_loop_passes_count_local_experts():
    """The dropless MoE runs its experts one by one in Python (compiler/ops.py: expert_ffn), so each local
    expert is a launch: 16 replicated, 8 per device when its weights are split over 2 (ep)."""
    from ultraplan.passes.host_cost import loop_passes
    from ultraplan.passes.sbp import Broadcast, Split

    b, t, d, k, e, f = 2, 4, 8, 2, 16, 6
    shapes = [(b, t, d), (b, t, k), (b, t, k), (e, f, d), (e, f, d), (e, d, f)]
    replicated = [(Broadcast(),)] * 6
    expert_parallel = [(Split(0),)] * 3 + [(Split(0),)] * 3
    assert loop_passes("expert_ffn", shapes, replicated, [2]) == 16
    assert loop_passes("expert_ffn", shapes, expert_parallel, [2]) == 8
    assert loop_passes("linear", [(b, t, d), (f, d)], [(Broadcast(),)] * 2, [2]) == 0


@pytest.mark.parametrize("strategy, local_experts", [("dp", 16), ("ep", 8)])
def test_loop_pass_and_collective_terms_count_experts_and_calls(calibrated, strategy, local_experts):
    """overhead_time's ``loop_pass`` coefficient is each MoE layer's local experts, forward and again
    backward (ops.expert_ffn and runtime.expert_parallel_ffn loop over them), and each
    ``coll_<kind>_<group size>``'s is the step's calls of that kind on groups of that size (2 here), read
    off the plan's own list."""
    import sympy

    hw = load_hardware_spec(calibrated)
    spec = api.load("moe-tiny")
    plan, _, _ = make_plan(spec, hw, Mesh((2,)), strategies=(strategy,))
    # 2 ranks on the spec's 2 cores: oversub 1 (tests/unit/test_host_terms.py prices it above 1)
    overhead = sympy.expand(sympy.sympify(plan.total("overhead_time").expr).subs(
        {sympy.Symbol("n0"): 2, sympy.Symbol("oversub"): 1}))
    moe_layers = sum(n.op.startswith("expert_ffn") for n in plan.nodes)
    assert moe_layers == 2  # specs/models/moe-tiny.yaml: {block: moe, repeat: 2}
    assert overhead.coeff(sympy.Symbol("loop_pass")) == 2 * moe_layers * local_experts
    kinds: dict[str, int] = {}
    for c in plan.collectives:
        assert c.group_size == 2
        kinds[c.collective] = kinds.get(c.collective, 0) + 1
    assert kinds and all(overhead.coeff(sympy.Symbol(f"coll_{kind}_2")) == n for kind, n in kinds.items())
    assert not any(overhead.coeff(sympy.Symbol(f"coll_{kind}")) for kind in kinds)
    assert overhead.coeff(sympy.Symbol("coll_overhead")) == 0


def test_refit_with_rates_times_the_matmuls_first_and_fits_with_them(calibrated, monkeypatch):
    """calibrate.refit(rates=True): peak_flops is rewritten from the worker's matmul rates (the largest
    size's median per dtype) before op_overhead is fitted, so the fit models the compute at the new rate;
    every other figure is kept."""
    import ultraplan.calibrate as calibrate

    before = load_hardware_spec(calibrated)
    seen = []

    def fake_measure(nproc, quick, only_matmul=False):
        assert only_matmul and not quick and nproc == 2
        return {"matmul": {"float32": {"256": [1e10], "512": [3e10, 5e10, 4e10]}, "bfloat16": {"512": [2e10]}}}

    def fake_fit(spec, nproc, steps, floor=None):
        seen.append(load_hardware_spec(spec).peak_flops)
        return {"op_overhead": 5.5e-4, "reference_measured": 0.0617}

    monkeypatch.setattr(calibrate, "measure", fake_measure)
    monkeypatch.setattr(calibrate, "fit_op_overhead", fake_fit)
    calibrate.refit(calibrated, 2, rates=True)
    assert seen == [{"fp32": 4e10, "bf16": 2e10}]
    after = load_hardware_spec(calibrated)
    assert "peak_flops timed again" in calibrated.read_text()
    assert dataclasses.replace(after, peak_flops=before.peak_flops, op_overhead=before.op_overhead) == before


def test_refit_rewrites_op_overhead_only_and_keeps_the_first_floor(calibrated, tmp_path, monkeypatch):
    """calibrate.refit: of the spec's figures only op_overhead changes (to the new fit), a note says
    when; the fit's floor is the first calibration's (in the comment), not the spec's fitted figure."""
    import ultraplan.calibrate as calibrate

    text = calibrated.read_text().replace("(not yet: a tiny op's forward + backward)",
                                          "(70.0 ms measured, 74 launches; floor 43.2 us, a tiny op's forward + backward)")
    calibrated.write_text(text)
    (tmp_path / "first.yaml").write_text(text)
    floors = []

    def fake_fit(spec, nproc, steps, floor=None):
        floors.append(floor)
        return {"op_overhead": 5.5e-4, "reference_measured": 0.0617}

    monkeypatch.setattr(calibrate, "fit_op_overhead", fake_fit)
    for _ in range(2):  # twice: one note, not two
        assert calibrate.refit(calibrated, 2)["op_overhead"] == 5.5e-4
    assert floors == [pytest.approx(43.2e-6)] * 2
    after = calibrated.read_text()
    assert after.count("# op_overhead refitted") == 1 and "61.7 ms measured" in after
    hw = load_hardware_spec(calibrated)
    assert hw.op_overhead == 5.5e-4
    first = load_hardware_spec(tmp_path / "first.yaml")
    assert dataclasses.replace(hw, op_overhead=2.0e-4, source=first.source) == first


def test_a_calibration_fits_op_overhead_on_the_median_reference_run(calibrated, monkeypatch):
    """calibrate.median_fit: the fit of the run with the median figure, not the first (one run at a slow
    minute set a whole calibration's level); a full calibration runs the reference REFERENCE_RUNS times."""
    import ultraplan.calibrate as calibrate

    figures = iter([9e-4, 3e-4, 4e-4])
    calls = []

    def fake_fit(spec, nproc, steps, floor=None):
        calls.append((nproc, steps, floor))
        value = next(figures)
        return {"op_overhead": value, "reference_measured": value * 100}

    monkeypatch.setattr(calibrate, "fit_op_overhead", fake_fit)
    fitted = calibrate.median_fit(calibrated, 2, 12, calibrate.REFERENCE_RUNS, floor=5e-5)
    assert calibrate.REFERENCE_RUNS == 3 and calls == [(2, 12, 5e-5)] * 3
    assert fitted == {"op_overhead": 4e-4, "reference_measured": 4e-4 * 100}


def test_one_device_plan_on_a_calibrated_spec_prices_its_group_of_one(calibrated):
    """A one-device plan still calls its gradient all_reduce (on a group of one): a calibrated spec
    prices the call's launch and no wait for peers, so the plan's step time is a number (it had a free
    symbol ``coll_all_reduce_1`` before)."""
    hw = load_hardware_spec(calibrated)
    plan, _, _ = make_plan(api.load("dense-tiny"), hw, Mesh((1,)), strategies=("dp",))
    calls = len(plan.collectives)
    assert calls and {c.collective for c in plan.collectives} == {"all_reduce"}
    assert collective_figure(hw, "all_reduce", 1) == 0.0 and collective_figure(hw, "all_reduce", 2) == 3.0e-5
    assert float(plan.total("step_time").value) > 0


@pytest.mark.parametrize(("nproc", "links_from", "message"), [
    (1, None, "--nproc 1 times no collective"), (2, "h200-8", "--links-from is for --nproc 1"),
    (0, None, "--nproc must be at least 1")])
def test_calibrate_refuses_links_it_cannot_use(tmp_path, nproc, links_from, message):
    with pytest.raises(ValueError, match=message):
        calibrate(tmp_path / "x.yaml", nproc=nproc, links_from=links_from)
    assert not (tmp_path / "x.yaml").exists()
