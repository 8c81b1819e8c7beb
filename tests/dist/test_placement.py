"""Every forced value-table and expert placement runs and equals the eager reference (passes/placement.py).

On 2 and 4 gloo ranks and the 2x2 mesh, for each memory spec (UltraMem, UltraMemV2 with its ring table
and pre-values, PKM, Memory+'s shared values, PEER's down and up tables) and the MoE's experts, every
forced placement (``full_matrix``): ``--place TABLE=number`` (rows split: the ``rows_owned`` lookup, or
expert parallelism), ``dim`` (the value dim, or the experts' width, split) and ``replicate`` on 2 and 4,
and on 2x2 each word on both axes and the 2-D combinations ``number,dim`` and ``dim,number``. Between
them the cases run both number-wise lookups (``rows_owned``: ids all-gathered, partial sums reduced;
``rows_routed``: ids routed to the owners by all_to_all, which the cost model takes where the gathered
rows are wide). More cases
place tables whose rows or columns do not divide over the devices (``UNEVEN``: PKM with 15^2 = 225 rows
of 33 values, UltraMem with 13^2 = 169 rows, made from the tiny specs here): each rank holds
torch.chunk's share of the rows (113/112 on 2; 43/42/42/42 over 2x2, routed in two hops) or of the
columns (PKM dimension-wise, 17/16: each rank pools its columns into a zero row of the whole width,
``table_parallel.gather_weighted_sum_columns``, and the partial bags are all-reduced), and one MoE
whose 15 experts split 8/7 across the 2x2 mesh's nodes (expert parallelism routes to torch.chunk's
owners; the experts' width split inside), checked against torch.chunk itself. Experts split number-wise on
both axes of 2x2 (``number,number``, and ``--strategy ep,ep``, which places them so) route each token's row
in one all_to_all over the group of all four ranks (backends/expert_parallel.py): moe-tiny's 16 experts 4
per rank, and 6 experts in torch.chunk's nested shares 2/1/2/1 (``moe-six``). Eight more place the value
columns of UltraMem (15 over 3 cores) and UltraMemV2 (27 values, 9 pre-values) ``dim`` on 2 (8/7) and
``dim,dim`` on 2x2 (4/4/4/3), fused and unfused: every read of the tables in its column form (the pre-value
row dot's partial dots, the poolings' zero-padded column shares, the unfused poolings of the column
lookup's partial rows), so the partial outputs are reduced after the pooling; and PKM's 34 columns
``dim,dim`` on 2x2, which each axis divides but the mesh does not (17, then 9/8). After
STEPS AdamW steps (the values' own LR schedule included) losses and final parameters equal the eager
single-process run in float64 to 1e-10; each rank holds only its shards of the tables (the plan's bytes);
the bytes and calls handed to each collective equal the plan's one list. float64 only, and one torchrun
per rank count, to keep CI short.
"""

from __future__ import annotations

import functools
import itertools
import json

import pytest
import torch
from ultraplan.passes.context import PlanError

from tests.conftest import MODELS, ROOT
from tests.dist import test_strategies as strategies
from tests.dist.test_multirank import torchrun
from ultraplan import api
from ultraplan.reference import relative_differences, train_reference
from ultraplan.runner import TOLERANCES, comm_report

pytestmark = pytest.mark.slow

STEPS = 3
UNFUSED = " unfused"  # a case's placement ending so is compiled with ``fuse=False`` (``--no-fuse``)
TABLES = {"ultramem-tiny": "layers.*.ultramem.values", "ultramem-v2-tiny": "memory_tables.ring.*",
          "pkm-tiny": "layers.1.pkm.values", "memory-plus-tiny": "memory_tables.pkm_shared.values",
          "peer-tiny": "layers.1.peer.*", "moe-tiny": "layers.*.moe.w_*",
          "pkm-odd": "layers.1.pkm.values", "ultramem-odd": "layers.*.ultramem.values", "moe-odd": "layers.*.moe.w_*",
          "moe-six": "layers.*.moe.w_*",
          "ultramem-cols": "layers.*.ultramem.values", "ultramem-v2-cols": "memory_tables.ring.*",
          "pkm-34": "layers.1.pkm.values", "pkm-14": "layers.1.pkm.values"}
# specs whose tables' rows (or experts) divide over neither 2 nor 4 devices: (tiny spec, its text, replaced by)
UNEVEN = {"pkm-odd": ("pkm-tiny", "num_keys: 16,", "num_keys: 15, value_dim: 33,"),
          "ultramem-odd": ("ultramem-tiny", "num_keys: 12,", "num_keys: 13,"),
          "moe-odd": ("moe-tiny", "experts: 16,", "experts: 15,"),
          "moe-six": ("moe-tiny", "experts: 16,", "experts: 6,"),
          # value (and pre-value) dims that divide over neither 2 nor 2x2: 15 (8/7; 4/4/4/3), 27 and 9, over 3 cores
          "ultramem-cols": ("ultramem-tiny", "value_dim: 16, heads: 2, rank: 2, cores: 2,",
                            "value_dim: 15, heads: 2, rank: 2, cores: 3,"),
          "ultramem-v2-cols": ("ultramem-v2-tiny", "value_dim: 24, pre_value_dim: 8, rank: 2, cores: 2,",
                               "value_dim: 27, pre_value_dim: 9, rank: 2, cores: 3,"),
          # value dims each mesh axis divides but their product does not: 34 on 2x2 (17, then 9/8), 14 on 4x2
          "pkm-34": ("pkm-tiny", "num_keys: 16,", "num_keys: 16, value_dim: 34,"),
          "pkm-14": ("pkm-tiny", "num_keys: 16,", "num_keys: 16, value_dim: 14,")}
# the uneven cases (spec, mesh, placement) per rank count: rows split unevenly number-wise (the routed
# lookup, nested over both axes of 2x2), PKM's 33 columns dimension-wise, 15 experts split 8/7 across
# 2x2's first axis with their width split inside, and 6 experts over both axes (2/1/2/1, one
# all_to_all group of four); the full matrix of the bundled tiny specs (``full_matrix``, below) joins them
UNEVEN_CASES = {
    2: [("ultramem-odd", "2", "number"), ("pkm-odd", "2", "number"), ("pkm-odd", "2", "dim")],
    4: [("ultramem-odd", "2x2", "number"), ("moe-odd", "2x2", "number,dim"), ("moe-six", "2x2", "number,number")],
}
# value columns in torch.chunk's shares, every read of the table in its column form, fused (the pre-value row
# dot's partial dots, the fused poolings' zero-padded column shares) and unfused (``UNFUSED``: the column
# lookup's padded rows pooled as a partial sum, ``partial_rows``)
for _n, _mesh, _place in ((2, "2", "dim"), (4, "2x2", "dim,dim")):
    UNEVEN_CASES[_n] += [(spec, _mesh, _place + unfused) for spec in ("ultramem-cols", "ultramem-v2-cols")
                         for unfused in ("", UNFUSED)]
UNEVEN_CASES[4].append(("pkm-34", "2x2", "dim,dim"))  # each axis divides 34, the mesh does not: the column form on both
# named strategies that place the same way, run in the same process group: (spec, mesh, strategy, placement it makes)
STRATEGY_CASES = {2: [], 4: [("moe-tiny", "2x2", "ep,ep", "number,number")]}
# a DCP checkpoint chain on 2 ranks (backends/checkpoint.py): pkm-odd's rows number-wise (113/112) saved after
# step 1, resumed dimension-wise (columns 17/16) to step 2 and saved, resumed number-wise again to STEPS: uneven
# shares saved and read into another uneven layout, both ways
CHAIN = {2: [("pkm-odd", "number", 1), ("pkm-odd", "dim", 2), ("pkm-odd", "number", STEPS)], 4: []}
EXPERTS = ("w_up", "w_gate", "w_down")  # moe-tiny's placed expert weights (no expert biases)
PLACEMENTS = {"2": ("number", "dim", "replicate"), "4": ("number", "dim", "replicate"),
              "2x2": ("number,number", "dim,dim", "replicate,replicate", "number,dim", "dim,number")}


def full_matrix() -> dict[int, list[tuple[str, str, str]]]:
    """Every bundled tiny memory spec and the MoE, with every placement on 2 and 4 ranks and every 2-D
    combination on 2x2: ``number`` (rows split: the owned or routed lookup, or expert parallelism),
    ``dim`` (the value dim, or the experts' width, split) and ``replicate``. A placement the sizes do not
    allow is refused at compile time and reported (``test_every_case_plans_or_says_why``)."""
    specs = [s for s in TABLES if s not in UNEVEN]
    return {n: [(s, m, p) for s in specs for m in PLACEMENTS if _size(m) == n for p in PLACEMENTS[m]] for n in (2, 4)}


def _size(mesh: str) -> int:
    return functools.reduce(lambda a, b: a * b, map(int, mesh.split("x")))


CASES = {n: full_matrix()[n] + UNEVEN_CASES[n] for n in (2, 4)}
NOT_POSSIBLE: set[tuple[str, str, str]] = set()  # every bundled tiny spec takes every placement


def spec_path(spec: str, root) -> str:
    """The spec file of a case: a bundled tiny spec, or an ``UNEVEN`` one written under ``root``."""
    if spec not in UNEVEN:
        return str(MODELS / f"{spec}.yaml")
    base, old, new = UNEVEN[spec]
    text = (MODELS / f"{base}.yaml").read_text()
    assert old in text, (base, old)
    path = root / f"{spec}.yaml"
    path.write_text(text.replace(old, new).replace(f"name: {base}", f"name: {spec}"))
    return str(path)


@functools.cache
def reference(spec: str, path: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The eager float64 run: test_strategies made it already for the bundled specs (the same STEPS;
    cached there); an uneven spec's is made here."""
    assert strategies.STEPS == STEPS
    if spec not in UNEVEN:
        return strategies.reference(spec, "float64")
    plan = api.plan(path, "1")
    return train_reference(plan, STEPS, plan.training.seed, torch.float64)


def chunk_numel(shape: tuple[int, ...], sbp: str, mesh: tuple[int, ...], coords: tuple[int, ...]) -> int:
    """Elements a device at ``coords`` holds of a ``shape`` parameter stored ``sbp``, by torch.chunk (the
    shares DTensor's Shard gives; outer mesh axis first), independently of the program's shard_range."""
    part = torch.empty(shape, device="meta")
    for axis, entry in enumerate(sbp.split(",")):
        if entry.startswith("S("):
            chunks = part.chunk(mesh[axis], dim=int(entry[2:-1]))
            part = chunks[coords[axis]] if coords[axis] < len(chunks) else part.narrow(int(entry[2:-1]), 0, 0)
    return part.numel()


read_plan = functools.cache(api.read_plan)


@pytest.fixture(scope="module", params=sorted(CASES))
def placement_run(request, tmp_path_factory):
    nproc = request.param
    root = tmp_path_factory.mktemp(f"placement{nproc}")
    cases, refused = [], []
    for spec, mesh, case_place in CASES[nproc]:
        place = case_place.removesuffix(UNFUSED)
        out = root / f"{spec}__{mesh}__{case_place.replace(',', '-').replace(' ', '-')}"
        path = spec_path(spec, root)
        try:
            api.compile(path, mesh, out, force=[f"{TABLES[spec]}={place}"], fuse=place == case_place)
        except PlanError as exc:  # a placement the sizes do not allow: reported, and checked against NOT_POSSIBLE
            refused.append((spec, mesh, case_place, str(exc)))
            continue
        cases.append({"spec": spec, "path": path, "mesh": mesh, "place": case_place, "dir": str(out), "steps": STEPS,
                      "dtype": "float64", "dump": str(out / "result.json")})
    for spec, mesh, strategy, place in STRATEGY_CASES[nproc]:
        out = root / f"{spec}__{mesh}__{strategy.replace(',', '-')}"
        path = spec_path(spec, root)
        api.compile(path, mesh, out, strategy=strategy)
        cases.append({"spec": spec, "path": path, "mesh": mesh, "place": place, "strategy": strategy, "dir": str(out),
                      "steps": STEPS, "dtype": "float64", "dump": str(out / "result.json")})
    chain, saved = [], root / "checkpoints"
    for i, (spec, place, steps) in enumerate(CHAIN[nproc]):
        out = root / f"{spec}__{nproc}__{place}"
        if not out.exists():
            api.compile(spec_path(spec, root), str(nproc), out, force=[f"{TABLES[spec]}={place}"])
        args = ["--checkpoint-dir", str(saved)] + ["--resume"] * bool(i)
        chain.append({"spec": spec, "path": spec_path(spec, root), "dir": str(out), "steps": steps, "dtype": "float64",
                      "dump": str(root / f"chain{i}.json"), "args": args})
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps(cases + chain))
    result = torchrun(nproc, str(ROOT / "tests" / "dist" / "driver.py"), str(manifest))
    assert result.returncode == 0, result.stderr[-4000:]
    return nproc, cases, chain, refused


def test_every_case_plans_or_says_why(placement_run):
    """Every case compiles but those the sizes rule out (``NOT_POSSIBLE``), refused in one line naming why."""
    refused = placement_run[3]
    for *_, why in refused:
        assert "\n" not in why.strip() and "Traceback" not in why, why
    expected = {case for case in NOT_POSSIBLE if _size(case[1]) == placement_run[0]}
    assert {tuple(case) for *case, _ in refused} == expected, refused


def test_every_placement_equals_eager(placement_run):
    failures = []
    for case in placement_run[1]:
        result = json.loads(open(case["dump"]).read())
        ref_losses, ref_params = reference(case["spec"], case["path"])
        diffs = relative_differences(result["losses"], ref_losses, torch.load(result["params"]), ref_params)
        if diffs["loss"] > TOLERANCES["float64"]["loss"] or diffs["params"] > TOLERANCES["float64"]["params"]:
            failures.append((case["spec"], case["mesh"], case["place"], diffs))
    assert not failures, failures


def test_tables_are_placed_and_held_as_planned(placement_run):
    """The placed parameters are stored split as asked; every rank holds exactly its torch.chunk share of
    every parameter (the plan's bytes where splits divide; the plan counts the largest share where they
    do not) and never made more than one shard plus one init block at a time."""
    for case in placement_run[1]:
        plan = read_plan(case["dir"])
        result = json.loads(open(case["dump"]).read())
        place = case["place"].removesuffix(UNFUSED)
        words = place.split(",") * (2 if "," not in place and "x" in case["mesh"] else 1)
        placed = [p for p in plan.params if p.group == "values" or (".moe." in p.name and p.name.split(".")[-1] in EXPERTS)]
        assert placed, case
        for p in placed:
            for word, entry in zip(words, p.sbp.split(",")):
                expected = {"number": "S(0)", "replicate": "B"}.get(word)
                assert entry == expected if expected else entry.startswith("S(") and entry != "S(0)", (case, p.name)
        planned = sum(p.bytes_per_device.value for p in plan.params) * 2  # float64
        shape = tuple(int(n) for n in case["mesh"].split("x"))
        held = [8 * sum(chunk_numel(tuple(p.shape), p.sbp, shape, coords) for p in plan.params)
                for coords in itertools.product(*map(range, shape))]  # rank order: the last axis fastest
        assert result["param_bytes"] == held and max(held) == planned, case
        assert (min(held) < planned) == (case["spec"] in UNEVEN), case
        largest_shard = max(p.bytes_per_device.value for p in plan.params)  # never a whole table at init
        assert all(peak <= largest_shard + strategies.INIT_BLOCK_BYTES for peak in result["init_peak_bytes"]), case


def test_measured_collectives_equal_the_plan(placement_run):
    for case in placement_run[1]:
        plan = read_plan(case["dir"])
        result = json.loads(open(case["dump"]).read())
        comm = comm_report(plan, result, STEPS)
        where = (case["spec"], case["mesh"], case["place"])
        assert comm["comm_bytes_measured"] == pytest.approx(comm["comm_bytes_predicted"], rel=1e-12), where
        assert comm["comm_calls_measured"] == comm["comm_calls_predicted"], where
        assert comm["comm_calls_torch_first_step"] == comm["comm_calls_predicted"], where


def test_uneven_shards_checkpoint_and_resume(placement_run):
    """The chain's losses, step by step, and its final parameters equal the eager run (float64, 1e-10): each
    resume read every row and both AdamW moments from a checkpoint written in another layout."""
    chain = placement_run[2]
    if not chain:
        pytest.skip("the checkpoint chain runs on 2 ranks")
    ref_losses, ref_params = reference(chain[0]["spec"], chain[0]["path"])
    losses, first = [], 0
    for case in chain:
        result = json.loads(open(case["dump"]).read())
        assert result.get("first_step", 0) == first, case
        losses += result["losses"]
        first = case["steps"]
    diffs = relative_differences(losses, ref_losses, torch.load(result["params"]), ref_params)
    assert len(losses) == STEPS
    assert diffs["loss"] <= TOLERANCES["float64"]["loss"] and diffs["params"] <= TOLERANCES["float64"]["params"], diffs
