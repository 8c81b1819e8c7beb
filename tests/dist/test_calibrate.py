"""``ultraplan calibrate --quick`` on 2 gloo ranks writes a spec that loads, whose collective fit is the
ring model's (checked on the rows it measured), and whose prediction of a program it was not fitted
on lands near that program's measured step time.

The figures are from a shared, loaded machine, so the check is loose (a factor of 2; docs/cost-model.md
has the full table, within 25% on a quieter machine): it catches a term missing or counted twice (an
uncalibrated spec predicts these programs 10 to 50 times too fast), not noise."""

from __future__ import annotations

import statistics

import pytest

from ultraplan import api
from ultraplan.calibrate import calibrate, ring_terms
from ultraplan.compiler.validate import load_hardware_spec
from ultraplan.runner import run

pytestmark = pytest.mark.slow


def test_calibrated_spec_predicts_a_program_it_was_not_fitted_on(tmp_path):
    spec = tmp_path / "this-machine.yaml"
    figures = calibrate(spec, nproc=2, quick=True)
    hw = load_hardware_spec(spec)
    assert (hw.devices_per_node, hw.nodes) == (2, 1)
    assert hw.peak_flops["fp32"] > 1e8 and hw.memory_bandwidth > 1e7
    assert hw.op_overhead >= figures["op_overhead_floor"] > 0
    link = figures["link"]
    rows = figures["raw"]["collectives"]
    errors = [abs(m * link["latency"] + w / link["bandwidth"] - r["seconds"]) / r["seconds"]
              for r in rows for m, w in [ring_terms(r["kind"], r["n"], r["payload_bytes"])]]
    assert statistics.median(errors) == pytest.approx(link["median_rel_error"])
    # tp: not the reference program (dp), and its collectives and launches are others
    plan = api.compile("dense-tiny", "2", tmp_path / "tp", strategy="tp", hardware=str(spec))
    report = run(tmp_path / "tp", nproc=None, steps=6, seed=None, check=False, quiet=True, timed=True)
    assert report["ok"] and len(report["step_times_s"]) == 6
    measured, predicted = report["step_time_measured_s"], report["step_time_predicted_s"]
    assert predicted == plan.total("step_time").value
    assert 0.5 <= predicted / measured <= 2.0, (predicted, measured)
