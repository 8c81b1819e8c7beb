"""bench/plan_speed.py runs (at a tiny size, in seconds) so that it cannot rot."""

from __future__ import annotations

import runpy

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
