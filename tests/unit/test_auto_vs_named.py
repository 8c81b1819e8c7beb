"""bench/auto_vs_named.py, the cross product of auto against every named strategy combination: its
hardware per mesh, its verdict (checked on a stand-in planner whose numbers are known), and one real
case outside tests/unit/test_search.py's sample. The full product runs by hand (docs/search.md)."""

from __future__ import annotations

import runpy
from types import SimpleNamespace

import pytest
from ultraplan.passes.context import Mesh, PlanContext, PlanError

from tests.conftest import ROOT
from ultraplan import api

BENCH = runpy.run_path(str(ROOT / "bench" / "auto_vs_named.py"))


def test_meshes_beyond_one_node_are_priced_across_nodes():
    """2x4 stays on one h200-8 node; 8x8 goes to h200-128x8, whose axis 0 (ranks 8 apart) crosses
    InfiniBand and axis 1 (consecutive ranks) stays on NVLink."""
    assert [BENCH["hardware_for"](m) for m in ("2", "8", "2x4", "8x8")] == ["h200-8"] * 3 + ["h200-128x8"]
    hw = api.load_hardware("h200-128x8")
    ctx = PlanContext(spec=api.load("dense-tiny"), hardware=hw, mesh=Mesh((8, 8)), batch=8, seq=32)
    assert (ctx.axis_link(0), ctx.axis_link(1)) == (hw.inter_node, hw.intra_node)
    assert hw.inter_node.bandwidth < hw.intra_node.bandwidth
    assert BENCH["named_combinations"]("2x4")[:3] == ["dp,dp", "dp,fsdp", "dp,tp"]
    assert len(BENCH["named_combinations"]("2x4")) == 25 and len(BENCH["named_combinations"]("8")) == 5


def fake_plan(step: float, fits: bool = True, objective: float | None = None):
    totals = {"step_time": step, "search_objective": step if objective is None else objective}
    return SimpleNamespace(fits=fits, total=lambda key: SimpleNamespace(value=totals[key]))


@pytest.mark.parametrize("auto_step, objective, ok", [(1.0, None, True), (1.0 + 1e-12, None, True),
                                                      (1.1, None, False), (1.0, 0.9, False)])
def test_the_verdict_flags_a_fitting_named_plan_that_beats_auto(monkeypatch, auto_step, objective, ok):
    """Named plans at 1.0 s (tp), 2.0 s (dp) and 0.5 s not fitting (fsdp), sp and ep refused: auto
    loses above 1.0 s beyond the 1e-9 tolerance, or when its objective is not its step time."""
    named = {"dp": fake_plan(2.0), "tp": fake_plan(1.0), "fsdp": fake_plan(0.5, fits=False)}

    def plan(spec, mesh, *, hardware, batch, mode, strategy):
        if strategy == "auto":
            return fake_plan(auto_step, objective=objective)
        if strategy not in named:
            raise PlanError(f"{strategy} does not apply")
        return named[strategy]

    monkeypatch.setattr(api, "plan", plan)
    r = BENCH["compare"]("dense-tiny", "4", 8, "train")
    assert r["named"] == {"dp": 2.0, "tp": 1.0} and r["refused"] == 2 and r["hardware"] == "h200-8"
    assert r["ok"] is ok
    assert r["beaten_by"] == ({"tp": 1.0} if auto_step > 1.0 + 1e-6 else {})


def test_one_real_case():
    """gpt2-tiny (learned positions, GELU, biases) inferring one sequence on 2 devices: auto is at
    most the best of the five named plans, and its objective is its step time."""
    r = BENCH["compare"]("gpt2-tiny", "2", 1, "infer")
    assert r["ok"] and r["named"], r
    assert r["auto"] <= min(r["named"].values()) * (1 + 1e-9)
