"""Dimension-wise value tables whose value dim does not divide, for every read of a table (the op table's
``cols_owned`` variants of gather_row_dot and gather_core_pool, gather_ive_pool's ``value_columns`` in
torch.chunk's shares, and the unfused poolings' ``partial_rows``).

- each shard's form (its columns of the table, torch.chunk's share, starting anywhere) gives a partial sum:
  the shards' outputs add up to the whole op, and their gradients are the whole's (float64, exact up to
  rounding), in torch and through the Triton kernels a program installs (interpreted on the CPU, float32),
  and the unfused poolings of a number-wise lookup's partial rows likewise;
- the plans of UltraMem and UltraMemV2 with odd value dims (tests/dist/test_placement.py's ``ultramem-cols``,
  ``ultramem-v2-cols``) placed ``dim`` on 2 and 2x2 take those forms, fused and unfused, and reduce only the
  pooled (or dotted) width, never the gathered rows.
"""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/unit/conftest.py does it first)

import pytest
import torch
from ultraplan.backends import table_parallel
from ultraplan.compiler import ops

from tests.dist.test_placement import TABLES, spec_path
from tests.unit.conftest import interpreted_kernels
from tests.unit.test_placement import _parts_are_the_whole
from ultraplan import api


def _shards(table: torch.Tensor, shards: int) -> list[tuple[torch.Tensor, int]]:
    """torch.chunk's column shares of ``table`` (as DTensor's Shard(1)) with where each starts."""
    parts = table.chunk(shards, dim=1)
    starts = [0, *itertools.accumulate(p.shape[1] for p in parts)][:-1]
    return list(zip(parts, starts))


def _lookup_inputs(dtype: torch.dtype, width: int, cores: int = 3):
    """A table of 11 rows, picks (2, 3, 2, 4) with repeats, core weights and IVE blocks of 3."""
    gen = torch.Generator().manual_seed(width)
    table = torch.randn(11, width, dtype=dtype, generator=gen, requires_grad=True)
    ids = torch.randint(0, 11, (2, 3, 2, 4), generator=gen)
    ids[0, 0, 0, :2] = 5
    weights = torch.randn(2, 3, 2, cores, 4, dtype=dtype, generator=gen, requires_grad=True)
    x = torch.randn(2, 3, width, dtype=dtype, generator=gen, requires_grad=True)
    blocks = torch.randint(0, 3, (2, 3, 2, 4), generator=gen)
    return table, ids, weights, x, blocks


@pytest.mark.parametrize("shards", [2, 3, 4])
def test_column_reads_sum_to_the_whole(shards):
    """A pre-value width of 9 and a value width of 27 over 3 cores (chunks of 9) in torch.chunk's shares
    (14/13, 9/9/9 and 7/7/7/6 columns: shares that start inside a core's chunk and straddle two; 9 in 4
    is torch.chunk's 3/3/3): the row dot's partial dots and the poolings' zero-padded column shares,
    fused and unfused, sum to the whole, with the whole's gradients."""
    table, ids, weights, x, blocks = _lookup_inputs(torch.float64, 9)
    _parts_are_the_whole(ops.gather_row_dot(table, ids, x), (table, x),
                         [table_parallel.gather_row_dot_columns(t, ids, x, col_start=s, total_cols=9)
                          for t, s in _shards(table, shards)])
    table, ids, weights, x, blocks = _lookup_inputs(torch.float64, 27)
    rows = ops.gather_rows(table, ids)
    cases = (
        (ops.gather_core_pool(table, ids, weights),
         lambda t, s: table_parallel.gather_core_pool_columns(t, ids, weights, col_start=s, total_cols=27)),
        (ops.gather_ive_pool(table, ids, weights, blocks, 3),
         lambda t, s: ops.gather_ive_pool_columns(t, ids, weights, blocks, 3, s, 27)),
        (ops.core_pool(rows, weights),  # unfused: the column lookup's padded rows pooled (``partial_rows``)
         lambda t, s: ops.core_pool(table_parallel.gather_rows_columns(t, ids, col_start=s, total_cols=27), weights)),
        (ops.ive_pool(rows, weights, blocks, 3),
         lambda t, s: ops.ive_pool(table_parallel.gather_rows_columns(t, ids, col_start=s, total_cols=27), weights,
                                   blocks, 3)),
    )
    for whole, shard in cases:
        _parts_are_the_whole(whole, (table, weights), [shard(t, s) for t, s in _shards(table, shards)])


@pytest.mark.parametrize("shards", [2, 3])
def test_unfused_poolings_of_owned_rows_sum_to_the_whole(shards):
    """``partial_rows`` takes any rows that are a partial sum: a number-wise lookup's (rows_owned: the rows a
    shard holds, zeros for the others; 11 rows in torch.chunk's shares) pool to shares of the whole pooling."""
    table, ids, weights, _, blocks = _lookup_inputs(torch.float64, 27)
    parts = table.chunk(shards, dim=0)
    starts = [0, *itertools.accumulate(p.shape[0] for p in parts)][:-1]
    for pool in (lambda rows: ops.core_pool(rows, weights), lambda rows: ops.ive_pool(rows, weights, blocks, 3)):
        _parts_are_the_whole(pool(ops.gather_rows(table, ids)), (table, weights),
                             [pool(ops.gather_rows_owned(p, ids, s)) for p, s in zip(parts, starts)])


@pytest.fixture
def installed_kernels(request):
    """The Triton kernels a program installs with ``--kernels triton`` (ops.KERNELS), interpreted; yields
    the names of the ops whose kernel ran, so a test can tell that the kernels, not the torch forms, ran."""
    gather, pool = interpreted_kernels(request, "triton_gather.py"), interpreted_kernels(request, "triton_pool.py")
    used: list[str] = []

    def counted(op: str, kernel):
        def run(*args):
            used.append(op)
            return kernel(*args)
        return run

    saved = dict(ops.KERNELS)
    ops.KERNELS.update({"gather_row_dot": counted("gather_row_dot", gather.gather_row_dot),
                        "gather_core_pool": counted("gather_core_pool", pool.pool_rows),
                        "gather_ive_pool": counted("gather_ive_pool", pool.pool_rows)})
    yield used
    ops.KERNELS.clear()
    ops.KERNELS.update(saved)


def test_column_reads_through_the_kernels(installed_kernels):
    """The kernels take a column shard as it is (a table of fewer columns; the pooling's cores from
    ``col_start`` and ``total_cols``): on 27 columns in shares of 14 and 13, each shard's output and
    gradients equal the torch form's (float32)."""
    table, ids, weights, x, blocks = _lookup_inputs(torch.float32, 27)
    forms = (lambda t, s: table_parallel.gather_row_dot_columns(t, ids, x, col_start=s, total_cols=27),
             lambda t, s: table_parallel.gather_core_pool_columns(t, ids, weights, col_start=s, total_cols=27),
             lambda t, s: ops.gather_ive_pool_columns(t, ids, weights, blocks, 3, s, 27))
    for form, (part, start) in itertools.product(forms, _shards(table.detach(), 2)):
        shard = part.clone().requires_grad_()
        got = form(shard, start)
        kernels, ops.KERNELS = ops.KERNELS, {}
        try:
            want = form(shard, start)
        finally:
            ops.KERNELS = kernels
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        g = torch.randn(got.shape, generator=torch.Generator().manual_seed(start))
        for a, b in zip(torch.autograd.grad(got, (shard, weights, x), g, allow_unused=True),
                        torch.autograd.grad(want, (shard, weights, x), g, allow_unused=True)):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert sorted(set(installed_kernels)) == ["gather_core_pool", "gather_ive_pool", "gather_row_dot"]


# (spec, fuse) -> the calls that read its placed tables, as the plan names them
CALLS = {("ultramem-v2-cols", True): {"table_parallel.gather_row_dot_columns", "table_parallel.gather_core_pool_columns"},
         ("ultramem-v2-cols", False): {"table_parallel.gather_rows_columns"},
         ("ultramem-cols", True): {"ops.gather_ive_pool_columns"},
         ("ultramem-cols", False): {"table_parallel.gather_rows_columns"}}


@pytest.mark.parametrize(("spec", "fuse"), sorted(CALLS))
@pytest.mark.parametrize("mesh", ["2", "2x2"])
def test_odd_value_dims_take_the_column_forms(tmp_path, spec, fuse, mesh):
    """Value and pre-value dims of 15, 27 and 9 placed ``dim`` (torch.chunk's shares: 8/7 on 2, 4/4/4/3 on
    2x2): every read of a table runs its column form with the chunked start, and the only forward
    collectives of a lookup's outputs reduce the pooled (or dotted) width, never the gathered rows."""
    plan = api.plan(spec_path(spec, tmp_path), mesh, fuse=fuse, force=[f"{TABLES[spec]}=dim"])
    reads = [n for n in plan.nodes if n.op in ("gather_rows", "gather_row_dot", "gather_core_pool", "gather_ive_pool")]
    assert reads and {n.call for n in reads} == CALLS[spec, fuse]
    for n in reads:
        assert dict(n.local_attrs)["col_start"]["shard_start"][2] == "chunks", n.name
    pools = [n for n in plan.nodes if n.op in ("core_pool", "ive_pool")]
    assert all(n.splits == ("partial_rows",) * len(mesh.split("x")) for n in pools) and bool(pools) != fuse
    gathered = {n.name for n in reads if n.op == "gather_rows" and "pre" not in n.name}
    assert not any(c.node.startswith(tuple(gathered)) for c in plan.collectives if c.phase == "forward")


@pytest.mark.parametrize(("spec", "mesh"), [("pkm-34", "2x2"), ("pkm-14", "4x2")])
@pytest.mark.parametrize("strategy", ["dp", "auto"])
def test_columns_each_axis_divides_but_the_mesh_does_not(tmp_path, spec, mesh, strategy):
    """34 value columns on 2x2 (17 per node, then 9/8) and 14 on 4x2 (4/4/4/2, then halves): one axis alone
    cannot tell that the split is uneven, so the column form must run on every axis that splits the columns,
    its start nested over all of them (signatures.covers_uneven). Before, 34 on 2x2 found no signature and
    14 on 4x2 ran the column form on axis 0 beside an even split on axis 1, its start computed over axis 0
    alone; the named plan and the search agree."""
    plan = api.plan(spec_path(spec, tmp_path), mesh, strategy=strategy, force=[f"{TABLES[spec]}=dim"])
    (bag,) = [n for n in plan.nodes if n.op == "gather_weighted_sum"]
    assert bag.splits == ("cols_owned", "cols_owned")
    size = 34 if spec == "pkm-34" else 14
    assert dict(bag.local_attrs)["col_start"] == {"shard_start": [size, [0, 1], "chunks"]}

