"""--strategy auto on a calibrated spec: the host terms (passes/host_cost.py) in the search's objective.

A spec written by ``ultraplan calibrate`` prices per-op launches, memory traffic, loop passes,
collective calls and AdamW; the plan's ``step_time`` adds them, so the search must weigh them too
or it ranks plans by a different clock than the one it reports (it chose dp-like plans whose
modelled step was slower than a named strategy's). The figures below are this machine's order of
magnitude (specs/hardware/this-machine-2.yaml), large enough that the host terms are most of a step.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from ultraplan.compiler.validate import load_model_spec
from ultraplan.passes.context import Mesh
from ultraplan.passes.host_cost import host_rates
from ultraplan.passes.pipeline import make_context, make_plan
from ultraplan.passes.search_ilp import solve

from tests.conftest import ROOT
from tests.unit.test_search import brute_force, enumerate_all, ffn_slice_of
from ultraplan import api

MODELS = ROOT / "specs" / "models"
HOST_HEAVY = dataclasses.replace(
    api.load_hardware("cpu"), name="host-heavy", peak_flops={"fp32": 1e10, "bf16": 1e10}, memory_bandwidth=1.5e9,
    op_overhead=1e-3, collective_overhead=3e-3, loop_pass=1.5e-3, optimizer_tensor=4e-4, optimizer_element=6e-8)


def plan(spec: str, mesh: str, strategy: str, mode: str):
    result, _, _ = make_plan(load_model_spec(MODELS / f"{spec}.yaml"), HOST_HEAVY, Mesh.parse(mesh), mode=mode,
                             strategies=tuple(strategy.split(",")))
    return result


@pytest.mark.parametrize("spec,mesh,mode,rival", [("dense-tiny", "2", "train", "dp"), ("moe-tiny", "4", "infer", "ep")])
def test_the_objective_is_the_step_time_with_host_terms(spec, mesh, mode, rival):
    auto = plan(spec, mesh, "auto", mode)
    assert auto.total("overhead_time").value > auto.total("compute_time").value  # the host terms weigh
    assert math.isclose(auto.total("search_objective").value, auto.total("step_time").value, rel_tol=1e-9)
    # without the host terms the search chose plans slower than these named ones (0.1% and 2.6%)
    assert auto.total("step_time").value <= plan(spec, mesh, rival, mode).total("step_time").value * (1 + 1e-9)


def test_the_host_rates_are_the_host_formulas_per_unit():
    ctx = make_context(load_model_spec(MODELS / "dense-tiny.yaml"), HOST_HEAVY, Mesh.parse("2"), strategies=("auto",))
    for train, want in ((True, (3 / 1.5e9, 1e-3, 1.5e-3, 4e-4, 6e-8)), (False, (1 / 1.5e9, 1e-3, 1.5e-3, 0, 0))):
        assert dataclasses.astuple(host_rates(ctx.values(), train)) == pytest.approx(want, rel=1e-12)
    bare = make_context(load_model_spec(MODELS / "dense-tiny.yaml"), api.load_hardware("cpu"), Mesh.parse("2"),
                        strategies=("auto",))
    assert not host_rates(bare.values(), True).any


def test_the_integer_program_with_host_terms_equals_brute_force():
    """test_search's FFN slice (layer 0's three weights and four ops free, 2-3 candidates each,
    every other group fixed at the optimum) on the host-heavy spec: at most 3^7 assignments."""
    spec, parsed = load_model_spec(MODELS / "dense-tiny.yaml"), Mesh.parse("2")
    _, gm, _ = make_plan(spec, HOST_HEAVY, parsed, stop_after="annotate_cost", batch=64)
    ctx = make_context(spec, HOST_HEAVY, parsed, strategies=("auto",), batch=64)
    problem = ffn_slice_of(gm, ctx)
    choice, time = brute_force(enumerate_all(problem), problem.capacity)
    solved = solve(problem)
    assert math.isclose(solved.time, time, rel_tol=1e-9)
    assert sum(solved.choice) == sum(choice)
