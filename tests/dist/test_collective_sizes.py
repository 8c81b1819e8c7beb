"""bench/collective_sizes.py runs (2 gloo ranks, small payloads) so that it cannot rot, and its formula
column is the plan's own price of a collective (passes/build_plan.collective_time), not a copy that
could drift from it."""

from __future__ import annotations

import runpy

import pytest

from tests.conftest import ROOT
from ultraplan import api

pytestmark = pytest.mark.slow


def test_the_formula_is_the_plans_price_of_the_call():
    bench = runpy.run_path(str(ROOT / "bench" / "collective_sizes.py"))
    hardware = api.load_hardware("cpu")
    plan = api.plan(api.resolve_spec_path("dense-tiny", "models"), "2", hardware="cpu", strategy="fsdp", mode="train")
    calls = [c for c in plan.collectives if c.collective in bench["KINDS"]]
    assert {c.collective for c in calls} >= {"all_gather", "reduce_scatter"}
    for c in calls:
        row = {"kind": c.collective, "n": c.group_size, "payload_bytes": c.payload_bytes.value}
        assert bench["formula"](hardware, row) == pytest.approx(c.time.value, rel=1e-9)


def test_the_bench_times_every_kind_both_ways(capsys):
    bench = runpy.run_path(str(ROOT / "bench" / "collective_sizes.py"))
    rows = bench["main"](["--hardware", "cpu", "--nproc", "2", "--sizes-mib", "0.0625,0.25", "--repeats", "1"])
    assert "machine:" in capsys.readouterr().out
    assert sorted({(r["kind"], r["buffer"]) for r in rows}) == [
        ("all_gather", "fresh"), ("all_gather", "reused"), ("all_reduce", "reused"),
        ("reduce_scatter", "fresh"), ("reduce_scatter", "reused")]
    assert {r["payload_bytes"] for r in rows} == {2**16, 2**18}  # 1/16 and 1/4 MiB a rank
    assert all(r["seconds"] > 0 and r["formula"] > 0 for r in rows)
