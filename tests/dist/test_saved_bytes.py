"""The bytes autograd saves for the backward, measured in the emitted program (runtime.count_saved:
saved_tensors_hooks, each storage once, parameters excluded), agree with the plan's prediction
(memory_activations + memory_gathered_parameters + memory_param_copies, passes/memory.py) within 10%:
every bundled tiny spec on 1 rank, in float32 and (a few) bf16, with the fused ops the plan chose.
One torchrun runs every case here (tests/dist/driver.py). The same bound is held where those programs
already run, on their first float32 step: tests/dist/test_multirank.py for RUNNABLE_SPECS under dp on 1
and 2 ranks, tests/dist/test_strategies.py on every strategy's programs (dense-tiny under fsdp, tp and sp
on 2 ranks, moe-tiny under ep in bf16, ...), tests/dist/test_model_features.py for olmoe-tiny under tp
(each device's share of the experts' width) and ep; tests/unit/test_memory.py checks each op's rule exactly."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from tests.conftest import MODELS, ROOT, RUNNABLE_SPECS
from tests.dist.test_multirank import torchrun
from tests.unit.test_precision import bf16_spec
from ultraplan import api
from ultraplan.runner import saved_report

pytestmark = pytest.mark.slow

TINY = sorted({*RUNNABLE_SPECS, "gpt2-tiny", "olmoe-tiny", "bytes-tiny"})
BF16_ONE_RANK = ("dense-gqa-tied", "olmoe-tiny", "peer-tiny", "ultramem-v2-tiny")
CASES = {  # rank count: (spec, strategy, bf16); RUNNABLE_SPECS under dp: test_multirank's programs (docstring)
    1: [(spec, "dp", False) for spec in TINY if spec not in RUNNABLE_SPECS] + [(spec, "dp", True) for spec in BF16_ONE_RANK],
}


def test_every_bundled_tiny_spec_is_a_case():
    bundled = {p.stem for p in MODELS.glob("*.yaml") if "tiny" in p.stem} | {"dense-gqa-tied", "dense-deep-groups"}
    assert bundled <= set(TINY), sorted(bundled - set(TINY))


@functools.cache
def _run(nproc: int, root: str) -> list[tuple[tuple, dict]]:
    cases = []
    for spec, strategy, bf16 in CASES[nproc]:
        out = Path(root) / f"{spec}__{strategy}{'__bf16' if bf16 else ''}"
        path = bf16_spec(Path(root), spec) if bf16 else MODELS / f"{spec}.yaml"
        api.compile(path, str(nproc), out, strategy=strategy)
        cases.append(((spec, strategy, bf16), {"dir": str(out), "steps": 1, "dtype": "float32",
                                               "dump": str(out / "result.json")}))
    manifest = Path(root) / "manifest.json"
    manifest.write_text(json.dumps([case for _, case in cases]))
    result = torchrun(nproc, str(ROOT / "tests" / "dist" / "driver.py"), str(manifest))
    assert result.returncode == 0, result.stderr[-4000:]
    return cases


@pytest.mark.parametrize("nproc", sorted(CASES))
def test_saved_activation_bytes_as_predicted(nproc, tmp_path_factory):
    off = []
    for where, case in _run(nproc, str(tmp_path_factory.mktemp(f"saved{nproc}"))):
        report = saved_report(api.read_plan(case["dir"]), json.loads(Path(case["dump"]).read_text()))
        measured, predicted = report["saved_activation_bytes_measured"], report["saved_activation_bytes_predicted"]
        assert measured > 0, where
        if abs(predicted - measured) > 0.1 * measured:
            off.append((where, measured, predicted))
    assert not off, off
