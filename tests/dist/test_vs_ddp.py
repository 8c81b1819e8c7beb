"""bench/vs_ddp.py runs (dense-tiny, a few steps, 2 gloo ranks) so that it cannot rot, and its two
sides train the same model: the emitted dp and fsdp programs' losses equal those of torch's
DistributedDataParallel and fully_shard on the eager module (the bench refuses otherwise)."""

from __future__ import annotations

import runpy

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_vs_ddp_bench_runs_on_a_tiny_spec(capsys):
    bench = runpy.run_path(str(ROOT / "bench" / "vs_ddp.py"))
    results = bench["main"](["--specs", "dense-tiny", "--steps", "3", "--warmup", "1"])
    out = capsys.readouterr().out
    assert "machine:" in out and "ratio" in out
    assert [(r["strategy"], r["baseline"]) for r in results] == [
        ("dp", "DistributedDataParallel"), ("fsdp", "fully_shard (FSDP2)")]
    assert all(r["program_s"] > 0 and r["torch_s"] > 0 for r in results)
    assert all(r["loss_rel_diff"] <= bench["LOSS_AGREEMENT"] for r in results)
    assert results[0]["buckets"] == 1  # dense-tiny's 462 kB of gradients: one 50 MiB bucket
