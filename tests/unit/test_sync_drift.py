"""Sync drift (passes/sync_drift.py): each stretch of compute between sync points pays drift * its
square root; checked against the plan's own totals, by hand, and calibrate's fit of the drift."""

from __future__ import annotations

import dataclasses
import math

import pytest
import sympy
from ultraplan.compiler.validate import load_hardware_spec
from ultraplan.passes.context import Mesh
from ultraplan.passes.host_cost import collective_figure
from ultraplan.passes.pipeline import make_context, make_plan
from ultraplan.passes.sync_drift import Schedule, drift_figure, drift_symbol, drift_time

from tests.unit.test_host_terms import HOST
from ultraplan import api
from ultraplan.calibrate import solve_rising, step_of_op_overhead
from ultraplan.calibrate_fit import drift_fit
from ultraplan.calibrate_spec import render_spec

DRIFT = dataclasses.replace(HOST, host_cores=2, collective_drift={2: 0.02, 4: 0.03})


def test_stretches_run_forward_then_backward_in_reverse_and_end_at_the_step():
    a, b, c, x, y, z, opt = sympy.symbols("a b c x y z opt", positive=True)
    s = Schedule()
    s.busy(a, x)
    s.sync("forward", 2)
    s.busy(b, y)
    s.sync("backward", 4)  # a dual between b and c: the backward meets it after c's backward, before b's
    s.busy(c, z)
    assert s.stretches(8, opt) == [(a, 2), (b + c + z, 4), (y + x, 8), (opt, 8)]
    assert s.stretches(8, None) == [(a, 2), (b + c, 8)]  # inference: no backward, no optimizer
    assert drift_time([(a, 2), (b, 1)]) == drift_symbol(2) * sympy.sqrt(a)  # a group of one waits for no one


def test_a_drift_figure_is_its_groups_else_the_nearest_groups():
    assert drift_figure(DRIFT, 2) == 0.02 and drift_figure(DRIFT, 4) == 0.03
    assert drift_figure(DRIFT, 3) == 0.03  # as near both by ratio: the larger, more peers to wait for
    assert drift_figure(DRIFT, 64) == 0.03 and drift_figure(DRIFT, 1) == 0.0
    assert drift_figure(HOST, 4) == 0.0  # no collective_drift: no term


def plan(hardware, strategy: str, mesh: str = "4", spec: str = "dense-tiny", mode: str = "train"):
    return make_plan(api.load(spec), hardware, Mesh.parse(mesh), strategies=tuple(strategy.split(",")), mode=mode)[0]


def busy_and_optimizer(p, hardware) -> tuple[float, float]:
    """A training step's modelled seconds on a device but its collectives' (host_cost.py's terms from
    the plan's totals): the forward and backward's, and AdamW's (written out: per tensor and element,
    a rank's share of a core)."""
    oversub = max(1.0, p.mesh[0] / hardware.host_cores)
    calls = sum(hardware.op_overhead * oversub + collective_figure(hardware, c.collective, c.group_size)
                for c in p.collectives)
    elements = sum(q.bytes_per_device.value / 4 for q in p.params)
    optimizer = (hardware.optimizer_tensor * len(p.params) + hardware.optimizer_element * elements) * oversub
    total = sum(p.total(k).value for k in ("compute_time", "memory_time", "overhead_time")) - calls
    return total - optimizer, optimizer


def test_data_parallel_pays_its_two_stretches():
    """dp's forward and backward sync nowhere but at the end (the gradient buckets overlap): one
    stretch of all their busy time on the world of 4, then AdamW's; the term is the step's growth."""
    p, bare = plan(DRIFT, "dp"), plan(dataclasses.replace(DRIFT, collective_drift={}), "dp")
    busy, optimizer = busy_and_optimizer(p, DRIFT)
    drift = p.total("sync_drift_time").value
    assert drift == pytest.approx(0.03 * (math.sqrt(busy) + math.sqrt(optimizer)), rel=1e-9)
    assert p.total("step_time").value == pytest.approx(bare.total("step_time").value + drift, rel=1e-12)
    assert "sync_drift_time" not in dict(bare.totals)


def test_tensor_parallel_splits_the_step_at_each_blocking_call():
    """tp's all_reduces (forward, and their duals backward) are sync points: the same busy time cut in
    k + 2 stretches pays more than in one and at most sqrt(k + 2) times as much (Cauchy-Schwarz)."""
    p = plan(DRIFT, "tp")
    busy, optimizer = busy_and_optimizer(p, DRIFT)
    blocking = [c for c in p.collectives if c.phase in ("forward", "backward")]
    assert len(blocking) >= 4 and {c.group_size for c in blocking} == {4}
    drift = p.total("sync_drift_time").value - 0.03 * math.sqrt(optimizer)
    assert 0.03 * math.sqrt(busy) * 1.2 < drift <= 0.03 * math.sqrt((len(blocking) + 1) * busy) * (1 + 1e-9)
    assert p.total("sync_drift_time").value > plan(DRIFT, "dp").total("sync_drift_time").value


def test_inference_has_one_stretch_and_one_rank_none():
    p = plan(DRIFT, "dp", mode="infer")
    busy = sum(p.total(k).value for k in ("compute_time", "memory_time", "overhead_time")) - sum(
        DRIFT.op_overhead * 2 + collective_figure(DRIFT, c.collective, c.group_size) for c in p.collectives)
    assert p.total("sync_drift_time").value == pytest.approx(0.03 * math.sqrt(busy), rel=1e-9)
    assert plan(DRIFT, "dp", mesh="1").total("sync_drift_time").value == 0.0


def test_the_search_leaves_the_drift_out_and_says_so():
    """auto's objective is its step less the drift (docs/search.md: a stretch depends on every node's choice)."""
    p = plan(DRIFT, "auto", mesh="2")
    assert p.total("sync_drift_time").value > 0
    assert p.total("search_objective").value == pytest.approx(
        p.total("step_time").value - p.total("sync_drift_time").value, rel=1e-9)


def test_calibrate_fits_the_square_root_and_writes_it(tmp_path):
    rows = [{"n": n, "chain": chain, "busy_s": busy, "added_s": base + c * math.sqrt(busy)}
            for n, base, c in ((2, 5e-4, 0.02), (4, 6e-3, 0.035)) for chain, busy in ((8, 5e-5), (400, 2e-3), (1600, 9e-3))]
    assert drift_fit(rows) == pytest.approx({2: 0.02, 4: 0.035}, rel=1e-9)
    noisy = [dict(r, added_s=1e-3 - r["busy_s"]) for r in rows if r["n"] == 2]  # later calls quicker: no drift
    assert drift_fit(noisy) == {2: 0.0}
    from tests.unit.test_calibrate import FIGURES

    path = tmp_path / "measured.yaml"
    path.write_text(render_spec("measured", 4, FIGURES | {"collective_drift": drift_fit(rows), "drift_rows": rows},
                                {"threads_per_rank": 1}, "ultraplan calibrate -o x"))
    assert load_hardware_spec(path).collective_drift == pytest.approx({2: 0.02, 4: 0.035}, rel=1e-3)


def test_op_overhead_is_solved_through_the_square_roots():
    """calibrate's fit: the plan's step as a function of op_overhead is the plan's step at its spec's
    figure, and solving it for a step 20 ms longer finds the op_overhead whose plan has that step."""
    p = plan(DRIFT, "dp")
    ctx = make_context(api.load("dense-tiny"), DRIFT, Mesh((4,)), strategies=("dp",))
    step = step_of_op_overhead(p, ctx.values())
    assert step(DRIFT.op_overhead) == pytest.approx(p.total("step_time").value, rel=1e-9)
    target = p.total("step_time").value + 0.02
    fitted = solve_rising(step, target)
    again = plan(dataclasses.replace(DRIFT, op_overhead=fitted), "dp")
    assert again.total("step_time").value == pytest.approx(target, rel=1e-9)
    assert solve_rising(step, 0.0) == 0.0
