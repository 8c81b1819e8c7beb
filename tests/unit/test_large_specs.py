"""The large bundled specs (specs/models/paper/ and *-100m): they build on the meta device with
the graph's parameter count, resolve by name, and plan without allocating weights."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
from ultraplan.compiler.build import build_model
from ultraplan.compiler.validate import load_model_spec
from ultraplan.passes.stats import spec_stats

from tests.conftest import MODELS
from ultraplan import api

PAPER = MODELS / "paper"
M = 10**6


@cache
def stats(name: str):
    return spec_stats(load_model_spec(PAPER / f"{name}.yaml"))


PAPER_SPECS = sorted(p.stem for p in PAPER.glob("*.yaml"))
SMALL_SPECS = ["dense-100m", "moe-100m", "pkm-100m", "peer-100m", "ultramem-100m", "ultramem-v2-100m"]


def test_paper_folder_is_covered():
    assert set(PAPER_SPECS) == {"olmoe-227m-1.2b", "memory-plus-227m-1.2b", "ultramem-227m-1.2b",
                                "ultramem-v2-227m-1.2b", "olmoe-1b-7b", "ultramem-v2-1b-7b",
                                "ultramem-v2-2.5b-120b-top256"}


@pytest.mark.parametrize("name", PAPER_SPECS)
def test_paper_spec_builds_on_meta(name):
    model = build_model(load_model_spec(PAPER / f"{name}.yaml"), device="meta")
    assert sum(p.numel() for p in model.parameters()) == stats(name).params


@pytest.mark.parametrize("name", SMALL_SPECS)
def test_100m_spec(name):
    s = load_model_spec(MODELS / f"{name}.yaml")
    st = spec_stats(s)
    assert 80 * M <= st.params <= 130 * M
    assert s.seq_len <= 256 and s.train.batch_size <= 16
    model = build_model(s, device="meta")
    assert sum(p.numel() for p in model.parameters()) == st.params
    family = name.removesuffix("-100m").replace("-", "_")
    kinds = {sub.kind for layer in s.layers for sub in layer.sublayers}
    assert (family == "dense" and kinds == {"attention", "ffn"}) or family in kinds


def test_paper_specs_resolve_by_name(tmp_path):
    assert api.resolve_spec_path("olmoe-1b-7b", "models") == PAPER / "olmoe-1b-7b.yaml"
    assert api.resolve_spec_path("paper/olmoe-1b-7b", "models") == PAPER / "olmoe-1b-7b.yaml"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text("model: {}\n")
    assert api.resolve_spec_path(tmp_path / "mine", "models") == tmp_path / "mine"  # a path is taken as written
    assert api.resolve_spec_path("olmoe-1b-*", "models") == Path("olmoe-1b-*")  # names are not patterns


def test_the_120b_spec_is_planned_without_allocating():
    """Planned for 8 H200s like any spec, on meta tensors: its gradient all-reduces carry every
    parameter once (4 bytes each), and the data-parallel plan's memory per device shows why a
    120B model needs its tables placed, not replicated (16 bytes per parameter > 141 GB)."""
    plan = api.plan(PAPER / "ultramem-v2-2.5b-120b-top256.yaml", "8", hardware="h200-8", batch=64)
    params = stats("ultramem-v2-2.5b-120b-top256").params
    assert sum(c.payload_bytes.value for p in plan.params for c in p.grad_sync) == 4 * params
    assert plan.total("memory_per_device").value >= 16 * params > 141e9  # weights, grads, Adam m and v, replicated


def test_moe_traffic_at_pretraining_batch_is_evaluated_quickly_and_exactly_enough():
    """(1 - k/E)^(B T) at B T = 4M tokens: exact substitution took minutes; evalf is used instead,
    and agrees with exact arithmetic where that is still cheap."""
    import sympy
    from ultraplan.passes.symbols import B, T, evaluate

    plan = api.plan(PAPER / "olmoe-1b-7b.yaml", "8", hardware="h200-8")  # B 1024 x T 4096
    assert 0 < plan.total("step_time").value < float("inf")
    expr = 64 * (1 - (1 - sympy.Rational(8, 64)) ** (B * T))
    assert evaluate(expr, {B: 3, T: 5}) == pytest.approx(float(expr.subs({B: 3, T: 5})), rel=1e-15)
