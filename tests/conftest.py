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


# ---- parallel runs (pytest-xdist, `make test` runs `-n auto --dist loadgroup`) ---------------------------------
# Each worker is sent whole groups of tests: a group is the tests that share a module-scoped fixture (its
# multi-rank jobs are started once, on one worker), a unit-test file, or a multi-rank test that shares nothing.
# Groups go out longest first (GROUP_SECONDS, measured on 2 cores) so that no long job starts last.
GROUP_SECONDS = {
    "tests/dist/test_strategies.py[strategy_run]": 190, "tests/dist/test_multirank.py[rank_run]": 140,
    "tests/dist/test_multirank.py::test_100m_specs_train_on_the_cpu": 70, "tests/dist/test_placement.py[placement_run]": 60,
    "tests/dist/test_checkpoint.py[two_ranks]": 50, "tests/dist/test_runtime.py": 40,
    "tests/dist/test_checkpoint.py[four_ranks]": 35, "tests/dist/test_failures.py": 30,
    "tests/dist/test_model_features.py": 30,
}


def _module_fixtures(item: pytest.Item) -> list[str]:
    """The module-scoped fixtures ``item`` uses. Every parameter of one goes to one worker: the module's caches
    (the eager references every rank count compares with) then serve them all."""
    found = []
    for name in item.fixturenames:
        defs = item._fixtureinfo.name2fixturedefs.get(name)
        if defs and defs[-1].scope == "module":
            found.append(name)
    return found


def _groups(items: list[pytest.Item]) -> dict[pytest.Item, str]:
    """Each item's group: tests that share a module-scoped fixture (transitively) are one group,
    named by its member with the largest GROUP_SECONDS."""
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    keys = {}
    for item in items:
        file = item.nodeid.split("::")[0]
        shared = [f"{file}[{f}]" for f in _module_fixtures(item)]
        if not file.startswith("tests/dist/"):
            shared = [file]  # a unit-test file stays whole (module-level caches serve all its tests)
        elif not shared:
            shared = [item.nodeid.split("[")[0]]  # parametrized cases of one such test stay together
        for key in shared:
            a, b = find(shared[0]), find(key)
            if a != b:  # the root is the member expected to take longest
                a, b = sorted((a, b), key=lambda k: (-seconds(k), k))
                parent[b] = a
        keys[item] = shared[0]
    return {item: find(key) for item, key in keys.items()}


def seconds(group: str) -> float:
    """GROUP_SECONDS of a group, or of its file; a multi-rank group not listed goes before the unit files."""
    file = group.split("::")[0].split("[")[0]
    return GROUP_SECONDS.get(group, GROUP_SECONDS.get(file, 10 if file.startswith("tests/dist/") else 0))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist: mark each item's group and put the longest groups first (xdist sends groups in
    collection order; within a group the order is pytest's)."""
    if not hasattr(config, "workerinput"):
        return
    groups = _groups(items)
    first_seen: dict[str, int] = {}
    for item in items:
        first_seen.setdefault(groups[item], len(first_seen))
        item.add_marker(pytest.mark.xdist_group(groups[item].replace("@", "_")))
    items.sort(key=lambda it: (-seconds(groups[it]), first_seen[groups[it]]))


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
