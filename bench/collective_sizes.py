"""Collectives at a program's sizes against a hardware spec's formula: where the linear link model bends.

    python bench/collective_sizes.py --hardware /path/this-machine-4.yaml --nproc 4
    python bench/collective_sizes.py --hardware cpu --nproc 2 --sizes-mib 0.0625,0.25 --repeats 1   # seconds

``ultraplan calibrate`` fits each kind's link as ``messages * latency + factor * wire / bandwidth``
(plus the kind's calibrated wait per call) on payloads up to 4 MiB a rank; a compiled program's
collectives can be larger (dense-100m's fsdp gathers 6.75 MiB a rank per layer, and reduce-scatters
27 MiB). One torchrun of ``--nproc`` gloo ranks times each kind at each ``--sizes-mib`` (the payload a
rank hands over: an all_reduce's buffer, an all_gather's shard, a reduce_scatter's input), after a
barrier, the median of ``--repeats`` calls after one warm-up, the slowest rank's:

- ``reused``: into one output buffer allocated before (calibrate's way);
- ``fresh``: into a buffer allocated in each call, as a program's collectives allocate theirs (on a CPU
  a large buffer comes from the system anew and its first touch, inside the collective, faults its pages);

beside what the spec's formula gives that call (``passes/build_plan.collective_time``'s terms, from
``ultraplan.calibrate_fit.ring_terms``, plus ``host_cost.collective_figure``). The ratio measured / formula
shows where the model's one bandwidth per kind holds and where it does not. One thread per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from plan_speed import machine  # noqa: E402

KINDS = ("all_reduce", "all_gather", "reduce_scatter")


def worker(manifest: str) -> None:
    """One rank: time every (kind, size, buffer) case; rank 0 writes the rows next to the manifest."""
    import torch
    import torch.distributed as dist
    from ultraplan.backends.runtime import pin_to_cores

    from ultraplan.calibrate_worker import ALL_GATHER, REDUCE_SCATTER

    case = json.loads(Path(manifest).read_text())
    dist.init_process_group("gloo")
    pin_to_cores()  # as a program's rank of this number runs (runtime.setup)
    n, rank = dist.get_world_size(), dist.get_rank()

    def call(kind: str, x: torch.Tensor, out: torch.Tensor | None):
        if kind == "all_reduce":
            return lambda: dist.all_reduce(x)
        if kind == "all_gather":
            return lambda: ALL_GATHER(torch.empty(x.numel() * n) if out is None else out, x)
        return lambda: REDUCE_SCATTER(torch.empty(x.numel() // n) if out is None else out, x)

    rows = []
    for kind in KINDS:
        for mib in case["sizes_mib"]:
            numel = max(n, int(mib * 2**20 / 4) // n * n)
            x = torch.randn(numel)
            for buffer in ("reused", "fresh"):
                if kind == "all_reduce" and buffer == "fresh":
                    continue  # in place: a program reduces the buffer it filled
                out = None if buffer == "fresh" else torch.empty(numel * n if kind == "all_gather" else numel // n)
                fn, times = call(kind, x, out), []
                for _ in range(case["repeats"] + 1):
                    dist.barrier()
                    start = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - start)
                slowest = [None] * n
                dist.all_gather_object(slowest, statistics.median(times[1:]))
                rows.append({"kind": kind, "n": n, "payload_bytes": numel * 4, "buffer": buffer, "seconds": max(slowest)})
    if rank == 0:
        Path(manifest).with_suffix(".out.json").write_text(json.dumps(rows))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # without interpreter teardown, where gloo can abort a finished rank (runtime.finish)


def formula(hardware, row: dict) -> float:
    """Seconds the spec's cost model gives one call of ``row``'s kind, group and payload."""
    from ultraplan.passes.host_cost import calibrated, collective_figure

    from ultraplan.calibrate_fit import ring_terms

    messages, wire = ring_terms(row["kind"], row["n"], row["payload_bytes"])
    link = hardware.intra_node
    factor = hardware.collective_wire_factor.get(row["kind"], 1.0)
    wait = collective_figure(hardware, row["kind"], row["n"]) if calibrated(hardware) else 0.0
    return messages * link.latency + factor * wire / link.bandwidth + wait


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hardware", default=None, help="a hardware spec: a name (cpu) or a calibrated YAML's path")
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--sizes-mib", default="1,4,6.75,16,27,32", help="payloads a rank hands over, MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return []
    if args.hardware is None:
        parser.error("--hardware is required (a spec name, or the YAML `ultraplan calibrate` wrote)")
    from ultraplan import api

    hardware = api.load_hardware(args.hardware)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "case.json"
        manifest.write_text(json.dumps({"sizes_mib": [float(s) for s in args.sizes_mib.split(",")],
                                        "repeats": args.repeats}))
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               __file__, "--worker", str(manifest)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise SystemExit(f"the bench's ranks failed:\n{done.stderr[-4000:]}")
        rows = json.loads(manifest.with_suffix(".out.json").read_text())
    for row in rows:
        row["formula"] = formula(hardware, row)
    print(f"machine: {machine()}; {args.nproc} gloo ranks, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}; "
          f"formula: {hardware.name}")
    print(f"{'kind':>14} {'MiB/rank':>9} {'buffer':>7} {'measured ms':>12} {'formula ms':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['kind']:>14} {r['payload_bytes'] / 2**20:>9.3g} {r['buffer']:>7} {r['seconds'] * 1e3:>12.2f} "
              f"{r['formula'] * 1e3:>11.2f} {r['seconds'] / r['formula']:>6.2f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
