"""Value-table placement (passes/placement.py, passes/placement_report.py, the op table's lookup variants).

- ``--place`` pins tables and experts as asked, per axis, and refuses globs that match no table or
  placements that do not divide, in one line naming the fix;
- the number-wise lookups equal the whole lookup: the shards' ``gather_rows_owned`` /
  ``gather_weighted_sum_owned`` outputs sum to ``gather_rows`` / ``gather_weighted_sum`` (values and
  gradients), checked against the plain torch ops;
- the per-table report's bytes are the plan's: placing one table another way changes the whole plan's
  communication by exactly the change in the bytes the report gives the table; its flip batch is
  where the two step times are equal, and they swap order across it.
"""

from __future__ import annotations

import functools
import itertools
import math
import runpy
import types

import pytest
import sympy
import torch
from ultraplan.backends import runtime, table_parallel
from ultraplan.compiler import ops
from ultraplan.compiler.node_info import info
from ultraplan.compiler.shapes import B
from ultraplan.compiler.validate import load_model_spec
from ultraplan.passes.context import Mesh, PlanError
from ultraplan.passes.pipeline import make_context, make_plan
from ultraplan.passes.placement_report import (
    Option,
    _expr,
    _flip,
    table_comm_bytes,
    table_reports,
    value_dim_flips,
    with_value_dim,
)
from ultraplan.passes.sbp import Split, fits, local_numel
from ultraplan.passes.search_costs import Costing

from tests.conftest import MODELS, ROOT
from ultraplan import api


@functools.cache
def placed(spec: str, mesh: str, place: str):
    return api.plan(spec, mesh, force=[place])


def _sbp(plan, name: str) -> str:
    return next(p.sbp for p in plan.params if p.name == name)


def test_place_pins_tables_per_axis():
    plan = placed("ultramem-v2-tiny", "2x2", "memory_tables.ring.*=number,dim")
    assert _sbp(plan, "memory_tables.ring.values") == "S(0),S(1)"
    assert _sbp(plan, "memory_tables.ring.pre_values") == "S(0),S(1)"
    assert _sbp(plan, "layers.0.ultramem_v2.w_out") == "B,B"  # not a table: untouched
    assert ("memory_tables.ring.*", "number,dim") in plan.forces
    experts = placed("moe-tiny", "2", "layers.*.moe.w_*=dim")
    assert _sbp(experts, "layers.1.moe.w_up") == "S(1)" and _sbp(experts, "layers.1.moe.w_down") == "S(2)"
    assert _sbp(experts, "layers.1.moe.w_router") == "B"  # the router is not an expert weight


def test_place_errors_say_what_to_do():
    with pytest.raises(PlanError, match=r"no value table or expert weight matches 'layers\.0\.attention\.wq'"):
        api.plan("pkm-tiny", "2", force=["layers.0.attention.wq=number"])
    with pytest.raises(PlanError, match="give one, or one per axis"):
        api.plan("pkm-tiny", "2", force=["layers.1.pkm.values=number,dim"])


@pytest.mark.parametrize("shards", [2, 4])
def test_owned_lookups_sum_to_the_whole(shards):
    torch.manual_seed(0)
    table = torch.randn(16, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 16, (2, 3, 2, 4))
    weights = torch.randn(2, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    for whole, shard in ((lambda t, w: ops.gather_rows(t, ids) * w.unsqueeze(-1),
                          lambda t, w, s: ops.gather_rows_owned(t, ids, s) * w.unsqueeze(-1)),
                         (lambda t, w: ops.gather_weighted_sum(t, ids, w),
                          lambda t, w, s: ops.gather_weighted_sum_owned(t, ids, w, s))):
        rows = 16 // shards
        _parts_are_the_whole(whole(table, weights), (table, weights),
                             [shard(table[s * rows:(s + 1) * rows], weights, s * rows) for s in range(shards)])


def _parts_are_the_whole(expected: torch.Tensor, inputs: tuple, parts: list[torch.Tensor]) -> None:
    """The shards' outputs sum to ``expected``, and the gradient of each shard's slice of the table and
    the summed weight gradients are the whole lookup's (of the sum of squares)."""
    grads = torch.autograd.grad(expected.square().sum(), inputs, retain_graph=True)
    total = sum(parts)
    torch.testing.assert_close(total, expected, rtol=0, atol=1e-12)
    got = torch.autograd.grad((total.detach() * 2 * sum(parts)).sum() - total.detach().square().sum(), inputs)
    for g, want in zip(got, grads):
        torch.testing.assert_close(g, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shards", [2, 4])
def test_column_lookups_sum_to_the_whole(shards):
    """A value dim of 7 in torch.chunk's shares (4/3 on 2; 2/2/2/1 on 4): each shard's columns in a zero row
    of the whole width sum to ops.gather_rows / ops.gather_weighted_sum, and their gradients are the whole's."""
    torch.manual_seed(0)
    table = torch.randn(16, 7, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 16, (2, 3, 2, 4))
    weights = torch.randn(2, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    starts = [0, *itertools.accumulate(len(c) for c in torch.arange(7).chunk(shards))][:-1]
    for whole, shard in ((lambda t, w: ops.gather_rows(t, ids) * w.unsqueeze(-1),
                          lambda t, w, s: table_parallel.gather_rows_columns(t, ids, col_start=s, total_cols=7)
                          * w.unsqueeze(-1)),
                         (lambda t, w: ops.gather_weighted_sum(t, ids, w),
                          lambda t, w, s: table_parallel.gather_weighted_sum_columns(t, ids, w, col_start=s,
                                                                                     total_cols=7))):
        _parts_are_the_whole(whole(table, weights), (table, weights),
                             [shard(cols, weights, s) for cols, s in zip(table.chunk(shards, dim=1), starts)])


def test_report_bytes_are_the_plans_change():
    """Placing pkm-tiny's table another way moves the plan's communication by what the report says."""
    plans = {w: placed("pkm-tiny", "2", f"layers.1.pkm.values={w}") for w in ("number", "dim", "replicate")}
    params = ("layers.1.pkm.values",)
    total = {w: _expr(dict(p.totals)["comm_wire_bytes"].expr) for w, p in plans.items()}
    table = {w: table_comm_bytes(p, params) for w, p in plans.items()}
    for w in ("number", "dim"):
        assert sympy.simplify((total[w] - total["replicate"]) - (table[w] - table["replicate"])) == 0, w
        assert table[w].has(B)  # lookups move bytes with the batch
    assert not table["replicate"].has(B)  # a replicated table moves only its gradient
    reports = table_reports(api.load("pkm-tiny"), api.load_hardware(None), Mesh.parse("2"))
    (report,) = reports
    assert report.table == "layers.1.pkm.*" and report.chosen.placement == "replicate"
    assert {o.placement for o in report.options} == {"number", "dim", "replicate"}
    number = next(o for o in report.options if o.placement == "number")
    assert number.table_memory == report.chosen.table_memory / 2  # half the rows on each of 2 devices
    for o in report.options:  # by difference of whole plans == the collectives of its own lookups (pkm: no P carried)
        assert sympy.simplify(o.comm_bytes - table[o.placement]) == 0, o.placement


def test_flip_is_where_step_times_cross():
    a = Option("replicate", sympy.Integer(0), 0, 0, 0, True, 3 + 0 * B, 3.0)
    b = Option("number", sympy.Integer(0), 0, 0, 0, True, sympy.Rational(1, 2) + B / 100, 0.0)
    assert _flip(a, b, {B: 8}) == "B = 250"
    assert _flip(a, Option("dim", sympy.Integer(0), 0, 0, 0, True, 4 + B, 0.0), {B: 8}) == "never for B > 0"
    assert _flip(a, Option("dim", sympy.Integer(0), 0, 0, 0, True, 5 + 0 * B, 0.0), {B: 8}).startswith("never: ")


def test_auto_is_never_worse_than_a_forced_placement(capsys):
    """The search sees every placement's lookup signatures: free, its modelled step time is at most that
    of the same search with the table forced each way (bench/placement_vs_auto.py's CI subset: pkm-tiny
    on a 2x2 mesh of two H200 nodes at decode batch 4 and 512, every placement; the bench runs the
    paper configurations)."""
    bench = runpy.run_path(str(ROOT / "bench" / "placement_vs_auto.py"))
    results = bench["main"](["--tiny"])
    assert [(r["mesh"], r["batch"]) for r in results] == [("2x2", 4), ("2x2", 512)]
    for r in results:
        assert {(f["table"], f["placement"]) for f in r["forced"]} == {
            ("layers.*.pkm.*", w) for w in ("number,number", "dim,dim", "replicate,replicate", "number,dim")}, r
        assert r["auto_fits"] and not r["violations"], r
    assert "0 violation(s)" in capsys.readouterr().out


def test_flip_of_an_moe_like_difference_is_found_numerically():
    """E (1 - (1 - k/E)^B) has no closed-form crossing with a line: the report bisects it."""
    saturating = 64 * (1 - (1 - sympy.Rational(2, 64)) ** B)
    a = Option("number", sympy.Integer(0), 0, 0, 0, True, saturating, 0.0)
    b = Option("dim", sympy.Integer(0), 0, 0, 0, True, B / 4, 0.0)
    where = _flip(a, b, {B: 8})
    assert where.startswith("B ~ ") and where.endswith("(numeric)"), where
    root = float(where.split()[2])
    assert abs(float((saturating - B / 4).subs(B, root))) < 1e-3 and 200 < root < 260  # 6 digits printed


@pytest.mark.parametrize("shards", [2, 3, 4])
def test_core_pool_columns_are_slices_of_core_pool(shards):
    """A dimension-wise shard pools its columns with their chunks' cores: the shards' outputs are the
    whole core_pool's column slices, whether a shard holds part of a chunk (4 shards of 2 chunks of 6),
    whole chunks, or straddles two (3 shards of 4 columns)."""
    torch.manual_seed(1)
    rows = torch.randn(2, 3, 2, 5, 12, dtype=torch.float64)
    weights = torch.randn(2, 3, 2, 2, 5, dtype=torch.float64)
    whole = ops.core_pool(rows, weights)
    width = 12 // shards
    for s in range(shards):
        part = ops.core_pool_columns(rows[..., s * width:(s + 1) * width], weights, s * width, 12)
        torch.testing.assert_close(part, whole[..., s * width:(s + 1) * width], rtol=0, atol=1e-12)


def _pkm_with_keys(tmp_path, keys: int, topk: int = 8) -> str:
    """pkm-tiny with ``keys``^2 value rows (a table whose rows need not divide over the devices)."""
    path = tmp_path / f"pkm-{keys}.yaml"
    text = (MODELS / "pkm-tiny.yaml").read_text()
    path.write_text(text.replace("num_keys: 16,", f"num_keys: {keys},").replace("topk: 8,", f"topk: {topk},"))
    return str(path)


def test_uneven_rows_count_the_largest_torch_chunk_share(tmp_path):
    """225 rows number-wise on 2 and 4 devices, and on both axes of 2x2: each device is planned the largest
    of torch.chunk's shares (113, 57, 57 rows of 32 float32 values), under a named strategy and under the
    search; the lookup's row_start is emitted in chunk shares; the other tables keep their even split."""
    spec = _pkm_with_keys(tmp_path, 15)
    for mesh, words, strategy in (("2", "number", None), ("4", "number", None), ("2x2", "number", None),
                                  ("2", "number", "auto")):
        plan = api.plan(spec, mesh, force=[f"layers.1.pkm.values={words}"], strategy=strategy)
        devices = math.prod(int(n) for n in mesh.split("x"))
        largest = torch.arange(225).chunk(2 if mesh == "2x2" else devices)[0].chunk(2 if mesh == "2x2" else 1)[0]
        table = next(p for p in plan.params if p.name == "layers.1.pkm.values")
        assert table.bytes_per_device.value == largest.numel() * 32 * 4, (mesh, strategy)
        lookup = next(n for n in plan.nodes if n.call == "ops.gather_weighted_sum_owned")
        axes = [0] if mesh != "2x2" else [0, 1]
        assert dict(lookup.local_attrs)["row_start"] == {"shard_start": [225, axes, "chunks"]}, (mesh, strategy)


def test_the_search_splits_rows_unevenly_and_sizes_them_as_the_plan(tmp_path):
    """Without --place the search considers a table's rows in torch.chunk's shares (sbp.fits, the plan's
    own rule): PKM with 100^2 = 10000 rows on 3 devices whose memory only holds the table split picks S(0),
    3334 rows a device, as fast as --place number and as large in the search's memory row as in the plan."""
    spec = _pkm_with_keys(tmp_path, 100)
    point = dict(batch=8, mode="train", strategy="auto")
    whole = api.plan(spec, "3", hardware="h200-8", force=["layers.1.pkm.values=replicate"], **point)
    split = api.plan(spec, "3", hardware="h200-8", force=["layers.1.pkm.values=number"], **point)
    memory = [p.total("memory_per_device").value for p in (whole, split)]
    hardware = tmp_path / "small.yaml"
    hardware.write_text((ROOT / "specs" / "hardware" / "h200-8.yaml").read_text().replace(
        "memory_bytes: 1.41e+11", f"memory_bytes: {sum(memory) / 2}"))
    auto = api.plan(spec, "3", hardware=str(hardware), **point)
    assert auto.fits and _sbp(auto, "layers.1.pkm.values") == "S(0)"
    table = next(p for p in auto.params if p.name == "layers.1.pkm.values")
    assert table.bytes_per_device.value == 3334 * 32 * 4  # torch.chunk(10000, 3)[0]: 3334 rows
    assert auto.total("step_time").value <= split.total("step_time").value * (1 + 1e-9)
    assert math.isclose(auto.total("search_objective").value, auto.total("step_time").value, rel_tol=1e-9)
    model, h200, three = load_model_spec(spec), api.load_hardware("h200-8"), Mesh.parse("3")
    gm = make_plan(model, h200, three, batch=8, stop_after="annotate_cost")[1]
    ctx = make_context(model, h200, three, batch=8, strategies=("auto",))
    node = next(n for n in gm.graph.nodes if info(n).op == "param" and info(n).param.name == "layers.1.pkm.values")
    rows = {c.out: c.memory for c in Costing(gm, ctx, {}, {}).candidates(node)}
    assert rows[(Split(0),)] == 3334 * 32 * 4 * 4  # the parameter, its gradient and AdamW's two moments


def test_fits_is_one_rule_of_torch_chunk_shares():
    """sbp.fits: dims outside ``uneven`` divide; uneven dims split in torch.chunk's shares, nested outer
    axis first, while every device keeps one (9 rows over 4: shares 3,3,3,0 refused; 169 over 2x2: 43..42)."""
    assert fits((10, 4), (Split(1),), (2,)) and not fits((10, 4), (Split(0),), (4,))
    assert fits((10, 4), (Split(0),), (4,), frozenset({0})) and not fits((9, 4), (Split(0),), (4,), frozenset({0}))
    assert fits((169, 4), (Split(0), Split(0)), (2, 2), frozenset({0}))
    assert not fits((5, 4), (Split(0), Split(0)), (2, 3), frozenset({0}))  # 3 -> 1,1,1; 2 -> 1,1,0
    assert not fits((10, 4), (Split(2),), (2,), frozenset({2}))
    assert local_numel((1000, 3), (Split(0),), (3,)) == 334 * 3 == max(c.numel() for c in torch.ones(1000, 3).chunk(3))


@pytest.mark.parametrize("mesh_shape, size, splits", [((2,), 225, (0,)), ((4,), 225, (0,)), ((2, 2), 169, (0, 1)),
                                                      ((2, 2), 169, (1, 0)), ((3,), 1000, (0,)), ((8,), 1000, (0,))])
def test_chunked_shard_range_is_torch_chunk(mesh_shape, size, splits):
    """runtime.Mesh.shard_range(..., chunks=True) gives every coordinate torch.chunk's block (nested over
    several axes, outer first: DTensor's Shard on each), and equals the even split where sizes divide."""
    for coords in itertools.product(*map(range, mesh_shape)):
        mesh = types.SimpleNamespace(shape=mesh_shape, coords=coords)
        block = torch.arange(size)
        for axis in splits:
            chunks = block.chunk(mesh_shape[axis])
            block = chunks[coords[axis]] if coords[axis] < len(chunks) else block[:0]
        start, stop = runtime.Mesh.shard_range(mesh, size, splits, chunks=True)
        assert (start, stop) == ((int(block[0]), int(block[-1]) + 1) if len(block) else (start, start)), coords
        even = runtime.Mesh.shard_range(mesh, 16 * math.prod(mesh_shape), splits)
        assert runtime.Mesh.shard_range(mesh, 16 * math.prod(mesh_shape), splits, chunks=True) == even


def test_uneven_experts_split_in_torch_chunk_shares(tmp_path):
    """15 experts number-wise on 2 devices: expert parallelism, each device planned torch.chunk's larger
    share (8 experts of 24x32 float32 per weight); its owners (runtime.expert_parallel_ffn) follow the
    same blocks, which tests/dist/test_placement.py runs against eager."""
    spec = tmp_path / "moe-odd.yaml"
    spec.write_text((MODELS / "moe-tiny.yaml").read_text().replace("experts: 16,", "experts: 15,"))
    plan = api.plan(str(spec), "2", hardware="h200-8", force=["layers.*.moe.w_*=number"])
    up = next(p for p in plan.params if p.name == "layers.1.moe.w_up")
    assert up.sbp == "S(0)" and up.bytes_per_device.value == 8 * 24 * 32 * 4
    ffn = next(n for n in plan.nodes if n.call == "runtime.expert_parallel_ffn")
    assert dict(ffn.local_attrs)["num_experts"] == 15


def test_uneven_value_dims_read_their_columns():
    """PKM's value dim of 32 dimension-wise on 3 devices: torch.chunk's shares (11/11/10 columns), the
    column lookup (each device's columns in a zero row of the whole width) and its partial bags reduced
    (here reduce-scattered to the tokens' split); the plan counts the largest share."""
    plan = api.plan("pkm-tiny", "3", hardware="h200-8", batch=6, force=["layers.1.pkm.values=dim"])
    table = next(p for p in plan.params if p.name == "layers.1.pkm.values")
    assert table.sbp == "S(1)" and table.bytes_per_device.value == 256 * 11 * 4
    bag = next(n for n in plan.nodes if n.call == "table_parallel.gather_weighted_sum_columns")
    assert dict(bag.local_attrs)["col_start"] == {"shard_start": [32, [0], "chunks"]}
    reduced = [c for c in plan.collectives if c.node.startswith(bag.name) and c.phase == "forward"]
    assert [(c.src, c.payload_bytes.value) for c in reduced] == [("P", 6 * 16 * 32 * 4)]  # the whole width


def test_uneven_placements_that_cannot_run_are_refused(tmp_path):
    """An experts' width that does not divide is still refused (an activation split on it would be
    uneven), and so are rows in shares that leave a device none (36 rows in shares of 6 over 7 devices),
    each in one line naming the fix."""
    with pytest.raises(PlanError, match="does not split over the mesh"):
        api.plan("moe-tiny", "5", hardware="h200-8", batch=5, force=["layers.*.moe.w_*=dim"])
    with pytest.raises(PlanError, match="leave a device of the 7 without rows"):
        api.plan(_pkm_with_keys(tmp_path, 6, topk=4), "7", hardware="h200-8", batch=7,
                 force=["layers.1.pkm.values=number"])


def test_value_dim_flip_is_where_replanned_step_times_cross():
    """ultramem-tiny's table on 2 H200s at a 2x2-token step: replicated, its gradient all-reduce grows
    with the table's width faster than number-wise lookups do, which cost more collectives: the solved
    width at which they cross lies between the two nearest widths (multiples of 16) of a scan of the
    cost model re-planned there, the order of the two placements swapping between them. The gradients
    go in one 1 GiB bucket: in 25 MiB ones the replicated table, grown 300 times, would add a bucket
    (its latency a step in the line, which the solve extrapolates from widths 1-3 times the spec's)."""
    spec, hardware, mesh = api.load("ultramem-tiny"), api.load_hardware("h200-2x8"), Mesh.parse("2")

    def plan_at(s, words: str):
        return make_plan(s, hardware, mesh, forces=(("layers.1.ultramem.*", words),), batch=2, seq=2,
                         bucket_cap_bytes=2**30)[0]

    def step(s, words: str) -> float:
        return plan_at(s, words).total("step_time").value

    ((other, where),) = value_dim_flips(spec, ["replicate", "number"], "replicate", plan_at)
    assert other == "number" and where.startswith("value_dim = "), where
    root = float(where.split()[-1])
    below, above = int(root // 16 * 16), int(root // 16 * 16 + 16)
    assert 16 < below < root < above
    order = [step(with_value_dim(spec, w // 16), "replicate") - step(with_value_dim(spec, w // 16), "number")
             for w in (below, above)]
    assert order[0] < 0 < order[1], (root, order)


def test_boxing_through_a_whole_inner_axis():
    """Rows gathered from a table split dimension-wise on both axes of a 2-D mesh go to tokens split on
    both: neither axis order boxes ``[S(4),S(4)] -> [S(0),S(0)]`` without a strided layout, so the inner
    axis is gathered whole first, then axis 0 all-to-alls and axis 1 keeps its chunk (ring wire bytes per
    device: the gather (n-1)/n of the axis-0 shard it assembles, the all-to-all (n-1)/n^2 of the whole)."""
    from ultraplan.passes.sbp import boxings, parse_nd

    steps = boxings(parse_nd("S(4),S(4)"), parse_nd("S(0),S(0)"), (4, 3, 2, 2, 8), "float32")
    assert [(b.axis, b.collective, b.src, b.dst) for b in steps] == [
        (1, "all_gather", "S(4)", "B"), (0, "all_to_all", "S(4)", "S(0)"), (1, "local", "B", "S(0)")]
    wire = [float(b.wire.subs({s: 2 for s in b.wire.free_symbols})) for b in steps]
    whole = 4 * 3 * 2 * 2 * 8 * 4  # bytes of the float32 tensor
    assert wire == [whole / 2 / 2, whole / 4, 0.0]
