"""Memory per device as a breakdown, and plans that say whether they fit (passes/memory.py)."""

from __future__ import annotations

import json

import pytest

from ultraplan import api
from ultraplan.cli import main

TERMS = ("memory_parameters", "memory_gradients", "memory_optimizer", "memory_gathered_parameters",
         "memory_activations")


@pytest.mark.parametrize("strategy", ["dp", "fsdp", "tp"])
def test_breakdown_sums_and_adamw_terms(strategy):
    plan = api.plan("dense-tiny", "2", strategy=strategy)
    t = {k: c.value for k, c in plan.totals}
    assert t["memory_per_device"] == pytest.approx(sum(t[k] for k in TERMS))
    params = sum(p.bytes_per_device.value for p in plan.params)
    assert t["memory_parameters"] == pytest.approx(params)
    assert t["memory_gradients"] == pytest.approx(params)
    assert t["memory_optimizer"] == pytest.approx(2 * params)  # AdamW: two fp32 moments
    assert (t["memory_gathered_parameters"] > 0) == (strategy == "fsdp")
    assert t["memory_activations"] > 0
    assert plan.fits and plan.device_memory == 1.6e10


def test_activations_scale_with_batch_and_split_over_dp():
    one, two = api.plan("dense-tiny", "1", batch=8), api.plan("dense-tiny", "1", batch=16)
    dp = api.plan("dense-tiny", "2", batch=16)
    act = lambda p: p.total("memory_activations").value  # noqa: E731
    assert act(two) == pytest.approx(2 * act(one), rel=0.01)
    assert act(dp) == pytest.approx(act(one), rel=0.01)


def test_plan_that_does_not_fit_says_so(capsys, tmp_path):
    assert main(["plan", "dense-100m", "--batch", "512", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["fits"] is False
    assert "warning:" in err and "largest term is memory_activations" in err
    assert main(["compile", "dense-100m", "--batch", "512", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--allow-oversubscribe" in err and "Traceback" not in err
    assert not (tmp_path / "x" / "program.py").exists()


def test_allow_oversubscribe_compiles(tmp_path, capsys):
    assert main(["compile", "dense-tiny", "--batch", "65536", "--allow-oversubscribe", "-o", str(tmp_path)]) == 0
    assert (tmp_path / "program.py").exists()
    assert "warning:" in capsys.readouterr().err


def test_fitting_plan_json_has_fits_true(capsys):
    assert main(["plan", "dense-tiny", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is True
    assert {k for k, _ in data["totals"]} >= set(TERMS)
