"""Forward + backward time of the fused attention (ops.sdpa_attention, what passes/fuse.py emits)
against the masked softmax it replaces (ops.causal_attention), and the bytes autograd saves for
each. Runs on the CPU (default) or CUDA, e.g.

    .venv/bin/python bench/attention.py --batch 4 --seq 512 --heads 4 --kv-heads 4 --head-dim 64 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from ultraplan.compiler import ops


def _saved_bytes(fn, *args) -> int:
    """Bytes of distinct storages autograd keeps for fn's backward (as runtime.count_saved measures)."""
    storages: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn(*args)
    return sum(storages.values())


def _time(fn, args: tuple, attrs: tuple, repeat: int, device: str) -> float:
    """Median seconds of one forward + backward."""
    grad = torch.ones_like(fn(*args, *attrs))
    times = []
    for i in range(repeat + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args, *attrs).backward(grad)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    b, t, e = args.batch, args.seq, args.head_dim
    qkv = tuple(torch.randn(b, t, n * e, generator=gen).to(args.device).requires_grad_()
                for n in (args.heads, args.kv_heads, args.kv_heads))
    attrs = (args.heads, args.kv_heads, e)
    print(f"machine: {platform.processor() or platform.machine()}, device {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"B={b} T={t} heads={args.heads} kv_heads={args.kv_heads} head_dim={e}, forward + backward, "
          f"median of {args.repeat}")
    out: dict[str, float] = {}
    for name, fn in (("masked softmax (causal_attention)", ops.causal_attention),
                     ("sdpa (sdpa_attention)", ops.sdpa_attention)):
        seconds = _time(fn, qkv, attrs, args.repeat, args.device)
        saved = _saved_bytes(fn, *qkv, *attrs)
        out[fn.__name__] = seconds
        out[f"{fn.__name__}_saved"] = saved
        print(f"  {name:36s} {seconds * 1e3:9.2f} ms   saves {saved / 2**20:8.2f} MiB")
    out["speedup"] = out["causal_attention"] / out["sdpa_attention"]
    print(f"  speedup {out['speedup']:.2f}x")
    return out


if __name__ == "__main__":
    main()
