"""What a blocking collective costs a step, against how long the ranks computed before it.

    python bench/collective_stretch.py --nproc 4                         # chains of 8 to 1600 tiny ops
    python bench/collective_stretch.py --nproc 2 --chains 8 400 --windows 3 --json-out stretch.json

``ultraplan calibrate`` times a collective in place after 8 tiny ops (``calibrate_worker.in_place_collective``);
a program calls its blocking collectives after milliseconds of its ops, and on a shared CPU host the
call then waits longer (docs/cost-model.md, session 19: moe-tiny's all_reduces on 4 ranks). For each
chain length, ``--windows`` windows of calibrate's own in-place measure with that chain
(``calibrate_worker.in_place_rounds``: rounds of the chain, then a 1 KiB all_reduce on the default
group, no barrier, against the same rounds without the call, medians of 3): what the call adds per
round (the windows' median; a window's figure is its slowest rank's), beside the seconds each call
blocked (p50, p90 over every call of every rank) and the chain's own seconds. Ranks are pinned as a
program's are (``runtime.pin_to_cores``); the job runs through ``ultraplan.launch``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROUND_OPS = 3000  # tiny ops a window runs at least (rounds = this over the chain length, at least 10)


def worker(chains: list[int], windows: int, out: str) -> None:
    """One rank: for each chain length, ``windows`` windows of calibrate's in-place measure
    (``calibrate_worker.in_place_rounds``: a 1 KiB all_reduce on the world); rank 0 writes them."""
    import torch.distributed as dist
    from ultraplan.backends.runtime import pin_to_cores

    from ultraplan import calibrate_worker

    dist.init_process_group("gloo")
    pin_to_cores()  # as a program's rank (and calibrate's) runs
    world = dist.get_world_size()
    rows = []
    for chain in chains:
        calls, blocked = max(10, ROUND_OPS // chain), []
        windows_measured = [calibrate_worker.in_place_rounds("all_reduce", 256, world, None, calls, chain, blocked)
                            for _ in range(windows)]
        mine = {"added": [added for added, _ in windows_measured], "blocked": blocked,
                "chain_s": statistics.median(alone for _, alone in windows_measured)}
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        added = [max(window) for window in zip(*(r["added"] for r in everyone))]  # a window's slowest rank
        calls_blocked = sorted(b for r in everyone for b in r["blocked"])
        rows.append({"chain": chain, "chain_s": statistics.median(r["chain_s"] for r in everyone),
                     "added_s": statistics.median(added), "added_windows_s": added,
                     "blocked_p50_s": calls_blocked[len(calls_blocked) // 2],
                     "blocked_p90_s": calls_blocked[9 * len(calls_blocked) // 10]})
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--chains", type=int, nargs="+", default=[8, 100, 400, 1600], help="tiny ops before each call")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.chains, args.windows, args.worker)
        return []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "ultraplan.launch", "--standalone", "--nproc_per_node", str(args.nproc),
               os.path.abspath(__file__), "--chains", *map(str, args.chains), "--windows", str(args.windows),
               "--worker", str(out)]
        done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
        if done.returncode or not out.is_file():
            raise SystemExit(f"collective_stretch: the job ended with exit code {done.returncode} (its lines above say why)")
        rows = json.loads(out.read_text())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"1 KiB all_reduce on {args.nproc} gloo ranks after chains of tiny ops ({args.windows} windows each; "
          f"load average {load:.2f})")
    print("| compute before each call ms | added per call ms (median of windows) | windows ms | blocked p50 / p90 ms |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['chain_s'] * 1e3:.2f} | {r['added_s'] * 1e3:.2f} | "
              f"{' '.join(f'{w * 1e3:.1f}' for w in r['added_windows_s'])} | "
              f"{r['blocked_p50_s'] * 1e3:.2f} / {r['blocked_p90_s'] * 1e3:.2f} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"nproc": args.nproc, "load": load, "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
