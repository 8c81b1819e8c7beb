"""Every runtime.py collective and sharded op against single-process math, on 4 gloo ranks.

    torchrun --nproc_per_node 4 tests/dist/runtime_cases.py OUT_DIR

Runs each case on mesh (4,) and then on mesh (2, 2) in one process group. Every rank builds the
same global tensors from seeds (keyed by what they stand for, never by who computes them), so
each rank can compute the single-process answer for its own shard and assert on it. float64
throughout: comparisons are exact where no sum is reordered and within 1e-12 where one is.
Every call's counted bytes and calls are checked against the expected per-call payload, and
torch's CommDebugMode must see the same number of collectives as COMM_CALLS.

A failed assertion raises on that rank; torchrun then stops every rank and exits non-zero.
Rank 0 writes OUT_DIR/report.json (cases run, seconds each) and a runtime.dump of a few
parameters to OUT_DIR/dump.json for the test to read.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "backends"), str(ROOT / "compiler")]  # the files as an emitted program sees them

import collectives  # noqa: E402
import fsdp_groups  # noqa: E402
import ops  # noqa: E402
import runtime  # noqa: E402
import seeded  # noqa: E402
import train_data  # noqa: E402

TOL = 1e-12
F64 = torch.float64
F64_BYTES = 8


# ---- helpers ------------------------------------------------------------------------------------


def randn(key, shape):
    """A float64 tensor determined by ``key`` alone (every rank draws the same for the same key)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seeded.stable_seed(0, str(key))), dtype=F64)


def peers(mesh, axis):
    """The coordinates of this rank's group on ``axis``, in group order (coordinate 0, 1, ...)."""
    return [tuple(j if a == axis else c for a, c in enumerate(mesh.coords)) for j in range(mesh.shape[axis])]


def close(a, b, what):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= TOL, f"{what}: max abs difference {err}"


def equal(a, b, what):
    assert a.shape == b.shape and torch.equal(a, b), f"{what}: not equal"


class Expect:
    """Run a block; on exit check the counted calls and bytes it added and that CommDebugMode saw
    the same calls: ``with Expect({"all_gather": (1, 64)}):``  kind -> (calls, bytes)."""

    def __init__(self, expected):
        self.expected = {k: v for k, v in expected.items() if v[0]}

    def __enter__(self):
        self.calls, self.bytes = dict(runtime.COMM_CALLS), dict(runtime.COMM_BYTES)
        self.debug = runtime.comm_debug()
        self.seen = self.debug.__enter__()
        return self

    def __exit__(self, kind, value, tb):
        self.debug.__exit__(kind, value, tb)
        if kind is not None:
            return False
        calls = {k: v - self.calls.get(k, 0) for k, v in runtime.COMM_CALLS.items() if v != self.calls.get(k, 0)}
        sizes = {k: v - self.bytes.get(k, 0) for k, v in runtime.COMM_BYTES.items() if v != self.bytes.get(k, 0)}
        assert calls == {k: c for k, (c, _) in self.expected.items()}, (calls, self.expected)
        assert sizes == {k: b for k, (_, b) in self.expected.items()}, (sizes, self.expected)
        assert self.seen == calls, ("CommDebugMode", self.seen, calls)
        return False


def nbytes(shape, size=F64_BYTES):
    n = size
    for s in shape:
        n *= s
    return n


def runtime_rank(mesh, coords):
    """The rank at ``coords`` (row-major, as DeviceMesh lays ranks out)."""
    rank = 0
    for c, n in zip(coords, mesh.shape):
        rank = rank * n + c
    return rank


# ---- cases --------------------------------------------------------------------------------------


def case_shard_range(mesh):
    if mesh.shape == (2, 2):
        a, b = mesh.coords
        assert mesh.shard_range(16, (0, 1)) == (a * 8 + b * 4, a * 8 + b * 4 + 4)
        assert mesh.shard_range(16, (1, 0)) == (b * 8 + a * 4, b * 8 + a * 4 + 4)
        assert mesh.shard_range(16, (1,)) == (b * 8, b * 8 + 8)
        assert mesh.shard_range(16, ()) == (0, 16)
        try:
            mesh.shard_range(6, (0, 1))
        except ValueError as e:
            assert "6" in str(e)
        else:
            raise AssertionError("shard_range(6) over 2 x 2 must fail")
        full = torch.arange(16 * 6).reshape(16, 6)
        assert runtime.shard_ranges((16, 6), mesh, ("S(0)", "S(0)")) == ((a * 8 + b * 4, a * 8 + b * 4 + 4), (0, 6))
        assert runtime.shard_ranges((16, 6), mesh, ("S(1)", "S(0)")) == ((b * 8, b * 8 + 8), (a * 3, a * 3 + 3))
        equal(runtime.local_slice(full, mesh, ("S(0)", "S(0)")), full[a * 8 + b * 4:a * 8 + b * 4 + 4], "local_slice")
        equal(runtime.local_slice(full.double(), mesh, ("P", "S(1)")), full.double()[:, b * 3:b * 3 + 3] / 2, "P")
    else:
        (c,) = mesh.coords
        assert mesh.shard_range(16, (0,)) == (4 * c, 4 * c + 4)
    assert mesh.device_mesh.shape == mesh.shape
    assert mesh.rank == runtime_rank(mesh, mesh.coords)


def case_collectives(mesh):
    shape = (4, 8, 12)  # every dim splits over 4 and 2
    for axis, n in enumerate(mesh.shape):
        me = mesh.coords[axis]
        group = peers(mesh, axis)
        # all_reduce: P -> B; backward all_reduce of the gradient
        x = randn(("ar", mesh.coords), shape).requires_grad_()
        g = randn(("ar-g", mesh.coords), shape)
        with Expect({"all_reduce": (2, 2 * nbytes(shape))}):
            before = x.detach().clone()
            y = runtime.all_reduce(x, mesh, axis)
            equal(x.detach(), before, "all_reduce leaves x alone")
            y.backward(g)
        close(y.detach(), sum(randn(("ar", c), shape) for c in group), "all_reduce")
        close(x.grad, sum(randn(("ar-g", c), shape) for c in group), "all_reduce backward")

        for dim in range(3):
            # all_gather: S(dim) -> B; backward reduce_scatter along dim
            full = randn(("ag", axis, dim, [c for a, c in enumerate(mesh.coords) if a != axis]), shape)
            x = full.chunk(n, dim)[me].clone().requires_grad_()
            g = randn(("ag-g", mesh.coords), shape)
            with Expect({"all_gather": (1, nbytes(x.shape)), "reduce_scatter": (1, nbytes(shape))}):
                y = runtime.all_gather(x, mesh, axis, dim)
                y.backward(g)
            equal(y.detach(), full, f"all_gather dim {dim}")
            close(x.grad, sum(randn(("ag-g", c), shape) for c in group).chunk(n, dim)[me], "all_gather backward")

            # reduce_scatter: P -> S(dim); backward all_gather along dim
            x = randn(("rs", mesh.coords, dim), shape).requires_grad_()
            local = list(shape)
            local[dim] //= n
            g = randn(("rs-g", mesh.coords, dim), local)
            with Expect({"reduce_scatter": (1, nbytes(shape)), "all_gather": (1, nbytes(local))}):
                y = runtime.reduce_scatter(x, mesh, axis, dim)
                y.backward(g)
            close(y.detach(), sum(randn(("rs", c, dim), shape) for c in group).chunk(n, dim)[me], "reduce_scatter")
            equal(x.grad, torch.cat([randn(("rs-g", c, dim), local) for c in group], dim), "reduce_scatter backward")

            # slice_local: B -> S(dim), no communication; to_partial: B -> P
            x = randn(("sl", dim), shape).requires_grad_()
            with Expect({}):
                y = runtime.slice_local(x, mesh, axis, dim)
                (y.sum() + runtime.to_partial(x, mesh, axis).sum()).backward()
            equal(y.detach(), x.detach().chunk(n, dim)[me], "slice_local")
            mask = torch.zeros(shape, dtype=F64)
            mask.chunk(n, dim)[me].fill_(1)
            equal(x.grad, mask + 1 / n, "slice_local/to_partial backward")

            # all_to_all: S(src) -> S(dst); backward the inverse
            for src in range(3):
                if src == dim:
                    continue
                full = randn(("a2a", axis, src, dim, [c for a, c in enumerate(mesh.coords) if a != axis]), shape)
                gfull = randn(("a2a-g", axis, src, dim, [c for a, c in enumerate(mesh.coords) if a != axis]), shape)
                x = full.chunk(n, src)[me].clone().requires_grad_()
                with Expect({"all_to_all": (2, 2 * nbytes(x.shape))}):
                    y = runtime.all_to_all(x, mesh, axis, src, dim)
                    y.backward(gfull.chunk(n, dim)[me])
                equal(y.detach(), full.chunk(n, dim)[me], f"all_to_all {src}->{dim}")
                equal(x.grad, gfull.chunk(n, src)[me], f"all_to_all {src}->{dim} backward")

        # integer tensors pass through with no gradient
        ids = torch.arange(6).reshape(2, 3) + 10 * me
        with Expect({"all_gather": (1, nbytes(ids.shape)), "all_reduce": (1, nbytes(ids.shape))}):
            gathered = runtime.all_gather(ids, mesh, axis, 1)
            summed = runtime.all_reduce(ids, mesh, axis)
        equal(gathered, torch.cat([torch.arange(6).reshape(2, 3) + 10 * j for j in range(n)], 1), "int all_gather")
        equal(summed, sum(torch.arange(6).reshape(2, 3) + 10 * j for j in range(n)), "int all_reduce")
        assert not gathered.requires_grad and gathered.dtype == torch.int64

        # all_reduce_: in place, outside autograd; runtime's names are collectives.py's objects
        t = randn(("ar_", mesh.coords), (5,))
        with Expect({"all_reduce": (1, nbytes((5,)))}):
            out = runtime.all_reduce_(t, mesh, axis)
        assert out is t
        close(t, sum(randn(("ar_", c), (5,)) for c in group), "all_reduce_")
        assert runtime.all_reduce is collectives.all_reduce and runtime.COMM_CALLS is collectives.COMM_CALLS


def case_vocab_cross_entropy(mesh):
    b, t, vocab = 3, 5, 24
    axes_list = [(0,)] if len(mesh.shape) == 1 else [(1,), (0,), (0, 1)]
    for axes in axes_list:
        others = tuple(c for a, c in enumerate(mesh.coords) if a not in axes)  # data-parallel coords
        full = randn(("ce", axes, others), (b, t, vocab)) * 3
        targets = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(hash(others) % 1000))
        start, stop = mesh.shard_range(vocab, axes)
        logits = full[:, :, start:stop].clone().requires_grad_()
        n = 1
        for a in axes:
            n *= mesh.shape[a]
        per_axis = nbytes((b, t)) + nbytes((2, b, t))
        with Expect({"all_reduce": (2 * len(axes), per_axis * len(axes))}):
            loss = runtime.vocab_parallel_cross_entropy(logits, targets, mesh, axes, start)
            loss.backward()
        reference = full.clone().requires_grad_()
        ref = F.cross_entropy(reference.flatten(0, 1), targets.flatten())
        ref.backward()
        assert loss.dim() == 0
        close(loss.detach() * n, ref.detach(), f"vocab CE {axes}")
        total = loss.detach().clone()
        for a in axes:
            collectives.all_reduce_raw(total, mesh.group(a))
        close(total, ref.detach(), f"vocab CE {axes}: the shares sum to the mean")
        close(logits.grad, reference.grad[:, :, start:stop], f"vocab CE backward {axes}")


def nested_chunk(total, mesh, axes, coords):
    """(start, stop) of the indices ``coords`` holds of ``total`` split over ``axes`` outer first, by
    torch.chunk itself (DTensor's nested Shard), independently of Mesh.shard_range; (0, 0) for none."""
    part = torch.arange(total)
    for a in axes:
        chunks = part.chunk(mesh.shape[a])
        part = chunks[coords[a]] if coords[a] < len(chunks) else part[:0]
    return (int(part[0]), int(part[-1]) + 1) if part.numel() else (0, 0)


def group_peers(mesh, axes):
    """The coordinates of this rank's group spanning ``axes`` (its other coordinates fixed), in group order."""
    out = []
    for sub in itertools.product(*(range(mesh.shape[a]) for a in axes)):
        coords = list(mesh.coords)
        for a, c in zip(axes, sub):
            coords[a] = c
        out.append(tuple(coords))
    return out


def expert_case(mesh, axes, num_experts, activation, routing):
    """ep ffn over mesh ``axes`` on this rank's tokens vs ops.expert_ffn; weights' gradients vs the sum of
    every group member's reference gradients. ``routing(coords)`` gives (b, t, k) indices. The experts
    split in torch.chunk's nested shares (uneven where they do not divide); returns the rows received."""
    b, t, d, f, k = 2, 3, 4, 5, 2
    n = math.prod(mesh.shape[a] for a in axes)
    w_up, w_gate, w_down = (randn(("w", i), s) for i, s in
                            enumerate([(num_experts, f, d), (num_experts, f, d), (num_experts, d, f)]))
    if activation == "gelu":
        w_gate = w_up

    def tokens(coords):
        return randn(("x", coords), (b, t, d)), routing(coords), randn(("gates", coords), (b, t, k)).softmax(-1)

    def reference(coords):
        x, idx, gates = tokens(coords)
        leaves = [x.requires_grad_(), gates.requires_grad_(), w_up.clone().requires_grad_(),
                  w_gate.clone().requires_grad_(), w_down.clone().requires_grad_()]
        wg = leaves[2] if activation == "gelu" else leaves[3]
        y = ops.expert_ffn(leaves[0], idx, leaves[1], leaves[2], wg, leaves[4], activation)
        (y * randn(("g", coords), (b, t, d))).sum().backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in leaves]
        return y.detach(), grads

    x, idx, gates = tokens(mesh.coords)
    x.requires_grad_()
    gates.requires_grad_()
    start, stop = nested_chunk(num_experts, mesh, axes, mesh.coords)
    shard = slice(start, stop)
    mine = [w_up[shard].clone().requires_grad_(), w_gate[shard].clone().requires_grad_(),
            w_down[shard].clone().requires_grad_()]
    wg = mine[0] if activation == "gelu" else mine[1]
    assignments = b * t * k
    peers_ = group_peers(mesh, axes)
    received = sum(int(((routing(c) >= start) & (routing(c) < stop)).sum()) for c in peers_)
    forward_bytes = 8 * n + 8 * assignments + nbytes((assignments, d)) + nbytes((received, d))
    backward_bytes = nbytes((assignments, d)) + nbytes((received, d))
    where = {"axis": axes[0]} if len(axes) == 1 else {"axes": tuple(axes)}
    with Expect({"all_to_all": (6, forward_bytes + backward_bytes)}):
        y = runtime.expert_parallel_ffn(x, idx, gates, mine[0], wg, mine[2], activation=activation, mesh=mesh,
                                        num_experts=num_experts, **where)
        (y * randn(("g", mesh.coords), (b, t, d))).sum().backward()
    ref_y, ref_grads = reference(mesh.coords)
    what = f"ep ffn {activation} axes {tuple(axes)} experts {num_experts}"
    close(y.detach(), ref_y, what)
    close(x.grad, ref_grads[0], what + " dx")
    close(gates.grad, ref_grads[1], what + " dgates")
    summed = [torch.zeros_like(w) for w in (w_up, w_gate, w_down)]
    for c in peers_:
        _, grads = reference(c)
        for s, g in zip(summed, grads[2:]):
            s += g
    names = ("w_up", "w_gate", "w_down")
    for name, p, s in zip(names, mine, summed):
        if activation == "gelu" and name == "w_gate":
            continue  # the same tensor as w_up here
        if p.numel():  # a rank holding no experts has no weight to differentiate
            assert p.grad is not None, f"{what}: {name} has no gradient (received {received} rows)"
            close(p.grad, s[shard], f"{what} d{name}")
    return received


def case_expert_parallel(mesh):
    def topk_routing(num_experts):
        def route(coords):
            scores = randn(("route", num_experts, coords), (2, 3, num_experts))
            return scores.topk(2, dim=-1).indices
        return route

    axes = [0] if len(mesh.shape) == 1 else [0, 1]
    for axis in axes:
        n = mesh.shape[axis]
        for activation in ("swiglu", "gelu"):
            expert_case(mesh, (axis,), 2 * n, activation, topk_routing(2 * n))
        # every token picks experts of coordinate 0 only: the other coordinates receive nothing
        starved = expert_case(mesh, (axis,), 2 * n, "swiglu", lambda coords: torch.tensor([0, 1]).expand(2, 3, 2).clone())
        assert (starved == 0) == (mesh.coords[axis] != 0), starved
    # one expert per rank on the world axis, experts with uneven loads
    expert_case(mesh, (0,), mesh.shape[0], "swiglu", topk_routing(mesh.shape[0]))
    if len(mesh.shape) == 1:
        return
    # both axes of 2x2, one group of 4: 8 experts in 2s; 6 in torch.chunk's nested shares (3 | 3, then 2, 1
    # per node: 2/1/2/1); 3 experts (2 | 1, then 1/1/1/0: the last rank holds none and receives nothing)
    for experts in (8, 6, 3):
        for activation in ("swiglu", "gelu"):
            expert_case(mesh, (0, 1), experts, activation, topk_routing(experts))
    empty = expert_case(mesh, (0, 1), 3, "swiglu", topk_routing(3))
    assert (empty == 0) == (mesh.coords == (1, 1)), empty
    starved = expert_case(mesh, (0, 1), 8, "swiglu", lambda coords: torch.tensor([6, 7]).expand(2, 3, 2).clone())
    assert (starved == 0) == (mesh.coords != (1, 1)), starved
    # two of three axes (1x2x2): groups made with new_group, all four ranks on axes 1, 2; two groups of two
    # (ranks 0, 1 and 2, 3) on axes 0, 2, where 3 experts split 2/1 in each
    wide = runtime.Mesh((1, 2, 2), mesh.device)
    expert_case(wide, (1, 2), 6, "swiglu", topk_routing(6))
    expert_case(wide, (0, 2), 3, "gelu", topk_routing(3))


def case_params(mesh, out_dir):
    shape = (1024, 512)  # 2 MB in float32; 128 rows (256 kB) a block
    layouts = [("S(0)",), ("S(1)",), ("B",)] if len(mesh.shape) == 1 else \
        [("S(0)", "S(0)"), ("S(1)", "S(0)"), ("B", "S(1)"), ("S(0)", "B"), ("B", "B")]
    full = seeded.init_full("layers.0.w", shape, "normal", 0.02, 5)
    runtime.reset_counters()
    named = []
    for sbp in layouts:
        p = runtime.param("layers.0.w", shape, "normal", 0.02, 5, mesh, sbp, seeded.init_shard)
        assert isinstance(p, torch.nn.Parameter)
        equal(p.detach(), runtime.local_slice(full, mesh, sbp), f"param {sbp}")
        before = (dict(runtime.COMM_BYTES), dict(runtime.COMM_CALLS))
        with runtime.comm_debug() as seen:
            equal(runtime.gather_full(p, mesh, sbp), full, f"param {sbp} assembled")
        # gather_full's collectives ran (torch saw one all_gather per split axis) but are checks,
        # not the step: nothing was counted
        assert seen == ({"all_gather": sum(e != "B" for e in sbp)} if "S(0)" in sbp or "S(1)" in sbp else {}), seen
        assert (dict(runtime.COMM_BYTES), dict(runtime.COMM_CALLS)) == before
        named.append((f"w{sbp}", p, sbp))
    split = layouts[0]
    local_bytes = nbytes(shape, 4) // 4
    assert runtime.PARAM_BYTES == sum(p.numel() * 4 for _, p, _ in named)
    if "B" not in split:  # a fully split parameter: this rank held its quarter and one block, never 2 MB
        stats = {}
        seeded.init_shard("layers.0.w", shape, "normal", 0.02, 5,
                          runtime.shard_ranges(shape, mesh, split), stats=stats)
        assert stats["peak_bytes"] <= local_bytes + 128 * 512 * 4
    assert runtime.INIT_PEAK_BYTES == nbytes(shape, 4) + 128 * 512 * 4  # the "B" layouts made the whole
    try:
        runtime.param("x", (4, 4), "normal", 0.02, 5, mesh, ("P",) * len(mesh.shape), seeded.init_shard)
    except ValueError as e:
        assert "partial" in str(e)
    else:
        raise AssertionError("a P parameter must be refused")

    # dump: every rank's counters reach rank 0; its own gathering is not counted
    runtime.reset_counters()
    small = [runtime.param("a", (8, 4), "normal", 0.02, 5, mesh, split, seeded.init_shard)]
    x = runtime.all_reduce(torch.ones(3, dtype=F64) * (mesh.rank + 1), mesh, 0)
    close(x, sum(torch.ones(3, dtype=F64) * (runtime_rank(mesh, c) + 1) for c in peers(mesh, 0)), "all_reduce")
    runtime.COMM_BYTES["probe"] = mesh.rank  # a per-rank marker the test finds in comm_by_rank
    dump_path = str(out_dir / f"dump-{'x'.join(map(str, mesh.shape))}.json")
    before = dict(runtime.COMM_BYTES)
    with runtime.comm_debug(enabled=False) as seen:
        runtime.dump(dump_path, mesh, [1.0, 0.5], [("a", small[0], split)], {"steps": 2})
    assert seen == {}  # disabled: nothing recorded
    assert dict(runtime.COMM_BYTES) == before


def bucket_loss(params, coords):
    """A small float64 model of this rank's data: w3 is used on rank 0 only, w4 never."""
    w1, w2, w3, _unused, w5 = params
    x = randn(("bucket data", tuple(coords)), (7, 6))
    h = torch.tanh(x @ w1) * w2
    y = h @ w5
    if all(c == 0 for c in coords):
        y = y + (h @ w3.T).sum(dim=-1, keepdim=True)
    return (y ** 2).mean()


def case_grad_buckets(mesh):
    """runtime.GradBuckets against the sum of every rank's gradient computed here: buckets launched
    during the backward in order, one held back on some ranks (w3, used on rank 0 only: the others
    send zeros and receive rank 0's gradient), one no rank fills (w4: its .grad stays None, as a
    single-process run leaves it), a two-step bucket on the 2x2 mesh; two steps, reusing buffers."""
    shapes = [(6, 5), (5,), (4, 5), (3,), (5, 5)]
    params = [torch.nn.Parameter(randn(("bucket w", i), s)) for i, s in enumerate(shapes)]
    w1, w2, w3, w4, w5 = params
    both = tuple(("all_reduce", a) for a in reversed(range(len(mesh.shape))))
    buckets = [([w5, w2], both), ([w3], (("all_reduce", 0),)), ([w1], (("all_reduce", 0),)),
               ([w4], (("all_reduce", 0),))]
    sync = runtime.GradBuckets(mesh, buckets)
    expected_calls = sum(len(steps) for _, steps in buckets)
    expected_bytes = sum(len(steps) * nbytes((sum(p.numel() for p in ps),)) for ps, steps in buckets)

    def peers_on(axes):
        return [tuple(c[a] if a in axes else mine for a, mine in enumerate(mesh.coords))
                for c in itertools.product(*(range(n) for n in mesh.shape))
                if all(c[a] == m for a, m in enumerate(mesh.coords) if a not in axes)]

    def reference(coords_list):
        total = [torch.zeros(s, dtype=F64) for s in shapes]
        used = [False] * len(shapes)
        for coords in coords_list:
            leaves = [p.detach().clone().requires_grad_() for p in params]
            bucket_loss(leaves, coords).backward()
            for i, leaf in enumerate(leaves):
                if leaf.grad is not None:
                    total[i] += leaf.grad
                    used[i] = True
        return [t if u else None for t, u in zip(total, used)]

    for _ in range(2):
        for p in params:
            p.grad = None
        with Expect({"all_reduce": (expected_calls, expected_bytes)}):
            bucket_loss(params, mesh.coords).backward()
            sync.finish()
        every = reference(peers_on(set(range(len(mesh.shape)))))
        axis0 = reference(peers_on({0}))
        for i, want in enumerate([axis0[0], every[1], axis0[2], axis0[3], every[4]]):
            if want is None:
                assert params[i].grad is None, f"w{i + 1} reached no rank, yet has a gradient"
            else:
                close(params[i].grad, want, f"bucketed gradient of w{i + 1}")
        assert w4.grad is None
        assert (w3.grad is None) == (mesh.shape == (2, 2) and mesh.coords[1] != 0)
    try:
        runtime.GradBuckets(mesh, [([w1], (("reduce_scatter", 0),))])
    except ValueError as e:
        assert "all_reduce" in str(e)
    else:
        raise AssertionError("a reduce_scatter bucket must be refused")


def case_gather_group(mesh):
    """runtime.gather_group: shards of differently shaped parameters split on different dims give
    each full parameter (built here from seeds) by one all_gather; the backward gives each shard
    its chunk of the sum over the group of every rank's gradient, by one reduce_scatter."""
    shapes, dims = [(8, 4), (4,), (4, 12), (3, 8, 2)], (0, 0, 1, 1)
    for axis, n in enumerate(mesh.shape):
        me, group = mesh.coords[axis], peers(mesh, axis)
        rest = [c for a, c in enumerate(mesh.coords) if a != axis]
        fulls = [randn(("gg", axis, k, rest), s) for k, s in enumerate(shapes)]
        shards = [f.chunk(n, d)[me].clone().requires_grad_() for f, d in zip(fulls, dims)]
        grads = [randn(("gg-g", k, mesh.coords), s) for k, s in enumerate(shapes)]
        local = sum(nbytes(x.shape) for x in shards)
        with Expect({"all_gather": (1, local), "reduce_scatter": (1, n * local)}):
            outs = runtime.gather_group(shards, mesh, axis, dims)
            torch.autograd.backward(outs, grads)
        for k, (out, full, shard, d) in enumerate(zip(outs, fulls, shards, dims)):
            equal(out.detach(), full, f"gather_group parameter {k}")
            want = sum(randn(("gg-g", k, c), shapes[k]) for c in group).chunk(n, d)[me]
            close(shard.grad, want, f"gather_group gradient {k}")
        # two groups, the second prefetched while the first "computes": the same calls and bytes,
        # the same values; each reduce-scatter is waited for when its shards' gradients are due
        fresh = [s.detach().clone().requires_grad_() for s in shards]
        halves = [fresh[:2], fresh[2:]]
        with Expect({"all_gather": (2, local), "reduce_scatter": (2, n * local)}):
            first = runtime.gather_group(halves[0], mesh, axis, dims[:2])
            runtime.prefetch_group(halves[1], mesh, axis, dims[2:])
            first = [2 * out for out in first]  # the layer before computing
            second = runtime.gather_group(halves[1], mesh, axis, dims[2:])
            torch.autograd.backward([*first, *second], [g / 2 if k < 2 else g for k, g in enumerate(grads)])
        assert not fsdp_groups._PREFETCHED
        for k, (out, full, shard, d) in enumerate(zip([*first, *second], fulls, fresh, dims)):
            equal(out.detach(), full * (2 if k < 2 else 1), f"prefetched gather_group parameter {k}")
            want = sum(randn(("gg-g", k, c), shapes[k]) for c in group).chunk(n, d)[me]
            close(shard.grad, want, f"prefetched gather_group gradient {k}")


DATA_LAYOUTS = {(4,): [("S(0)",), ("S(1)",), ("B",)],
                (2, 2): [("S(0)", "S(0)"), ("S(0)", "S(1)"), ("S(1)", "S(0)"), ("B", "S(1)"), ("S(0)", "B")]}


def case_data_windows(mesh):
    """train_data's window: each rank's part of a step's batch equals the plan layout's slice of the
    whole batch (inputs and targets both: batch split, sequence split, both at once), and it reads
    only its own ids from the file."""
    batch, seq = 8, 12
    ids = np.random.default_rng(7).integers(0, 60000, size=500).astype(np.uint16)
    with tempfile.TemporaryDirectory() as tmp:  # every rank its own copy: nothing shared but the seed
        path = os.path.join(tmp, "tokens.bin")
        ids.tofile(path)
        tokens = train_data.TokenFile(path)
        for sbp in DATA_LAYOUTS[mesh.shape]:
            part = runtime.shard_ranges((batch, seq), mesh, sbp)
            for step in (0, 5):
                whole = tokens.window(3, step, batch, seq, ((0, batch), (0, seq)))
                before = tokens.elements_read
                mine = tokens.window(3, step, batch, seq, part)
                (r0, r1), (c0, c1) = part
                assert tokens.elements_read - before == (r1 - r0) * (c1 - c0 + 1), (sbp, "read more than its part")
                equal(mine[:, :-1], runtime.local_slice(whole[:, :-1], mesh, sbp), f"inputs under {sbp}")
                equal(mine[:, 1:], runtime.local_slice(whole[:, 1:], mesh, sbp), f"targets under {sbp}")
        del tokens  # the memmap, before its directory goes


def case_routed_pools(mesh):
    """table_parallel's routed fused poolings (UltraMem's, UltraMemV2's), the table's 13 rows split over
    one mesh axis and over both (the routing nests; torch.chunk's uneven shares): this rank's pooling
    and its weights' gradient equal ops.gather_core_pool / gather_ive_pool on the whole table, and the
    shard's gradient is its rows of the whole table's over every token of the ranks that share it;
    4 all_to_all calls per axis (counts, ids, rows back; the rows' gradients)."""
    import table_parallel

    rows, v, cores, blocks, b, t, h, m = 13, 6, 2, 3, 2, 3, 2, 4
    axes_list = [(0,)] if len(mesh.shape) == 1 else [(1,), (0, 1)]

    def picks(axes, coords):
        gen = torch.Generator().manual_seed(seeded.stable_seed(0, str(("routed picks", axes, coords))))
        return (torch.randint(0, rows, (b, t, h, m), generator=gen), torch.randint(0, blocks, (b, t, h, m), generator=gen),
                torch.randn(b, t, h, cores, m, generator=gen, dtype=F64))

    for axes, ive in itertools.product(axes_list, (False, True)):
        whole = randn(("routed table", axes), (rows, v))
        start, stop = mesh.shard_range(rows, axes, chunks=True)
        table = whole[start:stop].clone().requires_grad_()
        ids, block_ids, weights = picks(axes, tuple(mesh.coords))
        weights.requires_grad_()
        calls = runtime.COMM_CALLS.get("all_to_all", 0)
        if ive:
            out = table_parallel.routed_gather_ive_pool(table, ids, weights, block_ids, num_blocks=blocks, mesh=mesh,
                                                        axes=axes, num_rows=rows)
        else:
            out = table_parallel.routed_gather_core_pool(table, ids, weights, mesh=mesh, axes=axes, num_rows=rows)
        out.backward(randn(("routed grad", axes, ive, tuple(mesh.coords)), out.shape))
        assert runtime.COMM_CALLS["all_to_all"] - calls == 4 * len(axes), (axes, ive)
        reference = whole.clone().requires_grad_()
        sharing = [tuple(j[axes.index(a)] if a in axes else c for a, c in enumerate(mesh.coords))
                   for j in itertools.product(*(range(mesh.shape[a]) for a in axes))]
        for coords in sharing:
            i, bl, w = picks(axes, coords)
            w.requires_grad_()
            ref = ops.gather_ive_pool(reference, i, w, bl, blocks) if ive else ops.gather_core_pool(reference, i, w)
            ref.backward(randn(("routed grad", axes, ive, coords), ref.shape))
            if coords == tuple(mesh.coords):
                close(out.detach(), ref.detach(), f"routed pool {axes} ive={ive}")
                close(weights.grad, w.grad, f"routed pool {axes} ive={ive}: the weights' gradient")
        close(table.grad, reference.grad[start:stop], f"routed pool {axes} ive={ive}: the shard's gradient")


CASES = [("shard_range", case_shard_range), ("data_windows", case_data_windows), ("collectives", case_collectives),
         ("vocab_cross_entropy", case_vocab_cross_entropy), ("expert_parallel", case_expert_parallel),
         ("grad_buckets", case_grad_buckets), ("gather_group", case_gather_group), ("routed_pools", case_routed_pools)]


def main():
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    report = []
    for shape in [(4,), (2, 2)]:
        start = time.perf_counter()
        threads_before = set(os.listdir("/proc/self/task"))
        mesh, owned = runtime.setup(shape)
        assert not owned
        # each CPU rank on its own cores of the host's (more ranks than cores: round robin)
        mine = runtime.rank_cores(runtime.HOST_CORES, int(os.environ["LOCAL_RANK"]), 4)
        assert sorted(os.sched_getaffinity(0)) == mine, (os.sched_getaffinity(0), mine)
        # the threads the mesh's process groups started (gloo's workers) run on every core of the host,
        # not on this rank's own beside it (runtime.on_host_cores); the 2x2 mesh makes new groups
        started = set(os.listdir("/proc/self/task")) - threads_before
        assert started or shape == (4,), f"mesh {shape}: no process group threads started"
        for tid in started:
            assert sorted(os.sched_getaffinity(int(tid))) == runtime.HOST_CORES, (shape, tid, runtime.HOST_CORES)
        report.append({"mesh": shape, "case": "setup", "seconds": time.perf_counter() - start})
        for name, case in CASES:
            start = time.perf_counter()
            case(mesh)
            report.append({"mesh": shape, "case": name, "seconds": time.perf_counter() - start})
        start = time.perf_counter()
        case_params(mesh, out_dir)
        report.append({"mesh": shape, "case": "params", "seconds": time.perf_counter() - start})
        dist.barrier()
    if dist.get_rank() == 0:
        (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    runtime.finish()  # without interpreter teardown, where gloo can abort a finished rank
