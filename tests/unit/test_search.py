"""--strategy auto: the integer program against brute force, the search against the plan it makes,
clustering against the unclustered solve, auto against every named strategy, and its reasons."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter

import pytest
from ultraplan.compiler.node_info import info
from ultraplan.compiler.validate import load_model_spec
from ultraplan.passes.alternatives import plan_choices
from ultraplan.passes.context import Mesh
from ultraplan.passes.pipeline import make_context, make_plan
from ultraplan.passes.search import boundary_bound, build_problem
from ultraplan.passes.search_ilp import Demand, Problem, Use, evaluate, leanest, solve

from tests.conftest import ROOT
from ultraplan import api

MODELS = ROOT / "specs" / "models"


def annotated(spec_text: str | None = None, mesh: str = "2", hardware: str = "cpu", **kw):
    """The graph after annotate_cost and its context (what the search reads)."""
    spec = load_model_spec(MODELS / "dense-tiny.yaml", text=spec_text)
    hw, parsed = api.load_hardware(hardware), Mesh.parse(mesh)
    _, gm, _ = make_plan(spec, hw, parsed, stop_after="annotate_cost", **kw)
    ctx = make_context(spec, hw, parsed, strategies=("auto",) * len(parsed.shape), **kw)
    return gm, ctx


def restrict(problem: Problem, keep: dict[int, list[int]]) -> Problem:
    """The same problem with group g's candidates cut to ``keep[g]`` (indices renumbered, order kept)."""
    index = {g: {k: i for i, k in enumerate(ks)} for g, ks in keep.items()}

    def pick(values: list, g: int) -> list:
        return [values[k] for k in keep[g]] if values else values

    groups = [dataclasses.replace(gr, time=pick(gr.time, g), memory=pick(gr.memory, g), out=pick(gr.out, g),
                                  peak=pick(gr.peak, g)) for g, gr in enumerate(problem.groups)]
    demands = []
    for d in problem.demands:
        uses = []
        for u in d.uses:
            takes = {w: [index[u.group][k] for k in ks if k in index[u.group]] for w, ks in u.takes.items()}
            uses.append(dataclasses.replace(u, takes={w: ks for w, ks in takes.items() if ks}))
        demands.append(Demand(d.producer, d.count, uses, d.move, d.dual, d.saved, d.state))
    buckets = [dataclasses.replace(b, members=[(g, index[g][k], nbytes) for g, k, nbytes in b.members
                                               if k in index[g]]) for b in problem.buckets]
    return Problem(groups, demands, problem.capacity, problem.constant, buckets)


def enumerate_all(problem: Problem) -> list[tuple[list[int], float, float, bool]]:
    """Every assignment with its (time, memory, feasible), by ``evaluate`` (no linearisation)."""
    return [(list(c), *evaluate(problem, list(c))) for c in itertools.product(*(range(len(g.time))
                                                                              for g in problem.groups))]


def brute_force(table, capacity: float) -> tuple[float, list[int]]:
    """The cheapest assignment within ``capacity``; ties (within 1e-9): the smallest sum of indices."""
    fits = [(time, sum(c), c) for c, time, memory, ok in table if ok and memory <= capacity]
    best = min(t for t, _, _ in fits)
    return min((s, c) for t, s, c in fits if t <= best * (1 + 1e-9))[1], best


@pytest.fixture(scope="module", params=[None, 4096], ids=["50MiB-buckets", "4KiB-buckets"])
def ffn_slice(request):
    """dense-tiny on 2 devices at batch 64, every group fixed to the optimum except layer 0's FFN (7 nodes: its
    three weights and four ops), each cut to 2-3 candidates (all-B, the optimum's, the last): at most 3^7.
    With the default width (50 MiB) every key fits one bucket; with 4 KiB buckets the count grows with the bytes."""
    gm, ctx = annotated(mesh="2", batch=64, bucket_cap_bytes=request.param)  # batch 64: the fastest plan is not the leanest
    problem = ffn_slice_of(gm, ctx)
    return problem, enumerate_all(problem)


def ffn_slice_of(gm, ctx) -> Problem:
    """The unclustered problem with every group fixed to its optimum but layer 0's FFN (its three
    weights and four ops), each of those cut to 2-3 candidates (all-B, the optimum's, the last)."""
    problem, _, _, _ = build_problem(gm, ctx, {}, {}, cluster=False)
    full = solve(problem).choice
    names = {f"layers_0_ffn_{n}" for n in ("w_up", "up", "w_gate", "gate", "act", "w_down", "down")}
    free = [g for g, gr in enumerate(problem.groups) if gr.name in names]
    assert len(free) == 7
    keep = {g: (sorted({0, full[g], len(problem.groups[g].time) - 1}) if g in free else [full[g]])
            for g in range(len(problem.groups))}
    return restrict(problem, keep)


def test_the_integer_program_equals_brute_force(ffn_slice):
    problem, table = ffn_slice
    choice, time = brute_force(table, problem.capacity)
    solved = solve(problem)
    assert math.isclose(solved.time, time, rel_tol=1e-9)
    assert sum(solved.choice) == sum(choice)  # the tie-break: the smallest sum of candidate indices
    assert solve(problem).choice == solved.choice  # the same answer every run


def test_the_memory_row_binds_as_brute_force_says(ffn_slice):
    problem, table = ffn_slice
    free = solve(problem)
    below = [memory for _, _, memory, ok in table if ok and memory < free.memory]
    if problem.buckets[0].cap < 2**20:
        # 4 KiB buckets: gathering the FFN's weights (one latency per layer's gather group) beats
        # syncing their gradients in 4 KiB buckets, and is the leanest too: nothing to bind
        assert not below and free.memory == min(memory for _, _, memory, ok in table if ok)
        return
    tight = dataclasses.replace(problem, capacity=max(below))  # the unconstrained optimum no longer fits
    choice, time = brute_force(table, tight.capacity)
    solved = solve(tight)
    assert math.isclose(solved.time, time, rel_tol=1e-9) and solved.memory <= tight.capacity
    assert sum(solved.choice) == sum(choice)
    assert solved.time >= free.time * (1 - 1e-9) and solved.choice != free.choice


def test_an_edge_cost_is_paid_once_per_layout_as_choose_sbp_boxes():
    # one producer (layouts 0 or 1), two consumers both wanting layout 1: the boxing 0 -> 1 runs once
    from ultraplan.passes.search_ilp import Group

    groups = [Group("p", 1, [0.0, 5.0], [0, 0], [0, 1]), Group("a", 1, [0.0], [0], [2]), Group("b", 1, [0.0], [0], [3])]
    uses = [Use(1, {1: [0]}), Use(2, {1: [0]})]
    problem = Problem(groups, [Demand(0, 1, uses, {(0, 1): 3.0, (1, 1): 0.0})], 1.0)
    assert evaluate(problem, [0, 0, 0])[0] == 3.0  # not 6
    assert solve(problem).choice == [0, 0, 0]


@pytest.mark.parametrize("mesh,mode,spec", [("2x2", "train", "dense-tiny"), ("4", "infer", "moe-tiny"),
                                            ("2", "train", "ultramem-v2-tiny")])
def test_the_search_models_the_plan_it_makes(mesh, mode, spec):
    plan = api.plan(MODELS / f"{spec}.yaml", mesh, hardware="h200-8", mode=mode, strategy="auto")
    assert plan.strategy == ",".join(["auto"] * len(mesh.split("x")))
    assert math.isclose(plan.total("search_objective").value, plan.total("step_time").value, rel_tol=1e-9)


def test_clustering_loses_at_most_its_bound():
    text = (MODELS / "dense-tiny.yaml").read_text().replace("repeat: 2", "repeat: 4")
    gm, ctx = annotated(text, mesh="4", hardware="h200-8")
    whole, _, _, _ = build_problem(gm, ctx, {}, {}, cluster=False)
    tied, _, _, _ = build_problem(gm, ctx, {}, {}, cluster=True)
    assert len(tied.groups) < len(whole.groups) / 2
    exact, clustered = solve(whole).time, solve(tied).time
    assert exact <= clustered * (1 + 1e-9)
    assert clustered <= exact + boundary_bound(tied) + 1e-12
    assert boundary_bound(tied) > 0


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 24, 32])
def test_binary_runs_reach_every_number_of_layers(n):
    from ultraplan.passes.clusters import runs

    of = runs(n)
    sizes = [of.count(r) for r in range(max(of) + 1)]
    assert of == sorted(of) and len(of) == n and len(sizes) == n.bit_length()
    sums = {sum(c) for k in range(len(sizes) + 1) for c in itertools.combinations(sizes, k)}
    assert sums == set(range(n + 1))  # any number of the layers can take another layout


def test_a_knapsack_unties_identical_layers():
    # 4 identical layers, device memory between the leanest plan and the fastest: all four tied to
    # one choice must stay lean, where some of them could afford the faster layout. Tied in binary runs
    # (1 + 2 + 1 layers) the search reaches the unclustered optimum; search() does so when the memory binds.
    from ultraplan.passes.search import search

    text = (MODELS / "dense-tiny.yaml").read_text().replace("repeat: 2", "repeat: 4")
    gm, ctx = annotated(text, mesh="4", hardware="h200-8", batch=64)
    whole, _, _, _ = build_problem(gm, ctx, {}, {}, cluster=False)
    lean, fast = leanest(whole).memory, solve(dataclasses.replace(whole, capacity=math.inf)).memory
    capacity = lean + 0.7 * (fast - lean)
    tight = dataclasses.replace(ctx, hardware=dataclasses.replace(ctx.hardware, memory_bytes=capacity))
    tied, _, _, _ = build_problem(gm, tight, {}, {})
    split, _, cls, _ = build_problem(gm, tight, {}, {}, split=True)
    exact = solve(dataclasses.replace(whole, capacity=capacity))
    clustered, untied = solve(tied), solve(split)
    assert clustered.memory_binds and exact.memory_binds
    assert math.isclose(untied.time, exact.time, rel_tol=1e-9) and untied.memory <= capacity
    assert clustered.time > 1.5 * exact.time  # what the tie cost: the faster layout for none of the layers
    found = search(gm, tight, {}, {})
    assert math.isclose(found.objective, untied.time, rel_tol=1e-9) and found.group_of == cls
    downs = [found.cands[g][found.choice[g]].axes for n, g in found.group_of.items() if n.name.endswith("ffn_w_down")]
    assert len(downs) == 4 and len(set(downs)) > 1  # the layers did not all choose alike


def four_layers_in_tight_memory():
    """dense-tiny with 4 layers on 4 devices at batch 64, the device memory 70% of the way from its leanest
    plan's to its fastest's: a knapsack, where the tied layers' search splits (search.search)."""
    text = (MODELS / "dense-tiny.yaml").read_text().replace("repeat: 2", "repeat: 4")
    gm, ctx = annotated(text, mesh="4", hardware="h200-8", batch=64)
    whole, _, _, _ = build_problem(gm, ctx, {}, {}, cluster=False)
    lean, fast = leanest(whole).memory, solve(dataclasses.replace(whole, capacity=math.inf)).memory
    return gm, dataclasses.replace(ctx, hardware=dataclasses.replace(ctx.hardware, memory_bytes=lean + 0.7 * (fast - lean)))


def test_an_untied_search_out_of_time_is_no_worse_than_the_tied_answer(monkeypatch):
    # the untied program's branch and cut starts from the tied answer (search._hint), and search() keeps the
    # tied answer where the untied one is slower: with branch and cut stopped at once, the plan is the tie's
    # at worst (llama3-8b-shape on 2x4 at batch 8: 7.2226 s untied after 20 s, against 7.2118 s tied)
    from ultraplan.passes import search_bnb
    from ultraplan.passes.search import _hint, search

    gm, tight = four_layers_in_tight_memory()
    tied, cands, cls, _ = build_problem(gm, tight, {}, {})
    clustered = solve(tied)
    split, split_cands, split_cls, _ = build_problem(gm, tight, {}, {}, split=True)
    hint = _hint(split_cls, split_cands, {n: clustered.choice[g] for n, g in cls.items()},
                 {n: cands[g] for n, g in cls.items()})
    assert len(split.groups) > len(tied.groups) and hint is not None
    time, memory, ok = evaluate(split, hint)  # the same plan, priced by the untied program
    assert ok and math.isclose(time, clustered.time, rel_tol=1e-12) and math.isclose(memory, clustered.memory)
    monkeypatch.setattr(search_bnb, "MIP_SECONDS", 1e-4)
    found = search(gm, tight, {}, {})
    assert found.objective <= solve(tied).time * (1 + 1e-12)
    assert math.isclose(evaluate(found.problem, found.choice)[0], found.objective, rel_tol=1e-12)


def test_an_untied_answer_not_proven_in_time_is_not_taken(monkeypatch):
    # Where the untied program's branch and cut stops at its time limit, its incumbent depends on how
    # loaded the machine was (llama3-8b-shape on 2x4 at batch 8: 7.210899 s in one run, 7.210204 s in the
    # next). The plan is then the tied optimum, the same on every machine, and its gap what untying may
    # still gain (the tied answer against the bound no untying beats); a proven untied answer is taken.
    from ultraplan.passes import search as search_module

    gm, tight = four_layers_in_tight_memory()
    tied = solve(build_problem(gm, tight, {}, {})[0])
    assert tied.memory_binds and tied.time > tied.untied
    for gap in (1e-6, 0.0):
        def untied_solve(problem, hint=None, gap=gap, **kw):
            found = solve(problem, hint, **kw)
            if hint is None:
                return found
            return dataclasses.replace(found, time=found.time * 0.999, gap=gap)  # "better" than the tie

        monkeypatch.setattr(search_module, "solve", untied_solve)
        found = search_module.search(gm, tight, {}, {})
        if gap:
            assert found.choice == tied.choice and found.objective == tied.time
            assert found.gap == pytest.approx(tied.time - tied.untied, rel=1e-12)
        else:
            assert len(found.choice) > len(tied.choice) and found.gap == 0


def test_an_unproven_branch_and_cut_comes_back_without_its_tie_break_where_only_a_proof_is_taken(monkeypatch):
    # search() takes the untied split's answer only proven, so solve(proven_only=True) returns a branch
    # and cut stopped at its limit as it stands: its tie-break (up to TIE_BREAK_SECONDS more) would
    # polish an answer that is then discarded
    from ultraplan.passes import search_bnb, search_ilp

    gm, tight = four_layers_in_tight_memory()
    split = build_problem(gm, tight, {}, {}, split=True)[0]
    monkeypatch.setattr(search_bnb, "MIP_SECONDS", 1e-4)
    stages = []
    second = search_ilp._second_stage
    monkeypatch.setattr(search_ilp, "_second_stage", lambda *a, **kw: stages.append(1) or second(*a, **kw))
    found = solve(split, proven_only=True)
    assert found.status == "not proven" and found.gap > 0 and not stages
    time, memory, ok = evaluate(split, found.choice)
    assert ok and time == found.time and memory == found.memory and found.untied <= found.time
    assert solve(split).gap > 0 and stages  # without it, the tie-break runs on the same unproven answer


def test_a_tie_break_not_proven_in_time_keeps_the_first_stages_answer(monkeypatch):
    # The second stage (the least index sum among the optimal assignments) may need branch and cut, which
    # stops at TIE_BREAK_SECONDS; an incumbent held then depends on the machine's load, so an answer not
    # proven least gives way to the first stage's, optimal in time too and the same on every machine.
    # moe-tiny on 4 devices with 0.2 MiB gradient buckets reaches that branch and cut, and its proven
    # answer differs from the first stage's.
    from ultraplan.passes import search_ilp
    from ultraplan.passes.search import search

    spec = api.load("moe-tiny")
    hw, parsed = api.load_hardware("h200-8"), Mesh.parse("4")
    _, gm, _ = make_plan(spec, hw, parsed, stop_after="fuse", batch=64, bucket_cap_bytes=int(0.2 * 2**20))
    ctx = make_context(spec, hw, parsed, batch=64, strategies=("auto",), bucket_cap_bytes=int(0.2 * 2**20))
    real, firsts = search_ilp.mip, []

    def unproven(h, integrality, best, **kw):
        values, gap = real(h, integrality, best, **kw)
        if kw.get("seconds") != search_ilp.TIE_BREAK_SECONDS:
            return values, gap
        firsts.append(search_ilp.chosen(best, search_ilp.build(problem)[1]))
        assert gap == 0 and search_ilp.chosen(values, search_ilp.build(problem)[1]) != firsts[-1]
        return values, 1e-6  # the same answer, as if the proof had not come in time

    problem = build_problem(gm, ctx, {}, {})[0]
    proven = search(gm, ctx, {}, {})
    monkeypatch.setattr(search_ilp, "mip", unproven)
    kept = search(gm, ctx, {}, {})
    assert firsts and kept.choice == firsts[-1] != proven.choice
    assert kept.objective == pytest.approx(proven.objective, rel=1e-9)


def test_the_tied_programs_bound_holds_for_every_untying():
    # search() unties identical layers only when the tied answer lies above ``untied``, the tied program's
    # optimum with x relaxed (bucket counts whole where the root LP had them fractional). Untied
    # assignments average into relaxed tied ones, so no untying beats that bound: the unclustered
    # optimum (every layer free) stays at or above it, at device memories that bind or not. (Tiny
    # buckets on 2x2 take the whole-count path, but their unclustered solves take minutes.)
    text = (MODELS / "dense-tiny.yaml").read_text().replace("repeat: 2", "repeat: 4")
    gm, ctx = annotated(text, mesh="4", hardware="h200-8", batch=64)
    whole, _, _, _ = build_problem(gm, ctx, {}, {}, cluster=False)
    lean, fast = leanest(whole).memory, solve(dataclasses.replace(whole, capacity=math.inf)).memory
    for share in (0.3, 0.7, 2.0):
        capacity = lean + share * (fast - lean)
        tight = dataclasses.replace(ctx, hardware=dataclasses.replace(ctx.hardware, memory_bytes=capacity))
        tied = solve(build_problem(gm, tight, {}, {})[0])
        exact = solve(dataclasses.replace(whole, capacity=capacity))
        assert tied.untied <= exact.time * (1 + 1e-9) <= tied.time * (1 + 1e-9)
        assert tied.memory_binds == (share < 1)  # the memory row's dual, not its fill


def test_a_layer_whose_own_table_is_forced_is_not_tied_to_the_others():
    # unshared UltraMemV2 tables are the model's (memory_tables.layer{l}_*), outside the layers that read
    # them: a layer reading a table forced another way must be its own class, or the search ties it to
    # layouts made for the other layers' tables (the 120B on 8 H200s: 0.745 s tied against 0.99 ms free)
    from ultraplan.passes.clusters import count_blocks
    from ultraplan.passes.sbp import parse_nd

    text = (MODELS / "ultramem-v2-tiny.yaml").read_text().replace("share: ring, share_layers: 2, ", "")
    loaded = load_model_spec(MODELS / "ultramem-v2-tiny.yaml", text=text)
    hw, parsed = api.load_hardware("h200-8"), Mesh.parse("2")
    _, gm, _ = make_plan(loaded, hw, parsed, stop_after="fuse", batch=8)
    ctx = make_context(loaded, hw, parsed, batch=8, strategies=("auto",))
    tables = [n.name for n in gm.graph.nodes if n.name.startswith("memory_tables_layer2_")]
    assert tables
    _, _, free, _ = build_problem(gm, ctx, {}, {})
    _, _, pinned, _ = build_problem(gm, ctx, {}, {t: parse_nd("B") for t in tables})
    assert count_blocks(gm, free) == {"layers.0": 4}
    assert count_blocks(gm, pinned) == {"layers.0": 3, "layers.2": 1}


@pytest.fixture(scope="module")
def ultramem_v2_tiny_on_8():
    """ultramem-v2-tiny on 8 devices at batch 64 after fuse, its context, and its clustered problem."""
    loaded = load_model_spec(MODELS / "ultramem-v2-tiny.yaml")
    hw, parsed = api.load_hardware("h200-8"), Mesh.parse("8")
    _, gm, _ = make_plan(loaded, hw, parsed, stop_after="fuse", batch=64)
    ctx = make_context(loaded, hw, parsed, batch=64, strategies=("auto",) * len(parsed.shape))
    return gm, ctx, build_problem(gm, ctx, {}, {})


def test_ring_shared_memory_layers_cluster_within_their_bound(ultramem_v2_tiny_on_8):
    # UltraMemV2 layers reading one ring-shared value table differ only in where their rows start
    # (clusters.POSITIONS): they are one class, each member costs what its representative does in every
    # candidate, and the clustered optimum is within boundary_bound of the unclustered one
    from ultraplan.passes.clusters import POSITIONS

    gm, ctx, (tied, cands, cls, costing) = ultramem_v2_tiny_on_8
    whole, _, _, _ = build_problem(gm, ctx, {}, {}, cluster=False)
    masked = [n for n in cls if info(n).op in POSITIONS]
    assert len(masked) == 4 and len({cls[n] for n in masked}) == 1
    assert len({info(n).attrs["offset"] for n in masked}) == 4
    for node in masked:  # what the class's representative was priced at, node by node
        own = costing.candidates(node)
        assert [(c.time, c.memory, c.out) for c in own] == [(c.time, c.memory, c.out) for c in cands[cls[node]]]
    assert len(tied.groups) < len(whole.groups) / 2
    exact, clustered = solve(whole).time, solve(tied).time
    assert exact <= clustered * (1 + 1e-9)
    assert clustered <= exact + boundary_bound(tied) + 1e-12


NAMED = ("dp", "fsdp", "tp", "sp", "ep")


@pytest.mark.parametrize("spec,mesh,batch,mode,names", [
    ("moe-tiny", "4", 64, "train", NAMED), ("dense-gqa-tied", "8", 4096, "infer", NAMED),
    ("dense-tiny", "2x2", 8, "train", NAMED[:3])])  # a sample; bench/auto_vs_named.py runs the cross product
def test_auto_is_never_worse_than_a_named_strategy_that_fits(spec, mesh, batch, mode, names):
    auto = api.plan(MODELS / f"{spec}.yaml", mesh, hardware="h200-8", batch=batch, mode=mode, strategy="auto")
    assert auto.fits
    fits = 0
    for combination in itertools.product(names, repeat=len(mesh.split("x"))):
        try:
            plan = api.plan(MODELS / f"{spec}.yaml", mesh, hardware="h200-8", batch=batch, mode=mode,
                            strategy=",".join(combination))
        except api.PlanError:
            continue
        if plan.fits:
            fits += 1
            assert auto.total("step_time").value <= plan.total("step_time").value * (1 + 1e-9), combination
    assert fits >= 3


def test_a_large_model_on_eight_devices_needs_sharded_parameters():
    plan, gm, reports = make_plan(load_model_spec(MODELS / "llama3-8b-shape.yaml"), api.load_hardware("h200-8"),
                                  Mesh.parse("8"), batch=8, seq=4096, strategies=("auto",))
    dp = api.plan(MODELS / "llama3-8b-shape.yaml", "8", hardware="h200-8", batch=8, seq=4096, strategy="dp")
    assert not dp.fits and plan.fits
    split = sum(math.prod(p.shape) for p in plan.params if p.sbp != "B")
    assert split > 0.5 * sum(math.prod(p.shape) for p in plan.params)
    decisions = next(r for r in reports if r.name == "choose_sbp").decisions
    assert any("must be sharded to fit at all" in d for d in decisions)
    w_up = next(n for n in gm.graph.nodes if n.name == "layers_0_ffn_w_up")
    assert info(w_up).reason.startswith("auto: stored [S(") and "GiB per device >" in info(w_up).reason


def test_force_works_under_auto():
    free = api.plan(MODELS / "dense-tiny.yaml", "2", hardware="h200-8", strategy="auto")
    forced = api.plan(MODELS / "dense-tiny.yaml", "2", hardware="h200-8", strategy="auto",
                      force=["layers_*_ffn_w_up=S(1)"])
    ups = [p for p in forced.params if p.name.endswith("ffn.w_up")]
    assert ups and all(p.sbp == "S(1)" and p.used == "S(1)" for p in ups)
    assert math.isclose(forced.total("search_objective").value, forced.total("step_time").value, rel_tol=1e-9)
    assert forced.total("step_time").value >= free.total("step_time").value * (1 - 1e-9)


def test_auto_beside_a_named_axis_keeps_its_pins():
    plan = api.plan(MODELS / "dense-tiny.yaml", "2x2", hardware="h200-8", strategy="fsdp,auto")
    assert plan.strategy == "fsdp,auto"
    assert all(p.sbp.split(",")[0].startswith("S(") or p.sbp.split(",")[0] == "B" for p in plan.params)
    # fsdp's gathers: the plan sends one all-gather and one reduce-scatter per layer group
    # (passes/gather_groups.py), and the search pays their latency once per group as well
    assert plan.gather_groups
    assert math.isclose(plan.total("search_objective").value, plan.total("step_time").value, rel_tol=1e-9)


@pytest.mark.parametrize("mesh,bucket_mb,force", [("2x2", 0.004, []), ("2", 0.02, ["layers_*_w*=B"]),
                                                   ("4", 0.01, ["layers_*_w*=B"])])
def test_the_search_counts_gradient_buckets_exactly(mesh, bucket_mb, force):
    # small buckets: a key's gradients fill several (passes/buckets.py: ceil(clipped bytes / cap)), which
    # the search counts with an integer column per key, so its optimum is the plan's step time. On 2 and 4
    # devices the layers' matrices are kept whole (else gathering them, one latency per layer's gather
    # group, beats syncing their gradients in 10-20 KiB buckets, and one bucket is left)
    plan = api.plan(MODELS / "dense-tiny.yaml", mesh, hardware="h200-8", strategy="auto", bucket_mb=bucket_mb,
                    force=force)
    keys = Counter((tuple((s.collective, s.axis, s.src, s.dst) for s in b.steps), b.dtype) for b in plan.grad_buckets)
    assert max(keys.values()) >= 2
    assert math.isclose(plan.total("search_objective").value, plan.total("step_time").value, rel_tol=1e-12)


def test_the_knapsack_path_equals_plain_branch_and_cut(ultramem_v2_tiny_on_8):
    # memory rows that bind between the leanest and the fastest plan make the LP fractional: solve's path
    # there (the Lagrangian start, reduced-cost fixing, presolved MIP, the fixed tie-break) must reach the
    # optimum HiGHS's branch and cut finds on the untouched program (search_bnb.mip, no start, nothing fixed)
    from ultraplan.passes.search_bnb import chosen, mip, relaxation
    from ultraplan.passes.search_ilp import _highs, build, leanest

    problem = ultramem_v2_tiny_on_8[2][0]
    fast = solve(dataclasses.replace(problem, capacity=math.inf)).memory
    lean = leanest(problem).memory
    assert lean < fast
    fractional = 0
    for share in (0.2, 0.5):  # both fractional at the root (about 4 s in all on 2 cores)
        tight = dataclasses.replace(problem, capacity=lean + share * (fast - lean))
        lp, x, _ = build(tight)
        fractional += chosen(relaxation(_highs(lp))[1], x) is None
        reference = evaluate(tight, chosen(mip(_highs(lp), lp.integer, None)[0], x))
        solved = solve(tight)
        assert reference[2] and solved.memory <= tight.capacity
        assert math.isclose(solved.time, reference[0], rel_tol=1e-9)
    assert fractional  # the knapsack path ran


@pytest.mark.parametrize("spec,mesh,strategy,mode,bucket_mb", [
    ("dense-tiny", "2x2", "dp,tp", "train", 0.05),  # two bucket keys, one of several buckets
    ("dense-gqa-tied", "2x2", "fsdp,sp", "train", None),  # fsdp's gather groups beside a bucket key
    ("moe-tiny", "2x2", "dp,ep", "train", None),
    ("ultramem-tiny", "2", "dp", "train", 0.02),
    ("moe-tiny", "4", "ep", "infer", None),
])
def test_the_search_prices_a_named_plan_as_the_plan_does(spec, mesh, strategy, mode, bucket_mb):
    # auto <= every named plan by construction: the search's objective at the named plan's own choice
    # (alternatives.plan_choices: the named plan located among the candidates of the all-free program)
    # is that plan's step_time, and auto solves that program to optimality
    hardware = api.load_hardware("h200-8")
    named = api.plan(MODELS / f"{spec}.yaml", mesh, hardware="h200-8", strategy=strategy, mode=mode,
                     bucket_mb=bucket_mb)
    choices = plan_choices(named, hardware)
    assert all(g.located for g in choices.groups)
    assert math.isclose(choices.objective, named.total("step_time").value, rel_tol=1e-9)
    auto = api.plan(MODELS / f"{spec}.yaml", mesh, hardware="h200-8", strategy="auto", mode=mode, bucket_mb=bucket_mb)
    assert auto.total("step_time").value <= named.total("step_time").value * (1 + 1e-9)


def test_a_branch_and_cut_out_of_time_plans_its_best_and_says_how_far_it_may_be(monkeypatch):
    # 4 KiB buckets on 2x2: many bucket counts fractional at once, a branch and cut of seconds; stopped after
    # 0.05 s the search keeps the best assignment found (a real plan: its objective is its step_time) and the
    # plan and the report carry the gap to HiGHS's lower bound
    from ultraplan.passes import search_bnb

    monkeypatch.setattr(search_bnb, "MIP_SECONDS", 0.05)
    plan, _, reports = make_plan(load_model_spec(MODELS / "dense-tiny.yaml"), api.load_hardware("h200-8"),
                                 Mesh.parse("2x2"), strategies=("auto", "auto"), bucket_cap_bytes=4096)
    gap = plan.total("search_gap").value
    assert 0 < gap < plan.total("step_time").value
    assert math.isclose(plan.total("search_objective").value, plan.total("step_time").value, rel_tol=1e-9)
    line = next(d for r in reports if r.name == "record_search" for d in r.decisions)
    assert "not proven optimal" in line
