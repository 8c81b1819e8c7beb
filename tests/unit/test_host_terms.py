"""The per-collective-kind figures and the oversubscription term (passes/host_cost.py) against
hand-computed costs, and calibrate's reduction of its in-place rows to the per-kind figures.

oversub = max(1, ranks on the host / host cores): a rank's compute, copy traffic, op launches and
AdamW run at 1 / oversub of one core's rates; the collectives' in-place figures, measured with the
program's own rank count, are not scaled."""

from __future__ import annotations

import dataclasses
import statistics

import pytest
import sympy
from ultraplan.compiler.validate import load_hardware_spec
from ultraplan.passes.context import Mesh
from ultraplan.passes.host_cost import (
    COLL_KIND,
    COLL_OVERHEAD,
    OVERSUB,
    collective_figure,
    collective_rates,
    collectives_time,
    host_values,
)
from ultraplan.passes.pipeline import make_context, make_plan

from ultraplan import api
from ultraplan.calibrate_fit import ring_terms, summarise
from ultraplan.calibrate_spec import render_spec

HOST = dataclasses.replace(
    api.load_hardware("cpu"), name="shared-host", devices_per_node=4, peak_flops={"fp32": 4e10}, memory_bandwidth=5e9,
    op_overhead=1e-4, collective_overhead=1e-3, loop_pass=2e-4, optimizer_tensor=3e-5, optimizer_element=5e-9,
    collective_by_kind={"all_gather": 2e-3, "reduce_scatter": 3e-3})


# specs/hardware/this-machine-2.yaml as session 7's calibration wrote it (its figures, comment left out)
SESSION_7 = """hardware:
  name: this-machine-2
  devices_per_node: 2
  nodes: 1
  peak_flops: {fp32: 9.789e+09, bf16: 1.022e+10}
  memory_bytes: 1.264e+10
  memory_bandwidth: 1.509e+09
  op_overhead: 0.001337
  optimizer_tensor: 0.0004346
  optimizer_element: 6.548e-08
  collective_overhead: 0.002759
  loop_pass: 0.001596
  intra_node: {bandwidth: 6.119e+08, latency: 0.0003893}
  inter_node: {bandwidth: 6.119e+08, latency: 0.0003893}
"""


def test_a_spec_from_before_the_kinds_loads_and_plans_as_before(tmp_path):
    """Session 7's spec has neither field: every kind is priced at its one collective_overhead,
    oversub is 1, and dense-tiny dp plans at docs/cost-model.md's 139.3 ms (session 7's table)."""
    path = tmp_path / "this-machine-2.yaml"
    path.write_text(SESSION_7)
    hw = load_hardware_spec(path)
    assert (hw.host_cores, hw.collective_by_kind) == (0, {})
    values = host_values(hw, 2)
    assert values[OVERSUB] == 1.0
    assert {values[s] for s in COLL_KIND.values()} == {values[COLL_OVERHEAD]} == {hw.collective_overhead}
    step = api.plan("dense-tiny", "2", hardware=str(path), strategy="dp").total("step_time").value
    assert round(step * 1e3, 1) == 139.3


def test_collective_calls_are_priced_by_kind():
    """fsdp's 5 all_gathers, 5 reduce_scatters and 1 all_reduce on 4 ranks of a 2-core host: each a
    launch at oversub 2 (2 * 0.1 ms) and its kind's wait (all_reduce, not listed: collective_overhead)."""
    values = host_values(dataclasses.replace(HOST, host_cores=2), 4)
    calls = {"all_gather": 5, "reduce_scatter": 5, "all_reduce": 1}
    want = 5 * (2e-4 + 2e-3) + 5 * (2e-4 + 3e-3) + (2e-4 + 1e-3)
    assert float(collectives_time(calls).xreplace(values)) == pytest.approx(want, rel=1e-12)
    assert float(collectives_time(11).xreplace(values)) == pytest.approx(11 * (2e-4 + 1e-3), rel=1e-12)
    rates = collective_rates(values)
    assert rates == pytest.approx({"all_reduce": 1.2e-3, "all_gather": 2.2e-3, "reduce_scatter": 3.2e-3,
                                   "all_to_all": 1.2e-3}, rel=1e-12)


@pytest.mark.parametrize("cores, ranks, share", [(0, 4, 1.0), (4, 4, 1.0), (2, 4, 2.0), (2, 2, 1.0), (1, 4, 4.0),
                                                 (3, 4, 4 / 3)])
def test_oversub_is_ranks_per_core_at_least_one(cores, ranks, share):
    assert host_values(dataclasses.replace(HOST, host_cores=cores), ranks)[OVERSUB] == pytest.approx(share)


def test_oversubscription_scales_a_ranks_work_and_not_its_waits():
    """dense-tiny fsdp on 4 ranks: with 2 cores every per-core term doubles against 4 cores (compute,
    memory traffic, launches, AdamW) and the collectives' waits stay: overhead_time(2 cores) - waits =
    2 * (overhead_time(4 cores) - waits), the waits summed here from the plan's own collective list."""
    spec = api.load("dense-tiny")
    shared, _, _ = make_plan(spec, dataclasses.replace(HOST, host_cores=2), Mesh((4,)), strategies=("fsdp",))
    alone, _, _ = make_plan(spec, dataclasses.replace(HOST, host_cores=4), Mesh((4,)), strategies=("fsdp",))
    for total in ("compute_time", "memory_time"):
        assert shared.total(total).value == pytest.approx(2 * alone.total(total).value, rel=1e-12)
    assert shared.total("comm_time").value == pytest.approx(alone.total("comm_time").value, rel=1e-12)
    # build_plan hands host_times the calls by kind: each waits its kind's figure
    waits = sum(collective_figure(HOST, c.collective) for c in shared.collectives)
    assert shared.total("overhead_time").value - waits == pytest.approx(
        2 * (alone.total("overhead_time").value - waits), rel=1e-9)
    ctx = make_context(spec, dataclasses.replace(HOST, host_cores=2), Mesh((2,)), strategies=("fsdp",))
    assert ctx.values()[OVERSUB] == 1.0  # 2 ranks on 2 cores: each its own


def raw_measurements(in_place: list[dict], link_rows: list[dict]) -> dict:
    """The worker's JSON with the rates at placeholder values and the given collective rows."""
    return {"matmul": {"float32": {"256": [1e10]}}, "copy": [5e9], "op_overhead": [1e-5], "loop_pass": [2e-4],
            "optimizer": {"tensor": [3e-5], "element": [5e-9]}, "host_cores": 2, "threads_per_rank": 1,
            "collectives": link_rows + [dict(r, in_place=True) for r in in_place]}


def test_summarise_takes_each_kinds_in_place_time_beyond_the_link():
    """Link rows exactly on 1e-4 s per message + 1 GB/s; in place, each kind's rows (two sizes, two
    group sizes) exceed the link's formula by known amounts: the figure is their median, and
    collective_overhead the median of the kinds'."""
    lat, bw = 1e-4, 1e9

    def on_link(kind, n, payload):
        messages, wire = ring_terms(kind, n, payload)
        return messages * lat + wire / bw

    kinds = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
    link_rows = [{"kind": k, "n": n, "payload_bytes": p, "seconds": on_link(k, n, p)}
                 for k in kinds for n in (2, 4) for p in (1024, 65536, 2**20)]
    extra = {"all_reduce": [1e-3, 2e-3, 3e-3, 4e-3], "all_gather": [5e-3, 5e-3, 6e-3, 9e-3],
             "reduce_scatter": [2e-3, 2e-3, 2e-3, 2e-3], "all_to_all": [0.0, 1e-3, 1e-3, 1e-3]}
    in_place = [{"kind": k, "n": n, "payload_bytes": p, "seconds": on_link(k, n, p) + extra[k][i]}
                for k in kinds for i, (n, p) in enumerate([(2, 1024), (2, 65536), (4, 1024), (4, 65536)])]
    figures = summarise(raw_measurements(in_place, link_rows))
    want = {k: statistics.median(v) for k, v in extra.items()}
    assert figures["collective_by_kind"] == pytest.approx(want, rel=1e-6, abs=1e-9)
    for kind, v in extra.items():  # per group size: the first two rows are groups of 2, the last two of 4
        got = figures["collective_by_group"][kind]
        assert list(got) == [2, 4]
        assert [got[2], got[4]] == pytest.approx([statistics.median(v[:2]), statistics.median(v[2:])], abs=1e-9)
    assert figures["collective_overhead"] == pytest.approx(statistics.median(want.values()), rel=1e-6)
    assert figures["host_cores"] == 2


def test_the_rendered_spec_carries_the_kinds_and_the_cores(tmp_path):
    lat, bw = 1e-4, 1e9
    rows = [{"kind": "all_reduce", "n": 2, "payload_bytes": p, "seconds": 2 * lat + p / bw} for p in (1024, 2**20)]
    in_place = [{"kind": k, "n": 2, "payload_bytes": 1024, "seconds": 1e-3} for k in ("all_reduce", "all_gather")]
    figures = summarise(raw_measurements(in_place, rows)) | {"op_overhead": 1e-4}
    path = tmp_path / "m.yaml"
    path.write_text(render_spec("m", 4, figures, {"threads_per_rank": 1}, "ultraplan calibrate -o m.yaml"))
    hw = load_hardware_spec(path)
    assert hw.host_cores == 2 and set(hw.collective_by_kind) == {"all_reduce", "all_gather"}
    # an all_gather of 1 KiB shards on 2 ranks: one message, 1 KiB on the wire (the ring model)
    assert hw.collective_by_kind["all_gather"] == pytest.approx(1e-3 - lat - 1024 / bw, rel=1e-3)
    assert hw.collective_by_group == {k: {2: pytest.approx(v, rel=1e-3)} for k, v in hw.collective_by_kind.items()}


def test_an_unknown_kind_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(SESSION_7 + "  collective_by_kind: {all_gahter: 1.0e-3}\n")
    with pytest.raises(Exception, match="all_gahter"):
        load_hardware_spec(path)
    assert sympy.Symbol("coll_all_gather", nonnegative=True) == COLL_KIND["all_gather"]


def test_a_plan_prices_each_call_at_its_kinds_figure(tmp_path):
    """build_plan hands host_times the step's calls by kind, and the search prices each call at its
    kind's rate: dense-tiny fsdp on 2 ranks planned with all_gather at 2 ms and reduce_scatter at 3 ms
    costs, against the same spec with every kind at 1 ms, 1 ms more per all_gather and 2 ms more per
    reduce_scatter it issues (counted from the plan's own collectives), and auto's objective is its step."""
    flat = dataclasses.replace(HOST, collective_by_kind={})
    plans = {}
    for name, hw in (("kinds", HOST), ("flat", flat)):
        plans[name], _, _ = make_plan(api.load("dense-tiny"), hw, Mesh((2,)), strategies=("fsdp",))
    calls = {}
    for c in plans["kinds"].collectives:
        calls[c.collective] = calls.get(c.collective, 0) + 1
    assert calls.get("all_gather") and calls.get("reduce_scatter"), calls
    extra = calls["all_gather"] * 1e-3 + calls["reduce_scatter"] * 2e-3
    step = {k: p.total("step_time").value for k, p in plans.items()}
    assert step["kinds"] - step["flat"] == pytest.approx(extra, rel=1e-9)
    auto, _, _ = make_plan(api.load("dense-tiny"), HOST, Mesh((2,)), strategies=("auto",))
    assert auto.total("search_objective").value == pytest.approx(auto.total("step_time").value, rel=1e-9)


@pytest.mark.parametrize("line, field", [
    ("collective_by_group: {all_gather: {one: 1.0e-3}}", "collective_by_group.all_gather.one"),
    ("collective_by_group: {all_gather: {1: 1.0e-3}}", "collective_by_group.all_gather.1"),
    ("collective_by_group: {all_gather: {2: -1.0e-3}}", "collective_by_group.all_gather.2"),
    ("collective_by_group: {all_gahter: {2: 1.0e-3}}", "collective_by_group.all_gahter"),
    ("collective_by_group: {all_gather: 1.0e-3}", "collective_by_group.all_gather"),
    ("collective_drift: {1: 0.01}", "collective_drift.1"),  # passes/sync_drift.py's figure, per group size
    ("collective_drift: {2: -0.01}", "collective_drift.2"),
    ("collective_drift: 0.01", "collective_drift")])
def test_a_bad_group_figure_is_refused_naming_its_field(tmp_path, line, field):
    from ultraplan.compiler.errors import SpecError

    path = tmp_path / "bad.yaml"
    path.write_text(SESSION_7 + f"  {line}\n")
    with pytest.raises(SpecError, match=f"bad.yaml:15:.*hardware.{field}[:]"):
        load_hardware_spec(path)


GROUPS = dataclasses.replace(HOST, collective_by_group={"all_gather": {2: 4e-3, 8: 9e-3}, "all_reduce": {4: 6e-3}})


def test_a_calls_figure_is_its_group_sizes_else_the_nearest_sizes_else_its_kinds():
    assert collective_figure(GROUPS, "all_gather", 2) == 4e-3
    assert collective_figure(GROUPS, "all_gather", 8) == 9e-3
    assert collective_figure(GROUPS, "all_gather", 3) == 4e-3  # nearer 2 than 8 (by ratio)
    assert collective_figure(GROUPS, "all_gather", 4) == 9e-3  # as near both: the larger, more peers to wait for
    assert collective_figure(GROUPS, "all_gather", 64) == 9e-3
    assert collective_figure(GROUPS, "all_gather") == 2e-3  # no group named: collective_by_kind
    assert collective_figure(GROUPS, "reduce_scatter", 2) == 3e-3  # a kind without sizes: collective_by_kind
    assert collective_figure(GROUPS, "all_to_all", 2) == 1e-3  # neither: collective_overhead
    values = host_values(GROUPS, 8, groups=(2, 4, 8))
    rates = collective_rates(values)
    launch = 1e-4  # op_overhead at oversub 1 (no host_cores)
    assert rates["all_gather", 2] == pytest.approx(launch + 4e-3) and rates["all_reduce", 2] == pytest.approx(
        launch + 6e-3)
    assert rates["all_gather", 16] == rates["all_gather"] == pytest.approx(launch + 2e-3)  # no such group here
    with pytest.raises(KeyError, match="all_gahter"):
        rates["all_gahter"]


def test_a_plan_prices_each_call_at_its_groups_figure():
    """dense-tiny on 2x4, dp on the axis of 2 and fsdp on the axis of 4: each call waits its kind's
    figure on its own group's size. Against the same spec without ``collective_by_group`` the step
    moves by the sum, over the plan's own collectives, of (group figure - kind figure); and auto's
    objective on the 2x4 mesh is its step (the search prices the groups as the plan does)."""
    by_group = {"all_gather": {2: 4e-3, 4: 7e-3}, "reduce_scatter": {2: 1e-3, 4: 5e-3}, "all_reduce": {2: 3e-4, 4: 2e-3}}
    hw = dataclasses.replace(HOST, devices_per_node=8, collective_by_group=by_group)
    flat = dataclasses.replace(hw, collective_by_group={})
    spec = api.load("dense-tiny")
    plans = {name: make_plan(spec, h, Mesh((2, 4)), strategies=("dp", "fsdp"))[0] for name, h in
             (("groups", hw), ("flat", flat))}
    sizes = {(c.collective, c.group_size) for c in plans["groups"].collectives}
    assert {("all_reduce", 2), ("all_gather", 4), ("reduce_scatter", 4)} <= sizes, sizes
    extra = sum(collective_figure(hw, c.collective, c.group_size) - collective_figure(hw, c.collective)
                for c in plans["groups"].collectives)
    step = {k: p.total("step_time").value for k, p in plans.items()}
    assert step["groups"] - step["flat"] == pytest.approx(extra, rel=1e-9)
    auto, _, _ = make_plan(spec, hw, Mesh((2, 4)), strategies=("auto", "auto"))
    assert auto.total("search_objective").value == pytest.approx(auto.total("step_time").value, rel=1e-9)


def test_wire_factors_are_each_kinds_bandwidth_against_the_links():
    """Rows exactly on 1e-4 s per message and 1 GB/s, but all_gather's wire 3 times and all_to_all's 1.5
    times slower: against that link the factors are 3, 1.5 and 1; with them the link's formula gives
    every row's seconds back (calibrate_fit.in_link), and summarise writes them into the spec."""
    from ultraplan.calibrate_fit import in_link, wire_factors

    lat, bw = 1e-4, 1e9
    slow = {"all_gather": 3.0, "all_to_all": 1.5}
    rows = []
    for kind in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all"):
        for n in (2, 4):
            for payload in (1024, 65536, 2**20):
                messages, wire = ring_terms(kind, n, payload)
                rows.append({"kind": kind, "n": n, "payload_bytes": payload,
                             "seconds": messages * lat + slow.get(kind, 1.0) * wire / bw})
    link = {"latency": lat, "bandwidth": bw}
    factors = wire_factors(link, rows)
    assert factors == pytest.approx({"all_reduce": 1.0, "all_gather": 3.0, "reduce_scatter": 1.0, "all_to_all": 1.5},
                                    rel=1e-9)
    link["wire_factor"] = factors
    assert all(in_link(link, r) == pytest.approx(r["seconds"], rel=1e-9) for r in rows)
    figures = summarise(raw_measurements([], rows))
    assert figures["collective_wire_factor"]["all_gather"] > 2 * figures["collective_wire_factor"]["all_reduce"]
    assert figures["wire_fit_error"] < 0.05 < figures["link"]["median_rel_error"]


def test_a_plan_weighs_each_collectives_wire_by_its_kinds_factor():
    """dense-tiny on 2x4 (dp on the axis of 2, fsdp on the axis of 4), with all_gather's and
    reduce_scatter's wire 3 times the link's: the step grows by 2 * wire / bandwidth of each such
    collective the plan lists (its own bytes and link), every other collective unchanged; auto's
    objective on the mesh is its step (the search weighs the wire as the plan does)."""
    hw = dataclasses.replace(HOST, devices_per_node=8, collective_wire_factor={"all_gather": 3.0, "reduce_scatter": 3.0})
    flat = dataclasses.replace(hw, collective_wire_factor={})
    spec = api.load("dense-tiny")
    plans = {name: make_plan(spec, h, Mesh((2, 4)), strategies=("dp", "fsdp"))[0] for name, h in
             (("wire", hw), ("flat", flat))}
    bandwidth = hw.intra_node.bandwidth
    extra = sum(2 * c.wire_bytes.value / bandwidth for c in plans["wire"].collectives
                if c.collective in ("all_gather", "reduce_scatter"))
    assert extra > 0
    step = {k: p.total("step_time").value for k, p in plans.items()}
    assert step["wire"] - step["flat"] == pytest.approx(extra, rel=1e-9)
    auto, _, _ = make_plan(spec, hw, Mesh((2, 4)), strategies=("auto", "auto"))
    assert auto.total("search_objective").value == pytest.approx(auto.total("step_time").value, rel=1e-9)
    uncalibrated = dataclasses.replace(api.load_hardware("h200-8"), collective_wire_factor={"all_gather": 2.0})
    datasheet, _, _ = make_plan(spec, uncalibrated, Mesh((2, 4)), strategies=("auto", "auto"))
    assert datasheet.total("search_objective").value == pytest.approx(datasheet.total("step_time").value, rel=1e-9)
