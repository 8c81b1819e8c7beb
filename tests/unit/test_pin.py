"""runtime.pin_to_cores: each of a node's CPU ranks on cores of its own (the real affinity is checked
on 4 gloo ranks in tests/dist/runtime_cases.py)."""

from __future__ import annotations

import pytest
from ultraplan.backends import runtime


@pytest.mark.parametrize(("cores", "world", "expected"), [
    ([0, 1], 2, [[0], [1]]),
    ([0, 1], 4, [[0], [1], [0], [1]]),  # more ranks than cores: round robin
    ([0, 1, 2, 3, 4, 5, 6, 7], 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),  # a block each
    ([0, 1, 2, 3, 4, 5, 6], 3, [[0, 1], [2, 3], [4, 5]]),  # the spare core left to the system
    ([5, 3, 9], 3, [[3], [5], [9]]),  # a taskset's cores, in order
    ([2, 3], 3, [[2], [3], [2]]),
])
def test_rank_cores(cores, world, expected):
    assert [runtime.rank_cores(cores, r, world) for r in range(world)] == expected
    # a core per rank where there are enough, and never a rank on more than its share
    assert all(len(set(c)) == len(c) for c in expected)


def test_pin_to_cores_sets_the_ranks_own_cores_once(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "HOST_CORES", None)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(runtime.os, "sched_setaffinity", lambda pid, cores: calls.append(list(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("ULTRAPLAN_PIN", raising=False)
    assert runtime.pin_to_cores() == [2, 3]
    # a second setup (another mesh in the same process) pins from the host's cores, not its own
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {2, 3})
    assert runtime.pin_to_cores() == [2, 3]
    assert calls == [[2, 3], [2, 3]]


@pytest.mark.parametrize(("env", "world"), [({"ULTRAPLAN_PIN": "0"}, "2"), ({"ULTRAPLAN_PIN": "Off"}, "2"),
                                           ({"ULTRAPLAN_PIN": "false"}, "4"), ({}, "1")])
def test_pin_to_cores_leaves_placement_alone(monkeypatch, env, world):
    """Asked not to, or one rank on the node (its threads may use every core)."""
    monkeypatch.setattr(runtime, "HOST_CORES", None)
    monkeypatch.setattr(runtime.os, "sched_setaffinity", lambda pid, cores: pytest.fail("pinned"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", world)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert runtime.pin_to_cores() is None
