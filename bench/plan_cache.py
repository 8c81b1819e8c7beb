"""``api.plan`` for benches that plan one spec many times: load and lower once, plan a copy each time.

bench/auto_vs_named.py and bench/placement_vs_auto.py plan the same spec and mode at many meshes,
batches, strategies and pins. ``api.plan`` reads and validates the YAML and traces the model with
torch.fx on every call (0.04 s and 0.035 s a call warm for a tiny spec, 0.35 s to lower a paper spec), yet
the lowered graph does not depend on any of those: its shapes are symbolic in B and T, and every
pass reads the mesh, batch and strategy from the ``PlanContext``. ``CachedPlanner.plan`` keeps the
validated spec, its text and the lowered graph per (spec, mode) and runs the unchanged pipeline
(``passes.pipeline``: ``make_context``, ``check_graph_sizes``, ``run_pipeline``, ``record_search``,
in ``make_plan``'s order) on a deep copy, node records included, since the passes fill those in
place. tests/unit/test_bench_planner.py checks it returns what ``api.plan`` returns.
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import fx
from ultraplan.compiler.schema import HardwareSpec, ModelSpec
from ultraplan.compiler.validate import load_model_spec
from ultraplan.compiler.yaml_guard import read_capped
from ultraplan.passes.context import Mesh
from ultraplan.passes.pipeline import check_graph_sizes, lower_spec, make_context, prepare_spec, record_search, run_pipeline
from ultraplan.passes.plan import Plan

from ultraplan import api
from ultraplan.paths import resolve_spec_path


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose node records are copies too: fx copies ``node.meta`` shallowly, and the passes
    write their analyses into the ``NodeInfo`` held there."""
    memo: dict[int, object] = {}
    out = copy.deepcopy(gm, memo)
    for old, new in zip(gm.graph.nodes, out.graph.nodes, strict=True):
        new.meta = copy.deepcopy(old.meta, memo)
    out.meta = copy.deepcopy(gm.meta, memo)
    return out


class CachedPlanner:
    """Plans like ``api.plan``; the spec (validated, sized) and its lowered graph are kept per mode."""

    def __init__(self) -> None:
        self._specs: dict[str, tuple[ModelSpec, str]] = {}
        self._graphs: dict[tuple[str, str], fx.GraphModule] = {}
        self._hardware: dict[str, HardwareSpec] = {}

    def spec(self, spec_path: str | Path) -> tuple[ModelSpec, str]:
        """The spec after the spec passes (size_ffn) and its text, read once."""
        key = str(resolve_spec_path(spec_path, "models"))
        if key not in self._specs:
            spec, _ = prepare_spec(load_model_spec(key))
            self._specs[key] = (spec, read_capped(key))
        return self._specs[key]

    def graph(self, spec_path: str | Path, mode: str) -> fx.GraphModule:
        """The lowered graph of the spec in ``mode``, as lowering made it (do not run passes on it)."""
        key = (str(resolve_spec_path(spec_path, "models")), mode)
        if key not in self._graphs:
            self._graphs[key] = lower_spec(self.spec(spec_path)[0], mode)
        return self._graphs[key]

    def plan(self, spec_path: str | Path, mesh: str = "1", *, hardware: str, batch: int | None = None,
             seq: int | None = None, mode: str = "train", strategy: str | None = None,
             force: list[str] | tuple[str, ...] | None = None) -> Plan:
        """What ``api.plan`` returns for the same arguments (its defaults for the ones not taken)."""
        spec, text = self.spec(spec_path)
        if hardware not in self._hardware:
            self._hardware[hardware] = api.load_hardware(hardware)
        parsed = Mesh.parse(mesh)
        ctx = make_context(spec, self._hardware[hardware], parsed, batch=batch, seq=seq, mode=mode, spec_text=text,
                           strategies=api.parse_strategy(strategy, parsed), forces=api.parse_forces(force))
        gm = copy_graph(self.graph(spec_path, mode))
        check_graph_sizes(gm, ctx)
        run_pipeline(gm, ctx)
        if "ultraplan.search" in gm.meta and "ultraplan.plan" in gm.meta:
            record_search(gm, ctx)
        return gm.meta["ultraplan.plan"]
