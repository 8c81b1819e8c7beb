"""Gather groups (passes/gather_groups.py): a layer's fsdp gathers run as one all-gather and one
reduce-scatter, as FSDP2's FSDPParamGroup does, and the plan's figures count groups.

The references are independent of the pass: which parameters are stored sharded and used whole
(each ParamPlan's placements), their shapes, and the symbolic comm_time's latency coefficient.
"""

from __future__ import annotations

import math
import re

import sympy

from tests.conftest import MODELS
from ultraplan import api


def _gathered(plan) -> dict[int | None, list]:
    """Parameters stored split and used whole, by layer index (None: the model's own)."""
    out: dict[int | None, list] = {}
    for p in plan.params:
        if p.sbp != p.used:
            match = re.match(r"layers\.(\d+)\.", p.name)
            out.setdefault(int(match.group(1)) if match else None, []).append(p)
    return out


def test_one_group_per_layer_with_every_sharded_parameter_of_it():
    plan = api.plan(MODELS / "dense-tiny.yaml", "4", strategy="fsdp")
    gathered = _gathered(plan)
    layers = sorted(k for k in gathered if k is not None)
    assert [g.layer for g in plan.gather_groups if g.layer >= 0] == layers == [0, 1]
    n = 4
    for g in plan.gather_groups:
        if g.layer < 0:
            continue
        assert set(g.params) == {p.name for p in gathered[g.layer]} and len(g.params) == 9
        full = 4 * sum(math.prod(p.shape) for p in gathered[g.layer])  # float32
        gather, scatter = g.steps
        assert (gather.collective, gather.phase, gather.payload_bytes.value) == ("all_gather", "forward", full / n)
        assert (scatter.collective, scatter.phase, scatter.payload_bytes.value) == ("reduce_scatter", "backward", full)
    _, calls = plan.step_collectives()
    own = len(gathered.get(None, []))
    assert calls["all_gather"] == calls["reduce_scatter"] == len(layers) + own
    payload, _ = plan.step_collectives()
    assert payload["all_gather"] == sum(4 * math.prod(p.shape) / n for ps in gathered.values() for p in ps)


def test_latency_counts_groups_not_parameters():
    """One all-gather and one reduce-scatter ((n-1) messages each) per group and per model-level
    gathered parameter, plus the loss's all-reduce (2 (n-1))."""
    plan = api.plan(MODELS / "dense-tiny.yaml", "4", strategy="fsdp")
    lat0, n0 = sympy.Symbol("lat0"), sympy.Symbol("n0")
    units = len([g for g in plan.gather_groups if g.layer >= 0]) + len(_gathered(plan).get(None, []))
    assert units == len(plan.gather_groups)  # the model's own gathers are groups of one
    comm = sympy.sympify(plan.total("comm_time").expr)
    assert sympy.simplify(comm.diff(lat0) - (2 * units + 2) * (n0 - 1)) == 0


def test_program_spells_one_gather_per_block(tmp_path):
    api.compile(MODELS / "dense-tiny.yaml", "2", str(tmp_path), strategy="fsdp")
    text = (tmp_path / "program.py").read_text()
    plan = api.plan(MODELS / "dense-tiny.yaml", "2", strategy="fsdp")
    own = len(_gathered(plan).get(None, []))
    assert text.count("runtime.gather_group(") == len(plan.blocks) + own == 1 + 3
    assert "runtime.all_gather(" not in text
    assert "PLANNED_CALLS_PER_STEP = {'all_gather': 5, 'all_reduce': 1, 'reduce_scatter': 5}" in text
    # the last layer starts the gathers of the final norm and the head (Model.prefetch) as layers start the next one's
    assert "runtime.with_following(self.layers, 0, 2, after=self)" in text
    assert "runtime.prefetch_group((self.final_norm.weight,)" in text


def test_the_models_own_parameters_gather_as_groups():
    """Embedding, final norm and head: each its own group (the search prices their latency per
    parameter), those read only after the last layer prefetched by it; a tied embedding, read by
    the embedding and the head, is gathered once, where first used."""
    plan = api.plan(MODELS / "dense-tiny.yaml", "2", strategy="fsdp")
    own = {g.params: g.prefetch_after for g in plan.gather_groups if g.layer < 0}
    assert own == {("embed.weight",): -1, ("final_norm.weight",): 1, ("lm_head.weight",): 1}
    shapes = {p.name: p.shape for p in plan.params}
    for g in plan.gather_groups:
        if g.layer < 0:
            gather, scatter = g.steps
            assert gather.payload_bytes.value == 4 * math.prod(shapes[g.params[0]]) / 2 == scatter.payload_bytes.value / 2
    tied = api.plan(MODELS / "dense-gqa-tied.yaml", "2", strategy="fsdp")
    assert {g.params: g.prefetch_after for g in tied.gather_groups if g.layer < 0} == {
        ("embed.weight",): -1, ("final_norm.weight",): 2, ("final_norm.bias",): 2}


def test_dp_plans_have_no_groups():
    assert api.plan(MODELS / "dense-tiny.yaml", "4").gather_groups == ()
