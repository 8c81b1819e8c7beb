"""bench/plan_speed.py runs (at a tiny size, in seconds) so that it cannot rot."""

from __future__ import annotations

import json
import runpy

import pytest

from tests.conftest import ROOT


def test_plan_speed_bench_runs_on_a_tiny_spec(capsys):
    bench = runpy.run_path(str(ROOT / "bench" / "plan_speed.py"))
    results = bench["main"](["--spec", "dense-tiny", "--mesh", "2", "--hardware", "cpu", "--strategies", "dp,fsdp",
                               "--repeat", "1"])
    out = capsys.readouterr().out
    assert "machine:" in out and "s per plan" in out
    assert [r["strategy"] for r in results] == ["dp", "fsdp"]
    assert all(r["seconds"] > 0 and r["traced_peak_bytes"] > 0 and r["fits"] for r in results)


def test_attention_bench_runs_tiny(capsys):
    bench = runpy.run_path(str(ROOT / "bench" / "attention.py"))
    out = bench["main"](["--batch", "1", "--seq", "16", "--heads", "2", "--kv-heads", "1", "--head-dim", "4",
                         "--repeat", "1", "--device", "cpu"])
    assert "speedup" in capsys.readouterr().out
    # the fused attention does not keep the (B, H, T, T) probabilities (nor the causal mask)
    assert out["causal_attention_saved"] - out["sdpa_attention_saved"] >= 1 * 2 * 16 * 16 * 4


def test_plan_scale_bench_runs_on_a_tiny_spec(capsys):
    bench = runpy.run_path(str(ROOT / "bench" / "plan_scale.py"))
    results = bench["main"](["--cases", "dense-tiny:2:h200-8", "--warmup", ""])
    out = capsys.readouterr().out
    assert "machine:" in out and "s per plan" in out and "layers.0 x2: axis 0" in out
    (r,) = results
    assert r["seconds"] > r["search_seconds"] > 0 and r["fits"] and r["traced_peak_bytes"] > 0
    assert abs(r["objective"] - r["step_time"]) <= 1e-9 * r["step_time"]


def test_placement_bench_runs_tiny(capsys, tmp_path):
    bench = runpy.run_path(str(ROOT / "bench" / "placement.py"))
    rows = bench["main"](["--tiny", "--models", "moe-tiny", "--meshes", "2", "--plot", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert "| moe-tiny | 2 | infer | 64 | number |" in out and (tmp_path / "p.png").stat().st_size > 0
    by = {(r["placement"], r["mode"], r["batch"]): r for r in rows}
    assert by[("replicate", "infer", 64)]["bytes_per_token"] == 0  # replicated experts: inference sends nothing
    assert by[("number", "infer", 64)]["bytes_per_token"] > 0  # expert parallelism routes tokens
    assert by[("number", "train", 8)]["memory"] < by[("replicate", "train", 8)]["memory"]  # experts split
    chosen = bench["choose"](rows)
    assert chosen[("moe-tiny", "2", "infer", 64)] in {"number", "dim", "replicate"}


@pytest.mark.slow  # a quick one-rank calibration and two runs of a program (about 35 s)
def test_gpu_step_time_bench_runs_tiny(capsys, tmp_path):
    """bench/step_time_gpu.py's table on the CPU (one tiny spec, two batches, calibrated as one device):
    each row the plan's step time under the calibrated spec (the run's ``step_time_predicted_s``), under
    the datasheet spec, and the measured one; its GPU figures come from tools/gpu_check.sh."""
    from ultraplan import api

    bench = runpy.run_path(str(ROOT / "bench" / "step_time_gpu.py"))
    out = tmp_path / "rows.json"
    rows = bench["main"](["--specs", "dense-tiny", "--batches", "2", "4", "--hardware", "cpu", "--steps", "4",
                          "--calibrate", "--quick", "--json-out", str(out)])
    text = capsys.readouterr().out
    assert "| dense-tiny | 4 | torch |" in text and "against the plans under this cpu calibrated (links: cpu's)" in text
    assert [(r["batch"], r["kernels"]) for r in rows] == [(2, "torch"), (4, "torch")]
    assert all(r["predicted_s"] > 0 and r["measured_s"] > 0 and len(r["step_times_s"]) == 4 for r in rows)
    assert rows[1]["predicted_s"] > rows[0]["predicted_s"]  # twice the tokens, more modelled time
    assert [r["datasheet_s"] for r in rows] == [api.plan("dense-tiny", "1", batch=b).total("step_time").value
                                                for b in (2, 4)]
    # the calibrated spec adds the host terms (op launches, the optimizer): more than FLOPs and links alone
    assert all(r["predicted_s"] > r["datasheet_s"] for r in rows)
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and "op_overhead:" in saved["calibrated_spec"]


@pytest.mark.slow  # a 2-rank job (about 10 s)
def test_collective_stretch_bench_times_calls_after_each_chain(capsys, tmp_path):
    """bench/collective_stretch.py on 2 gloo ranks: a row per chain length, its chain's seconds growing
    with the chain, each call's blocked time positive, the table printed and the JSON written."""
    bench = runpy.run_path(str(ROOT / "bench" / "collective_stretch.py"))
    out = tmp_path / "stretch.json"
    rows = bench["main"](["--nproc", "2", "--chains", "8", "200", "--windows", "2", "--json-out", str(out)])
    assert [r["chain"] for r in rows] == [8, 200] and rows[1]["chain_s"] > rows[0]["chain_s"] > 0
    assert all(len(r["added_windows_s"]) == 2 and 0 < r["blocked_p50_s"] <= r["blocked_p90_s"] for r in rows)
    assert "1 KiB all_reduce on 2 gloo ranks after chains of tiny ops" in capsys.readouterr().out
    assert json.loads(out.read_text())["rows"] == rows
