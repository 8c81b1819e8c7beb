"""explain --crossover (passes/crossover.py, ultraplan/decision.py): the batch at which two candidate
signatures cost the same, solved symbolically, against a bisection over batches planned anew; and
plan --sweep (ultraplan/sweep.py) against plans made one by one."""

from __future__ import annotations

import pytest
import sympy
from ultraplan.passes.crossover import crossover
from ultraplan.passes.symbols import B

from ultraplan import api
from ultraplan.cli import main
from ultraplan.decision import decide, parse_decision
from ultraplan.sweep import changes, choices, parse_sweep, sweep

# a link whose latency is small beside its bandwidth's term, so that sharding the FFN's up
# projection (activations boxed, growing with B) beats replicating it (its gradient all-reduced,
# whatever B) up to a batch of about 15 at T = 4 (the closed form the test prints)
HARDWARE = """hardware:
  name: crossover-test
  devices_per_node: 8
  peak_flops: {fp32: 1.0e+11}
  memory_bytes: 1.6e+10
  memory_bandwidth: 2.0e+10
  intra_node: {bandwidth: 2.0e+9, latency: 1.0e-6}
  inter_node: {bandwidth: 1.0e+9, latency: 1.0e-5}
"""
DECISION = "layers_*_ffn_w_up=S(0)/B"


def test_crossover_of_two_lines():
    a, b = 3 * B + 10, 5 * B + 2  # equal at B = 4; a is dearer below, cheaper above
    found = crossover(a, b, {})
    assert found.points == (4.0,) and found.cheaper_below == "b"
    assert crossover(B + 1, B + 2, {}).points == ()


def test_crossover_without_closed_form_falls_back_to_bisection():
    a = sympy.Rational(1, 2) ** (B / 8) * 100  # a Pow in B: sympy.solve gives it up or solves it
    found = crossover(a, sympy.Integer(25), {})
    assert found.points == (pytest.approx(16.0),)


def test_parse_decision_names_the_form():
    assert parse_decision("x=S(0),B/B,B") == ("x", "S(0),B", "B,B")
    with pytest.raises(ValueError, match="NODE=SBP_A/SBP_B"):
        parse_decision("x=S(0)")


def test_symbolic_crossover_matches_a_bisection_over_replanned_batches(tmp_path):
    hardware = tmp_path / "hw.yaml"
    hardware.write_text(HARDWARE)
    plan_args = {"hardware": str(hardware), "seq": 4, "strategy": "dp"}
    d = decide("dense-tiny", "2", DECISION, **plan_args)
    assert d.result.symbolic and len(d.result.points) == 1
    root = d.result.points[0]
    assert 2 < root < 32

    def sharded_dearer(batch: int) -> bool:  # the numeric costs of the two plans made at this batch
        a, b = (api.plan("dense-tiny", "2", batch=batch, force=[f"layers_*_ffn_w_up={s}"], **plan_args)
                for s in ("S(0)", "B"))
        return a.total("step_time").value > b.total("step_time").value

    lo, hi = 2, 32  # even batches (the mesh splits them); sharded cheaper at lo, dearer at hi
    assert not sharded_dearer(lo) and sharded_dearer(hi)
    while hi - lo > 2:
        mid = (lo + hi) // 4 * 2
        lo, hi = (lo, mid) if sharded_dearer(mid) else (mid, hi)
    assert lo <= root <= hi
    assert d.result.cheaper_below == "a"


def test_explain_crossover_prints_the_point(tmp_path, capsys):
    hardware = tmp_path / "hw.yaml"
    hardware.write_text(HARDWARE)
    assert main(["explain", "dense-tiny", "--mesh", "2", "--seq", "4", "--hardware", str(hardware),
                 "--crossover", DECISION]) == 0
    out = capsys.readouterr().out
    assert "solved for B: B = " in out and "equal at B = " in out
    assert main(["explain", "dense-tiny", "--mesh", "2", "--crossover", "nonsense"]) == 2


def test_parse_sweep():
    assert parse_sweep("batch=1,8,64") == ("batch", [1, 8, 64])
    for bad in ("batch", "lr=1,2", "seq=a,b", "seq=0"):
        with pytest.raises(ValueError, match="--sweep"):
            parse_sweep(bad)


def test_changes_fold_layers():
    before = {"layers_0_q": "[B] -> [B]", "layers_1_q": "[B] -> [B]", "x": "[B]"}
    after = {"layers_0_q": "[S(0)] -> [S(0)]", "layers_1_q": "[S(0)] -> [S(0)]", "x": "[B]"}
    assert changes(before, after) == [("layers_*_q", "[B] -> [B]", "[S(0)] -> [S(0)]", 2)]


def test_sweep_points_are_the_plans_made_one_by_one(capsys):
    points = sweep("dense-tiny", "2", "batch", [2, 512], strategy="auto")
    for point in points:
        alone = api.plan("dense-tiny", "2", batch=point.value, strategy="auto")
        assert point.plan.total("step_time").value == alone.total("step_time").value
        assert choices(point.plan) == choices(alone)
    first, second = (choices(p.plan) for p in points)
    differ = {n for n in first if first[n] != second[n]}
    assert sum(c[3] for c in changes(first, second)) == len(differ)
    assert main(["plan", "dense-tiny", "--mesh", "2", "--strategy", "auto", "--sweep", "batch=2,512"]) == 0
    out = capsys.readouterr().out
    assert "step_time" in out
    assert (f"{len(differ)} change(s)" in out) if differ else ("none" in out)
