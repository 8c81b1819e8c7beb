"""Shared fixtures: the repo root, bundled spec paths, and a helper to write spec text to a file."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "specs" / "models"
HARDWARE = ROOT / "specs" / "hardware"
RUNNABLE_SPECS = ["dense-tiny", "dense-gqa-tied", "dense-deep-groups", "moe-tiny", "pkm-tiny", "peer-tiny",
                  "ultramem-tiny", "ultramem-v2-tiny", "memory-plus-tiny"]


@pytest.fixture
def write_spec(tmp_path):
    """Write YAML text to ``tmp_path/name`` and return the path."""

    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


# ---- parallel runs (pytest-xdist: `make test` runs `-n auto --dist loadfile --no-loadscope-reorder`) -------------
# Each worker is sent whole files (a file's module-scoped multi-rank jobs then start once, on one worker, and its
# caches of eager references serve every rank count), longest first as FILE_SECONDS says (measured on 2 cores,
# rounded): xdist sends files in collection order, and a long job sent last would end the run alone.
# (xdist's finer --dist loadgroup does not group under pytest 9: it renames node ids through an attribute
# pytest 9 no longer reads.)
FILE_SECONDS = {
    "tests/dist/test_multirank.py": 230, "tests/dist/test_strategies.py": 190, "tests/dist/test_checkpoint.py": 85,
    "tests/dist/test_placement.py": 60, "tests/dist/test_runtime.py": 40, "tests/dist/test_failures.py": 30,
    "tests/dist/test_model_features.py": 30, "tests/dist/test_calibrate.py": 90,
    "tests/unit/test_bench.py": 60,  # bench/step_time_gpu.py's calibration and runs
}


def seconds(item: pytest.Item) -> float:
    """FILE_SECONDS of the item's file; a multi-rank file not listed goes before the unit-test files."""
    file = item.nodeid.split("::")[0]
    return FILE_SECONDS.get(file, 10 if file.startswith("tests/dist/") else 0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist: the longest files first (a stable sort: within a file pytest's order stays)."""
    if hasattr(config, "workerinput"):
        items.sort(key=lambda it: -seconds(it))


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist: one thread per worker; every worker of this run finds the job lock at the same path."""
    if hasattr(config, "workerinput"):
        # one core's share each: torch's intra-op threads (read when torch is first imported, after this) would
        # only contend with the other workers' tests and ranks
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        uid = config.workerinput["testrunuid"]
        os.environ["ULTRAPLAN_JOB_LOCK"] = str(Path(tempfile.gettempdir()) / f"ultraplan-jobs-{uid}.lock")


@contextlib.contextmanager
def job_lock(exclusive: bool = False):
    """Multi-rank jobs of parallel workers hold this lock shared; a test whose timing is what it checks
    (tests/dist/test_failures.py: a job ends within seconds) holds it alone, so no other worker's ranks
    slow it. Without xdist it does nothing."""
    path = os.environ.get("ULTRAPLAN_JOB_LOCK")
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
