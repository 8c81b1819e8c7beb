"""Time every fused kernel against the unfused PyTorch ops it replaces, forward and backward, and
print the bytes each moves per second as a fraction of the memory bandwidth, and the speedups.

Kernels (backends/triton_*.py) and what each is timed against:
  gather_weighted_sum  gather_rows + weighted_sum;  F.embedding_bag (ops.gather_weighted_sum's torch form)
  gather_row_dot       gather_rows + row_dot;       ops.gather_row_dot's torch form (einsum, embedding_bag back)
  gather_core_pool     gather_rows + core_pool;     its torch form (embedding_bag over core column groups)
  gather_ive_pool      gather_rows + ive_pool;      its torch form (embedding_bag bags cut per block)
  add_rms_norm         add + rms_norm;              its torch form
  pk_topk              topk, take, grid_scores, grid_indices, topk, take (forward: indices have no gradient)
  pk_slot_scores       the gathers of the slots' two key scores (forward and backward)
  tucker_topk          topk, take_ranked, tucker_grid, sum_cores, grid_indices, topk, take; ops.tucker_topk's
                       torch form (the same with a stable sort for the tie rule); forward only (indices)

Paper sizes on a GPU (the defaults: a table of 2^20 rows, value dim 512, top-k 128, 16384 tokens;
PKM's N = 1024 keys per half; 4 product-key heads; UltraMem's Tucker rank 2, 2 cores and top-k 32, its
grid a half_k^2 tile in one program's registers), one pass over every kernel in well under 5 minutes:

    python bench/kernels.py                      # on CUDA
    python bench/kernels.py --dim 1024 --topk 256 --tokens 65536 --kernels gather_weighted_sum

Timing: CUDA events around each call after ``--warmup`` calls (Triton compiles on the first), the
median of ``--repeat``; the backward is (forward + backward) - forward. Bytes: the least a fused
kernel must move (each input read once, each selected row read once, each output written once; the
backward also reads the rows again and read-modify-writes one gradient row per pick), the same
figure for every path, so the fraction of bandwidth compares paths fairly. Bandwidth: the device's
HBM figure from ``BANDWIDTH`` by name (vendor datasheets), or ``--bandwidth``.

``--check`` also compares every path with the first (the unfused ops, or the torch form where there
are none) before timing it: the forward's output and each input's gradient, as the largest difference
over the largest reference value (at most ``TOLERANCE`` for the dtype: atomics add in another order on
a GPU), and integer outputs (selected slots) row by row (at most ``--slot-rows`` of them may differ:
equal scores are ranked by the lowest index in the kernels, in no fixed order by torch.topk; 0 by
default, and at small sizes in float32 nothing ties), printing each figure; a path off by more ends
the run with exit status 1. In bfloat16 the reference is the first path run in float32 on the same
values, and every path is compared with it: two bf16 paths can each be near the float32 result and
twice as far from each other. On a GPU this checks the kernels as Triton compiles them for the device,
where the unit tests check them only under the interpreter (tests/gpu/ runs it at awkward sizes).

On the CPU (``--tiny``: toy sizes) the Triton path needs TRITON_INTERPRET=1 and is slow; the CPU
path exists so the script is tested (tests/unit/test_triton_gather.py), not for its figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from ultraplan.compiler import ops, ops_fused

ROOT = Path(__file__).resolve().parents[1]
# --check: the largest difference from the reference path over its largest value, by dtype. float32: the
# gradients of a table sum many picks by atomic adds in no fixed order; bfloat16: a few steps of its 2^-8
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# peak memory bandwidth, bytes/s, by a substring of torch.cuda.get_device_name() (vendor datasheets)
BANDWIDTH = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12,
             "A100": 1.555e12, "L40S": 0.864e12, "L4": 0.3e12, "A10G": 0.6e12, "MI300X": 5.3e12}


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "backends" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bandwidth(device: str, given: float | None) -> float:
    """The memory bandwidth the fractions are of: ``given``, else the device's datasheet figure."""
    if given:
        return given
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, value in BANDWIDTH.items():
            if key in name:
                return value
        raise SystemExit(f"bench/kernels.py: no bandwidth known for {name!r}; pass --bandwidth BYTES_PER_S")
    return 2e10  # a nominal CPU figure (the CPU path is a smoke test)


class Timer:
    """Median seconds of a call: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: str, warmup: int, repeat: int) -> None:
        self.device, self.warmup, self.repeat = device, warmup, repeat

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeat):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                start_s = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start_s)
        return sorted(times)[len(times) // 2]


def cases(a: argparse.Namespace, dev: str, dtype: torch.dtype) -> dict[str, dict]:
    """Per kernel: its inputs (those with a gradient first), output gradient, paths and bytes (fwd, bwd)."""
    gen = torch.Generator(device=dev).manual_seed(0)
    e = torch.finfo(dtype).bits // 8
    t, n, d, rows, cores, blocks, m = a.tokens, a.topk, a.dim, a.rows, a.cores, a.blocks, a.tucker_topk

    def rand(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, device=dev, generator=gen).to(dtype).requires_grad_(grad)

    ids = torch.randint(0, rows, (t, 1, 1, n), device=dev, generator=gen)
    picks = t * n * (8 + e) + t * n * d * e  # ids, a weight and a row per pick
    back = t * d * e + t * n * (8 + e) + 3 * t * n * d * e + t * n * e  # rows again, scatter RMW, weight grads
    gather, pool, norm, topk, tucker = (_module(f"triton_{m}") for m in ("gather", "pool", "norm", "topk", "tucker"))
    table, weights = rand(rows, d), rand(t, 1, 1, n)
    core_weights, block_ids = rand(t, 1, 1, cores, n), torch.randint(0, blocks, (t, 1, 1, n), device=dev, generator=gen)
    x, y, w = rand(t, d), rand(t, d), rand(d)
    half_n, heads = a.keys, a.heads
    half = rand(t, 1, heads, 2, half_n)
    slots = ops.pk_topk(half, n, n, half_n)
    ranked = rand(t, 1, heads, 2, a.ranks, half_n, grad=False)
    tucker_cores = rand(heads, cores, a.ranks, a.ranks, grad=False)
    filtered = ops.rank_one_scores(ranked, rand(2, heads, a.ranks, grad=False))
    torch_pool = ops_fused._PoolRows.apply
    return {
        "gather_weighted_sum": dict(
            inputs=(table, weights), rest=(ids,), grad=rand(t, 1, d, grad=False),
            paths={"unfused": lambda tb, wt, i: ops.weighted_sum(ops.gather_rows(tb, i), wt),
                   "embedding_bag": lambda tb, wt, i: ops._bag(tb, i, wt),
                   "triton": lambda tb, wt, i: gather.gather_weighted_sum(tb, i, wt)},
            bytes=(picks + t * d * e, back)),
        "gather_row_dot": dict(
            inputs=(table, x.view(t, 1, d)), rest=(ids,), grad=rand(t, 1, 1, n, grad=False),
            paths={"unfused": lambda tb, h, i: ops.row_dot(h, ops.gather_rows(tb, i)),
                   "torch": lambda tb, h, i: ops._GatherRowDot.apply(tb, i, h),
                   "triton": lambda tb, h, i: gather.gather_row_dot(tb, i, h)},
            bytes=(picks - t * n * e + t * d * e + t * n * e, back)),
        "gather_core_pool": dict(
            inputs=(table, core_weights), rest=(ids.view(t, 1, 1, n),), grad=rand(t, 1, d, grad=False),
            paths={"unfused": lambda tb, wt, i: ops.core_pool(ops.gather_rows(tb, i), wt),
                   "torch": lambda tb, wt, i: torch_pool(tb, i, wt, None, 1, 0, d),
                   "triton": lambda tb, wt, i: pool.pool_rows(tb, i, wt, None, 1, 0, d)},
            bytes=(picks + (cores - 1) * t * n * e + t * d * e, back + (cores - 1) * 2 * t * n * e)),
        "gather_ive_pool": dict(
            inputs=(table, core_weights), rest=(ids, block_ids), grad=rand(t, 1, blocks * d, grad=False),
            paths={"unfused": lambda tb, wt, i, bl: ops.ive_pool(ops.gather_rows(tb, i), wt, bl, blocks),
                   "torch": lambda tb, wt, i, bl: torch_pool(tb, i, wt, bl, blocks, 0, d),
                   "triton": lambda tb, wt, i, bl: pool.pool_rows(tb, i, wt, bl, blocks, 0, d)},
            bytes=(picks + (cores - 1 + 8 // e) * t * n * e + t * blocks * d * e,
                   back + (cores - 1) * 2 * t * n * e + t * n * 8 + t * (blocks - 1) * d * e)),
        "add_rms_norm": dict(
            inputs=(x, y, w), rest=(), grad=rand(t, 2, d, grad=False),
            paths={"unfused": lambda p, q, g: torch.stack((s := ops.add(p, q), ops.rms_norm(s, g, 1e-6)), -2),
                   "torch": lambda p, q, g: ops._AddRmsNorm.apply(p, q, g, 1e-6),
                   "triton": lambda p, q, g: norm.add_rms_norm(p, q, g, 1e-6)},
            bytes=(4 * t * d * e + 4 * t, 4 * t * d * e + t * d * 4 + 4 * t)),
        "pk_topk": dict(
            inputs=(), rest=(half.detach(),), grad=None,
            paths={"unfused": lambda hs: _unfused_topk(hs, n, n, half_n),
                   "triton": lambda hs: topk.pk_topk(hs, n, n, half_n)},
            bytes=(t * heads * (2 * half_n * e + n * 8), 0)),
        "pk_slot_scores": dict(
            inputs=(half,), rest=(slots,), grad=rand(t, 1, heads, n, grad=False),
            paths={"torch": lambda hs, sl: ops.pk_slot_scores(hs, sl, half_n),
                   "triton": lambda hs, sl: topk.pk_slot_scores(hs, sl, half_n)},
            bytes=(t * heads * n * (8 + 3 * e), t * heads * (n * (8 + e) + 2 * n * 4 + 2 * half_n * 4))),
        "tucker_topk": dict(  # half_k = k = m; the kept keys' rank scores and the list scratch as well
            inputs=(), rest=(filtered, ranked, tucker_cores), grad=None,
            paths={"unfused": lambda f, sc, co: _unfused_tucker(f, sc, co, m, m, half_n),
                   "torch": lambda f, sc, co: ops.tucker_topk(f, sc, co, m, m, half_n),
                   "triton": lambda f, sc, co: tucker.tucker_topk(f, sc, co, m, m, half_n)},
            bytes=(t * heads * (2 * half_n * e + 2 * a.ranks * m * e + 2 * m * 16 + m * 8), 0)),
    }


def outputs(fn: Callable[[], torch.Tensor], inputs: tuple, grad: torch.Tensor | None) -> list[torch.Tensor]:
    """A path's forward output and, where the kernel has a backward, each input's gradient."""
    out = fn()
    if grad is None:
        return [out.detach()]
    return [out.detach(), *torch.autograd.grad(out, inputs, grad)]


def difference(got: list[torch.Tensor], want: list[torch.Tensor]) -> tuple[float, float]:
    """The largest difference over the largest reference value, and the fraction of rows of an integer
    output (the slots a token and head select) that are not the reference's."""
    worst, rows = 0.0, 0.0
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape:
            return float("inf"), 1.0
        if not w.numel():
            continue
        if not w.is_floating_point():
            rows = max(rows, (g != w).reshape(-1, w.shape[-1]).any(-1).float().mean().item())
        else:
            scale = w.float().abs().max().item() or 1.0
            worst = max(worst, (g.float() - w.float()).abs().max().item() / scale)
    return worst, rows


def _unfused_topk(half: torch.Tensor, half_k: int, k: int, num_keys: int) -> torch.Tensor:
    best = ops.topk_indices(half, half_k)
    grid = ops.grid_scores(ops.take(half, best))
    return ops.take(ops.grid_indices(best, num_keys), ops.topk_indices(grid, k))


def _unfused_tucker(filtered: torch.Tensor, scores: torch.Tensor, cores: torch.Tensor, half_k: int, k: int,
                    num_keys: int) -> torch.Tensor:
    best = ops.topk_indices(filtered, half_k)
    grid = ops.tucker_grid(ops.take_ranked(scores, best), cores)
    return ops.take(ops.grid_indices(best, num_keys), ops.topk_indices(ops.sum_cores(grid), k))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1 << 20)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--topk", type=int, default=128, help="picks per token (and PKM's half_k = k)")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--keys", type=int, default=1024, help="product keys per half")
    p.add_argument("--heads", type=int, default=4, help="product-key heads")
    p.add_argument("--cores", type=int, default=2, help="UltraMem cores (they divide --dim)")
    p.add_argument("--ranks", type=int, default=2, help="UltraMem's Tucker rank")
    p.add_argument("--tucker-topk", type=int, default=32, help="UltraMem's top-k (and half_k) for tucker_topk")
    p.add_argument("--blocks", type=int, default=4, help="UltraMem's implicit value expansion E")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--kernels", default="", help="comma-separated names (default: all)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bandwidth", type=float, default=None, help="memory bytes/s (default: the device's, by name)")
    p.add_argument("--tiny", action="store_true", help="toy sizes (the CPU smoke test)")
    p.add_argument("--check", action="store_true", help="compare every path with the first; exit 1 if one is off")
    p.add_argument("--slot-rows", type=float, default=0.0,
                   help="--check: the fraction of selected-slot rows that may differ (ties: the kernels take the "
                        "lowest index, torch.topk any; default 0)")
    p.add_argument("--json-out", default=None, help="write the rows here as well")
    a = p.parse_args(argv)
    if a.tiny:
        a.rows, a.dim, a.topk, a.tokens, a.keys, a.heads, a.cores, a.blocks, a.tucker_topk = 37, 6, 3, 3, 5, 2, 2, 2, 3
        a.warmup, a.repeat = 0, 1
    dev, bw, dtype = a.device, bandwidth(a.device, a.bandwidth), getattr(torch, a.dtype)
    timer = Timer(dev, a.warmup, a.repeat)
    all_cases = cases(a, dev, dtype)
    chosen = a.kernels.split(",") if a.kernels else list(all_cases)
    print(f"fused kernels on {torch.cuda.get_device_name() if dev == 'cuda' else dev}, {a.dtype}: rows={a.rows} "
          f"dim={a.dim} topk={a.topk} tokens={a.tokens} keys={a.keys} heads={a.heads}; bandwidth {bw:.3g} B/s")
    results, failed = [], []
    for name in chosen:
        case = all_cases[name]
        fwd_bytes, bwd_bytes = case["bytes"]
        rows, reference = [], None
        for path, fn in case["paths"].items():
            def forward(fn=fn, case=case):
                return fn(*case["inputs"], *case["rest"])
            row = {"kernel": name, "path": path}
            if a.check:
                if reference is None and dtype != torch.float32:  # the reference: the first path in float32
                    wide = tuple(x.detach().float().requires_grad_(x.requires_grad) for x in case["inputs"])
                    rest = tuple(r.float() if r.is_floating_point() else r for r in case["rest"])
                    reference = outputs(lambda fn=fn, wide=wide, rest=rest: fn(*wide, *rest), wide,
                                        None if case["grad"] is None else case["grad"].float())
                    label = f"{path} (float32)"
                got = outputs(forward, case["inputs"], case["grad"])
                if reference is None:
                    reference, label = got, path
                else:
                    diff, rows_off = difference(got, reference)
                    row.update(difference=diff, rows_differing=rows_off)
                    verdict = "ok" if diff <= TOLERANCE[dtype] and rows_off <= a.slot_rows else "OFF"
                    slots = f", {rows_off:.3g} of the slot rows differ" if not got[0].is_floating_point() else ""
                    print(f"  {name:20s} {path:14s} check: {verdict}, largest difference {diff:.3g} of the largest "
                          f"{label} value (tolerance {TOLERANCE[dtype]:g}){slots}")
                    if verdict == "OFF":
                        failed.append(f"{name} {path}")
                del got
            fwd = timer(forward)
            row.update(forward_s=fwd, forward_fraction=fwd_bytes / fwd / bw)
            if case["grad"] is not None:
                both = timer(lambda forward=forward, case=case: torch.autograd.grad(forward(), case["inputs"], case["grad"]))
                row["backward_s"] = bwd = max(both - fwd, 1e-12)
                row["backward_fraction"] = bwd_bytes / bwd / bw
            rows.append(row)
            back = (f"   backward {row['backward_s'] * 1e3:9.3f} ms ({row['backward_fraction']:6.1%})"
                    if "backward_s" in row else "")
            print(f"  {name:20s} {path:14s} forward {fwd * 1e3:9.3f} ms ({row['forward_fraction']:6.1%} of bandwidth){back}")
        base = rows[0]
        for row in rows[1:]:
            speed = f"forward {base['forward_s'] / row['forward_s']:.2f}x"
            if "backward_s" in row:
                speed += f", backward {base['backward_s'] / row['backward_s']:.2f}x"
            print(f"  {name:20s} {row['path']} vs {base['path']}: {speed}")
        results += rows
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"device": torch.cuda.get_device_name() if dev == "cuda" else dev,
                                                "args": vars(a), "rows": results}, indent=1) + "\n")
    if failed:
        raise SystemExit(f"bench/kernels.py --check: off the reference: {', '.join(failed)}")
    return results


if __name__ == "__main__":
    main()
