"""The bytes autograd saves for the backward, measured in the emitted program (runtime.count_saved:
saved_tensors_hooks, each storage once, parameters excluded), agree with the plan's prediction
(memory_activations + memory_gathered_parameters, passes/memory.py) within 10%: every bundled tiny
spec on 1 rank, dense-tiny under dp, fsdp and tp on 2 ranks, and moe-tiny under ep on 2 ranks."""

from __future__ import annotations

import pytest

from tests.conftest import RUNNABLE_SPECS
from ultraplan import api
from ultraplan.runner import run

pytestmark = pytest.mark.slow

CASES = [(spec, "1", "dp") for spec in RUNNABLE_SPECS] + [("dense-tiny", "2", s) for s in ("dp", "fsdp", "tp")]
CASES.append(("moe-tiny", "2", "ep"))  # runtime.expert_parallel_ffn's own rule (passes/memory.py)


@pytest.mark.parametrize(("spec", "mesh", "strategy"), CASES)
def test_saved_activation_bytes_as_predicted(tmp_path, spec, mesh, strategy):
    api.compile(spec, mesh, tmp_path, strategy=strategy)
    report = run(tmp_path, nproc=None, steps=1, seed=None, check=True, quiet=True)
    assert report["ok"], report
    measured, predicted = report["saved_activation_bytes_measured"], report["saved_activation_bytes_predicted"]
    assert measured > 0
    assert abs(predicted - measured) <= 0.1 * measured, (measured, predicted)
