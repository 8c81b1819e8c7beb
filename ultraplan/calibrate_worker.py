"""The measuring half of ``ultraplan calibrate``: run under torchrun, as a compiled program's ranks run.

The rates (matmul, copy, op overhead, loop pass, AdamW) are one core's, timed by as many ranks at
once as the host has usable cores (``os.sched_getaffinity``; the others wait), so that they share
its memory bus as a program's ranks do but each has a core; the cost model shares the cores out by
``oversub`` (passes/host_cost.py). The collectives are timed on every rank at once: on a shared host
their cost is the wait for peers to be scheduled, which only the program's own rank count shows.

Each timed rank times, by medians of repeats after a warm-up:

- ``matmul``: square matrix products at each dtype (FLOPs ``2 n^3``, as ``FlopCounterMode`` counts);
- ``copy``: a large tensor copied (bytes read + written over seconds: the memory bandwidth);
- ``op_overhead``: a chain of tiny elementwise ops through autograd, forward and backward, per op
  (what the dispatcher, autograd and Python cost each op whatever its size);
- ``loop_pass``: the dropless mixture of experts' Python loop (the program's own ``ops.expert_ffn``),
  forward and backward, per expert it runs: a dozen torch ops per expert, which a plan counts as one
  pass of its op's loop (passes/host_cost.py);
- collectives on every process group a mesh axis of this world would use (the whole world, and
  for each divisor size the groups of consecutive ranks), at several sizes; rank 0 records them.
  Each after a barrier, for the link's latency and bandwidth, and once more *in place*: each kind,
  at 1 KiB and 64 KiB (the sizes of the tiny programs' per-layer collectives), between chains of
  tiny ops, no barrier, as a program calls it. The difference is what a collective of that kind
  costs a program beyond its link: the call, and, where more ranks than cores share the host, the
  wait for the peers to be scheduled (``collective_by_kind``).

Rank 0 writes one JSON file (``--out``) that ``ultraplan.calibrate`` fits. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
# the calls the emitted runtime makes (torch 2.13 renamed *_into_tensor / *_tensor to *_single)
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
# NCCL and each rank's GPU where there are GPUs (as the emitted runtime chooses), else gloo on the CPU
DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
IN_PLACE_NUMELS = (256, 16384)  # 1 KiB and 64 KiB of float32 per rank
# tiny ops before the drift rows' calls: calibrate's in-place length (about 0.05 ms here), then 1 to 10 ms
DRIFT_CHAINS = (8, 400, 1600)


def host_cores() -> int:
    """The cores this process could run on (its affinity mask: a container's or taskset's limit),
    before ``runtime.pin_to_cores`` kept it on its own."""
    from ultraplan.backends import runtime

    if runtime.HOST_CORES is not None:
        return len(runtime.HOST_CORES)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def timing_rank() -> bool:
    """Does this rank time the per-core rates? On a CPU host the first ``host_cores()`` ranks (a core
    each; the rest wait in the gather); on GPUs every rank (its own device)."""
    return DEVICE.type == "cuda" or dist.get_rank() < host_cores()


def sync() -> None:
    """Wait for the device's queued work: a GPU runs kernels asynchronously to the Python launching them."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def say(text: str) -> None:
    if dist.get_rank() == 0:
        print(f"calibrate: {text}", file=sys.stderr, flush=True)


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """The median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gathered(value: float | None) -> list[float]:
    """Every rank's ``value``, in rank order, leaving out the ranks that timed nothing (None)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return [v for v in out if v is not None]


def per_core(fn, *args) -> float | None:
    """``fn(*args)`` on a timing rank; None (nothing timed) on the others."""
    return fn(*args) if timing_rank() else None


def matmul_rates(sizes: list[int], dtypes: list[str], repeats: int) -> dict[str, dict]:
    out = {}
    for dtype in dtypes:
        for n in sizes:
            a = torch.randn(n, n, dtype=getattr(torch, dtype), device=DEVICE)
            b = torch.randn(n, n, dtype=getattr(torch, dtype), device=DEVICE)
            dist.barrier()
            seconds = per_core(timed, lambda a=a, b=b: torch.mm(a, b), repeats)
            rates = gathered(None if seconds is None else 2 * n**3 / seconds)
            out.setdefault(dtype, {})[n] = rates
            say(f"matmul {dtype} {n}x{n}: {statistics.median(rates) / 1e9:.2f} GFLOP/s per rank (median of ranks)")
    return out


def copy_rate(numel: int, repeats: int) -> list[float]:
    src = torch.randn(numel, device=DEVICE)
    dst = torch.empty_like(src)
    dist.barrier()
    seconds = per_core(timed, lambda: dst.copy_(src), repeats)
    rates = gathered(None if seconds is None else 2 * src.numel() * src.element_size() / seconds)
    say(f"memory copy {src.numel() * 4 / 2**20:.0f} MiB: {statistics.median(rates) / 1e9:.2f} GB/s per rank")
    return rates


def op_overhead(chain: int, repeats: int) -> list[float]:
    """Seconds per op of a forward and backward through ``chain`` tiny ops (8 elements: no real work)."""
    x = torch.randn(8, device=DEVICE, requires_grad=True)

    def step():
        y = x
        for _ in range(chain):
            y = y * 1.0001
        y.sum().backward()

    dist.barrier()
    seconds = per_core(timed, step, repeats)
    per_op = gathered(None if seconds is None else seconds / chain)
    say(f"per-op overhead (forward + backward through autograd): {statistics.median(per_op) * 1e6:.1f} us")
    return per_op


def optimizer_costs(numel: int, tensors: int, repeats: int) -> dict[str, list[float]]:
    """AdamW's seconds per parameter tensor (a step over ``tensors`` 8-element ones) and per element
    (a step over one ``numel``-element tensor, less one tensor's cost), constructed as the emitted
    program constructs it (torch's default implementation for the device)."""

    def step_seconds(params: list[torch.Tensor]) -> float:
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
        return timed(optimizer.step, repeats)

    small = [torch.randn(8, device=DEVICE, requires_grad=True) for _ in range(tensors)]
    dist.barrier()
    per_tensor = per_element = None
    if timing_rank():
        per_tensor = step_seconds(small) / tensors
        per_element = max(step_seconds([torch.randn(numel, device=DEVICE, requires_grad=True)]) - per_tensor,
                          0.0) / numel
    out = {"tensor": gathered(per_tensor), "element": gathered(per_element)}
    say(f"AdamW: {statistics.median(out['tensor']) * 1e6:.1f} us per parameter tensor, "
        f"{statistics.median(out['element']) * 1e9:.2f} ns per element")
    return out


def loop_pass(repeats: int, tokens: int = 64, width: int = 32, hidden: int = 24) -> list[float]:
    """Seconds per expert of ``ops.expert_ffn`` forward and backward, halved (a plan counts a loop
    op's passes forward and again backward): the step from 2 to 16 experts, every expert routed
    some of ``tokens`` tokens (2 per token), tiny widths so that the loop's overhead is all there is."""
    from ultraplan.compiler import ops

    def run(experts: int):
        x = torch.randn(1, tokens, width, device=DEVICE, requires_grad=True)
        indices = (torch.arange(tokens * 2, device=DEVICE) % experts).reshape(1, tokens, 2)
        gates = torch.rand(1, tokens, 2, device=DEVICE)
        w = [torch.randn(experts, *s, device=DEVICE, requires_grad=True)
             for s in ((hidden, width), (hidden, width), (width, hidden))]
        return lambda: ops.expert_ffn(x, indices, gates, *w, "swiglu").sum().backward()

    few, many = run(2), run(16)
    dist.barrier()
    seconds = None
    if timing_rank():
        seconds = max(timed(many, repeats) - timed(few, repeats), 0.0) / 14 / 2
    out = gathered(seconds)
    say(f"loop pass (one expert of the dropless MoE, forward or backward): {statistics.median(out) * 1e6:.1f} us")
    return out


def in_place_collective(kind: str, numel: int, n: int, group, calls: int, chain: int = 8) -> float:
    """Seconds one ``kind`` of ``numel`` floats adds to a program on a group of ``n``: ``calls`` rounds
    of ``chain`` tiny ops then the collective, no barrier in between, less the same rounds without it
    (medians of 3). Ranks drift apart between collectives as a program's do, so each call pays the
    wait for its slowest peer, which a barrier before each timed call hides."""
    return max(in_place_rounds(kind, numel, n, group, calls, chain)[0], 0.0)


def in_place_rounds(kind: str, numel: int, n: int, group, calls: int, chain: int,
                    blocked: list[float] | None = None) -> tuple[float, float]:
    """``in_place_collective``'s measure: (seconds each call adds, seconds of a round's ``chain`` tiny
    ops alone), each from medians of 3 windows; with ``blocked`` every call's own seconds are appended
    to it (bench/collective_stretch.py: the wait against the compute before the call)."""
    collective, y = run_collective(kind, numel, group, n), torch.randn(8, device=DEVICE)

    def call():
        began = time.perf_counter()
        collective()
        blocked.append(time.perf_counter() - began)

    def rounds(with_collective: bool):
        def fn():
            for _ in range(calls):
                z = y
                for _ in range(chain):
                    z = z * 1.0001
                if with_collective:
                    collective() if blocked is None else call()
            sync()
        return fn

    dist.barrier()
    with_calls = timed(rounds(True), 3, warmup=1)
    dist.barrier()
    without = timed(rounds(False), 3, warmup=1)
    return (with_calls - without) / calls, without / calls


def drift_rows(n: int, group, chains: tuple[int, ...], windows: int, calls: int = 20) -> list[dict]:
    """Rows {n, chain, added_s, busy_s}: what a 1 KiB all_reduce on groups of ``n`` adds to a round of
    ``chain`` tiny ops (calibrate's in-place measure, the slowest rank's; the median of ``windows``)
    and the chain's own seconds (the ranks' median), for each chain length: a call after a long
    stretch of compute waits longer (passes/sync_drift.py; calibrate fits ``collective_drift`` to them)."""
    rows = []
    for chain in chains:
        measured = [in_place_rounds("all_reduce", 256, n, group, calls, chain) for _ in range(windows)]
        rows.append({"n": n, "chain": chain, "added_s": statistics.median(max(gathered(a)) for a, _ in measured),
                     "busy_s": statistics.median(statistics.median(gathered(b)) for _, b in measured)})
    say(f"all_reduce of 1 KiB on groups of {n} after tiny ops: " + ", ".join(
        f"{r['added_s'] * 1e6:.0f} us after {r['busy_s'] * 1e3:.2f} ms" for r in rows))
    return rows


def groups_by_size(world: int) -> dict[int, list[list[int]]]:
    """For each group size n > 1 dividing the world: the groups of ``n`` ranks a mesh axis of that size
    forms, either as the last axis (consecutive ranks) or as the first (ranks ``world / n`` apart);
    the two differ only in which ranks pair up, and on one host they cross the same links."""
    out = {}
    for n in range(2, world + 1):
        if world % n == 0:
            out[n] = [list(range(start, start + n)) for start in range(0, world, n)]
    return out


def run_collective(kind: str, numel: int, group, n: int):
    """A closure running one ``kind`` whose payload (the local tensor handed over) has ``numel`` floats."""
    x = torch.randn(numel, device=DEVICE)
    if kind == "all_reduce":
        return lambda: dist.all_reduce(x, group=group)
    if kind == "all_gather":
        out = torch.empty(numel * n, device=DEVICE)
        return lambda: ALL_GATHER(out, x, group=group)
    if kind == "reduce_scatter":
        x = torch.randn(numel - numel % n or n, device=DEVICE)
        out = torch.empty(x.numel() // n, device=DEVICE)
        return lambda: REDUCE_SCATTER(out, x, group=group)
    x = torch.randn(numel - numel % n or n, device=DEVICE)
    out = torch.empty_like(x)
    return lambda: dist.all_to_all_single(out, x, group=group)


def collectives(sizes: list[int], repeats: int, drift: list[dict] | None = None) -> list[dict]:
    """Rows {kind, n, payload_bytes, seconds}: the median over repeats (each after a barrier) on rank 0's
    group of each size, while every other group of that size runs the same collective at once; with
    ``drift`` (a list) each size's ``drift_rows`` are appended to it."""
    from ultraplan.backends.runtime import on_host_cores

    rows = []
    rank = dist.get_rank()
    for n, members in groups_by_size(dist.get_world_size()).items():
        with on_host_cores():  # their gloo threads off this rank's core, as a program's mesh makes them
            groups = [dist.new_group(m) for m in members] if n < dist.get_world_size() else [None]
        mine = groups[rank // n] if n < dist.get_world_size() else None
        for kind in KINDS:
            for numel in sizes:
                fn = run_collective(kind, numel, mine, n)
                payload = (numel if kind in ("all_reduce", "all_gather") else numel - numel % n or n) * 4

                def barrier_then(fn=fn):
                    dist.barrier()
                    start = time.perf_counter()
                    fn()
                    sync()
                    return time.perf_counter() - start

                for _ in range(2):
                    barrier_then()
                seconds = statistics.median(barrier_then() for _ in range(repeats))
                seconds = max(gathered(seconds))  # the collective ends when its slowest member has it
                rows.append({"kind": kind, "n": n, "payload_bytes": payload, "seconds": seconds})
            for numel in IN_PLACE_NUMELS:
                seconds = max(gathered(in_place_collective(kind, numel, n, mine, 20 if repeats < 9 else 40)))
                payload = (numel if kind in ("all_reduce", "all_gather") else numel - numel % n or n) * 4
                rows.append({"kind": kind, "n": n, "payload_bytes": payload, "seconds": seconds, "in_place": True})
                say(f"{kind} of {payload / 1024:.0f} KiB in place (between tiny ops, no barrier) on groups of {n}: "
                    f"{seconds * 1e6:.0f} us")
            say(f"{kind} on groups of {n}: " + ", ".join(
                f"{r['payload_bytes'] / 1024:.0f} KiB {r['seconds'] * 1e6:.0f} us"
                for r in rows if r["kind"] == kind and r["n"] == n and not r.get("in_place")))
        if drift is not None:
            drift += drift_rows(n, mine, DRIFT_CHAINS, 1 if repeats < 9 else 3)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (seconds, for tests)")
    parser.add_argument("--only-matmul", action="store_true", help="the matmul rates alone (calibrate.refit's rates)")
    args = parser.parse_args(argv)
    global DEVICE
    if DEVICE.type == "cuda":
        DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(DEVICE)
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo")
    if DEVICE.type == "cpu":
        from ultraplan.backends.runtime import pin_to_cores

        pin_to_cores()  # on the cores a program's rank of this rank number runs on (its runtime.setup)
    torch.manual_seed(dist.get_rank())
    quick, gpu = args.quick, DEVICE.type == "cuda"
    # a GPU reaches its rates only on large operands
    matmul_sizes = ([1024, 2048] if quick else [4096, 8192]) if gpu else ([128, 256] if quick else [256, 512])
    result = {"world_size": dist.get_world_size(),
              "matmul": matmul_rates(matmul_sizes, ["float32", "bfloat16"], 3 if quick else 7)}
    if not args.only_matmul:
        result |= everything_else(quick, gpu)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    from ultraplan.backends.runtime import finish, teardown

    teardown(owned=True)
    finish()  # skips the interpreter's teardown, where gloo can abort a finished rank (runtime.finish)


def everything_else(quick: bool, gpu: bool) -> dict:
    """The measurements beside the matmul rates (``--only-matmul`` skips them: calibrate.refit's rates)."""
    drift: list[dict] = []
    return {
        "threads_per_rank": torch.get_num_threads(),
        "host_cores": host_cores() if DEVICE.type == "cpu" else 0,
        # a copy larger than a GPU's caches
        "copy": copy_rate((2**26 if quick else 2**28) if gpu else (2**21 if quick else 2**24), 3 if quick else 7),
        "op_overhead": op_overhead(50 if quick else 200, 5 if quick else 9),
        "loop_pass": loop_pass(5 if quick else 9),
        "optimizer": optimizer_costs(2**20 if quick else 2**22, 32 if quick else 128, 3 if quick else 7),
        # one rank (a one-GPU machine): no collective to time; calibrate keeps another spec's links
        "collectives": collectives([256, 16384, 262144] if quick else [256, 4096, 65536, 262144, 1048576],
                                   5 if quick else 9, drift) if dist.get_world_size() > 1 else [],
        "drift": drift,
    }


if __name__ == "__main__":
    main()
