"""Time the fused memory lookup (gather + weighted sum of value rows) three ways, forward and
backward: the unfused ops (ops.gather_rows + ops.weighted_sum), the torch fused op
(ops.gather_weighted_sum: embedding_bag) and the Triton kernels (backends/triton_gather.py), and
print the bytes each moves per second as a fraction of the memory bandwidth.

Paper sizes on a GPU (a table of 1M+ rows, value dims 256-1024, top-k 32-256, 4096-65536 tokens):

    python bench/kernels.py --rows 1048576 --dim 512 --topk 128 --tokens 16384

On the CPU the Triton path needs TRITON_INTERPRET=1 (slow: use tiny sizes). Bytes counted for the
forward: ids (8 B) and weights per selection, one row of D per selection read, one output row per
token written; the backward reads the output gradient, the ids, weights and rows again, and
scatter-adds one row per selection.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch
from ultraplan.compiler import ops

ROOT = Path(__file__).resolve().parents[1]


def _triton_module():
    spec = importlib.util.spec_from_file_location("triton_gather", ROOT / "backends" / "triton_gather.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _seconds(fn, repeat: int, device: str) -> float:
    """Median seconds of fn() after one warm-up call."""
    times = []
    for i in range(repeat + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=1 << 20)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--topk", type=int, default=128)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bandwidth", type=float, default=4.8e12, help="memory bytes/s (default: H200 HBM3e)")
    p.add_argument("--paths", default="unfused,embedding_bag,triton")
    args = p.parse_args(argv)
    dev, n, d, tokens = args.device, args.topk, args.dim, args.tokens
    gen = torch.Generator(device=dev).manual_seed(0)
    table = torch.randn(args.rows, d, device=dev, generator=gen, requires_grad=True)
    ids = torch.randint(0, args.rows, (tokens, 1, 1, n), device=dev, generator=gen)
    weights = torch.randn(tokens, 1, 1, n, device=dev, generator=gen, requires_grad=True)
    grad = torch.randn(tokens, 1, d, device=dev, generator=gen)
    fwd_bytes = tokens * n * (8 + 4 + 4 * d) + tokens * d * 4
    bwd_bytes = tokens * d * 4 + tokens * n * (8 + 4 + 4 * d) + tokens * n * 4 * d * 2 + tokens * n * 4
    paths = {"unfused": lambda t, i, w: ops.weighted_sum(ops.gather_rows(t, i), w),
             "embedding_bag": ops.gather_weighted_sum}
    if "triton" in args.paths:
        paths["triton"] = _triton_module().gather_weighted_sum
    print(f"gather + weighted sum: rows={args.rows} dim={d} topk={n} tokens={tokens} on {dev}; "
          f"bandwidth {args.bandwidth:.3g} B/s")
    results = []
    for name in args.paths.split(","):
        fn = paths[name]
        fwd = _seconds(lambda fn=fn: fn(table, ids, weights), args.repeat, dev)
        both = _seconds(lambda fn=fn: torch.autograd.grad(fn(table, ids, weights), (table, weights), grad),
                        args.repeat, dev)
        bwd = max(both - fwd, 1e-12)
        row = {"path": name, "forward_s": fwd, "backward_s": bwd,
               "forward_fraction": fwd_bytes / fwd / args.bandwidth, "backward_fraction": bwd_bytes / bwd / args.bandwidth}
        results.append(row)
        print(f"  {name:14s} forward {fwd * 1e3:9.3f} ms ({row['forward_fraction']:6.1%} of bandwidth)   "
              f"backward {bwd * 1e3:9.3f} ms ({row['backward_fraction']:6.1%})")
    base = results[0]
    for row in results[1:]:
        print(f"  {row['path']} vs {base['path']}: forward {base['forward_s'] / row['forward_s']:.2f}x, "
              f"backward {base['backward_s'] / row['backward_s']:.2f}x")
    return results


if __name__ == "__main__":
    main()
