"""runtime.py's collectives and sharded ops on 4 gloo ranks, meshes (4,) and (2, 2).

One torchrun runs every case (tests/dist/runtime_cases.py); each rank asserts its own shard
against single-process float64 math (forward and backward), the bytes and calls counted per call,
and CommDebugMode's count of the collectives torch saw. This test reads what rank 0 wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, job_lock

pytestmark = pytest.mark.slow

MESHES = ([4], [2, 2])
CASES = ("setup", "shard_range", "data_windows", "collectives", "vocab_cross_entropy", "expert_parallel", "grad_buckets",
         "gather_group", "routed_pools", "params")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runtime")
    cmd = [sys.executable, str(ROOT / "tests" / "dist" / "driver.py"), "--nproc", "4",  # its launcher: driver.py
           "--script", str(ROOT / "tests" / "dist" / "runtime_cases.py"), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with job_lock():
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-6000:]
    return out


def test_every_case_ran_on_both_meshes(run):
    report = json.loads((run / "report.json").read_text())
    assert [(r["mesh"], r["case"]) for r in report] == [(m, c) for m in MESHES for c in CASES]


@pytest.mark.parametrize("mesh", MESHES)
def test_dump_gathers_every_rank(run, mesh):
    result = json.loads((run / f"dump-{'x'.join(map(str, mesh))}.json").read_text())
    assert result["world_size"] == 4 and result["losses"] == [1.0, 0.5] and result["steps"] == 2
    by_rank = result["comm_by_rank"]
    assert [r["bytes"]["probe"] for r in by_rank] == [0, 1, 2, 3]  # each rank's own counters
    # one all_reduce of 3 float64 per rank; dump's own gathering is not counted
    assert all(r["bytes"]["all_reduce"] == 24 and r["calls"] == {"all_reduce": 1} for r in by_rank)
    assert result["comm"] == by_rank[0]
    assert result["param_bytes"] == [8 * 4 * 4 // 4] * 4  # an (8, 4) float32 parameter, a quarter each
    assert len(result["init_peak_bytes"]) == 4
