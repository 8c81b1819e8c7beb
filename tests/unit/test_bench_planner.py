"""The shortcuts bench/auto_vs_named.py and bench/placement_vs_auto.py take to run their whole grids:
the cached planner (bench/plan_cache.py) plans what ``api.plan`` plans, the parameter-state bound
that skips named plans in training is below every plan's memory, and the grid orders cover every
(spec, mesh) pair before repeating one. The comparisons themselves: tests/unit/test_auto_vs_named.py,
test_search.py and test_placement.py (samples), the benches (the grid, docs/search.md)."""

from __future__ import annotations

import dataclasses
import runpy
import sys

from tests.conftest import ROOT
from ultraplan import api

AUTO_VS_NAMED = runpy.run_path(str(ROOT / "bench" / "auto_vs_named.py"))
PLACEMENT = runpy.run_path(str(ROOT / "bench" / "placement_vs_auto.py"))
sys.path.insert(0, str(ROOT / "bench"))
from plan_cache import CachedPlanner  # noqa: E402

PLANNER = CachedPlanner()


def test_cached_plans_equal_api_plans_and_leave_the_cached_graph_alone():
    """Auto with a table pin on a 2-D mesh, and a named plan of the same spec and mode planned after
    it from the same cached graph: each equal to ``api.plan``'s, field by field (the passes fill the
    node records in place; a copy that shared them would carry the first plan's analyses into the
    second)."""
    cases = [("pkm-tiny", "2x2", dict(hardware="h200-2x8", batch=4, seq=1, mode="infer", strategy="auto",
                                      force=["layers.*.pkm.*=number,dim"])),
             ("pkm-tiny", "2x2", dict(hardware="h200-2x8", batch=4, seq=1, mode="infer", strategy="dp,tp"))]
    for spec, mesh, kwargs in cases:
        cached, direct = PLANNER.plan(spec, mesh, **kwargs), api.plan(spec, mesh, **kwargs)
        assert cached == direct, [f.name for f in dataclasses.fields(cached)
                                  if getattr(cached, f.name) != getattr(direct, f.name)]


def test_the_parameter_state_bound_is_below_every_training_plan():
    """16 B per parameter element over the devices: at most the memory of dp (all replicated), fsdp
    (all sharded, the bound's own case) and auto on moe-tiny over 4 H200s."""
    bound = AUTO_VS_NAMED["parameter_state_bound"](PLANNER, "moe-tiny", "4")
    assert bound > 0
    fsdp = None
    for strategy in ("dp", "fsdp", "auto"):
        plan = PLANNER.plan("moe-tiny", "4", hardware="h200-8", batch=8, mode="train", strategy=strategy)
        memory = plan.total("memory_per_device").value
        assert memory >= bound, (strategy, memory, bound)
        fsdp = memory if strategy == "fsdp" else fsdp
    assert fsdp < 4 * bound  # the bound is near a sharded plan's memory, not vacuous


def test_named_plans_are_skipped_only_when_the_bound_exceeds_the_device(monkeypatch):
    """A device of 1 kB: every named combination is skipped (not planned), recorded, and auto (which
    does not fit either) is still planned and checked against the bound."""
    small = dataclasses.replace(api.load_hardware("h200-8"), memory_bytes=1000.0)
    load = api.load_hardware
    monkeypatch.setattr(api, "load_hardware", lambda name=None: small if name == "h200-8" else load(name))
    r = AUTO_VS_NAMED["compare"]("dense-tiny", "2", 8, "train", None, CachedPlanner())  # reads the small one
    assert r["skipped_by_bound"] == 5 and r["named"] == {} and r["refused"] == 0, r
    assert r["fits"] is False and r["bound_holds"] and r["ok"], r


def test_grid_orders_cover_every_pair_before_repeating_one():
    specs, meshes = ["a", "b", "c"], ["2", "4", "8", "2x4", "8x8"]
    cases = AUTO_VS_NAMED["grid_order"](specs, meshes, [1, 8, 64, 512, 4096], ["train", "infer"])
    assert sorted(cases) == sorted((s, m, b, mode) for s in specs for m in meshes for b in (1, 8, 64, 512, 4096)
                                   for mode in ("train", "infer"))
    first = cases[:15]
    assert {(s, m) for s, m, _, _ in first} == {(s, m) for s in specs for m in meshes}
    assert {b for _, _, b, _ in first} == {1, 8, 64, 512, 4096} and {mode for *_, mode in first} == {"train", "infer"}
    for mesh in meshes:  # along a mesh, the specs alternate modes
        assert {mode for _, m, _, mode in first if m == mesh} == {"train", "infer"}
    meshes = PLACEMENT["FULL_MESHES"]
    cases = PLACEMENT["grid_order"](["a", "b"], meshes, PLACEMENT["FULL_BATCHES"])
    assert len(set(cases)) == len(cases) == 2 * 4 * 7
    first = cases[:8]
    assert {(s, m) for s, m, _, _ in first} == {(s, m) for s in ("a", "b") for m, _ in meshes}
    assert len({b for *_, b in first}) == 7


def test_a_table_group_is_every_layers_table_at_once():
    """placement_vs_auto forces one glob per table group: per-layer module names fold to ``*`` (the 120B
    spec's 24 ``memory_tables.layerN_ultramem_v2`` tables are one group, forced in 4 plans, not 96), and
    each glob matches every layer's table and nothing else."""
    import fnmatch

    names = ["layers.3.ultramem.*", "layers.12.ultramem.*", "memory_tables.layer3_ultramem_v2.*",
             "memory_tables.layer10_ultramem_v2.*", "memory_tables.ring.*", "layers.0.moe.w_*", "player3_x.*"]
    globs = PLACEMENT["group_globs"](names)
    assert globs == ["layers.*.moe.w_*", "layers.*.ultramem.*", "memory_tables.layer*_ultramem_v2.*",
                     "memory_tables.ring.*", "player3_x.*"]
    assert fnmatch.filter(["memory_tables.layer3_ultramem_v2.values", "memory_tables.layer10_ultramem_v2.keys",
                           "memory_tables.ring.values"], "memory_tables.layer*_ultramem_v2.*") == [
        "memory_tables.layer3_ultramem_v2.values", "memory_tables.layer10_ultramem_v2.keys"]
