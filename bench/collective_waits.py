"""What each collective of a compiled program takes in its run, beside what its plan prices it at.

    python bench/collective_waits.py out/moe-tiny-dp                 # the plan's mesh size, 100 steps
    python bench/collective_waits.py out/moe-tiny-dp --steps 200 --nproc 2

Runs the program under torchrun with every torch.distributed collective it calls timed on every rank
(the emitted modules call them through ``torch.distributed``; ``collectives.py`` binds
``all_gather_single`` and ``reduce_scatter_single`` at import, timed there), each step cut at the
program's ``runtime.synced_clock``. It prints, after ``--warmup`` steps, each call of a step in order
(kind, the median and mean seconds it took on each rank) and the distribution over all calls, how
often both ranks of a call waited long (the collective itself slow) or only one (the other came
late), and the step's blocking calls summed, beside the plan's ``comm_time`` (its collectives' link
formulas; the kinds' calibrated waits are ``overhead_time``'s ``coll_<kind>`` terms) and how many
collectives the plan lists. An asynchronous call (a gradient bucket's) is timed to its launch only.
The job runs through ``ultraplan.launch`` (as ``ultraplan run``'s): a failing rank ends it with one line.

A step's collectives on a shared CPU host have a long tail: a call whose median is the link's
latency takes several times it on average (docs/cost-model.md, session 18), and a step's median
sums those means, not the medians.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMED = ("all_reduce", "all_to_all_single", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather",
         "reduce_scatter", "broadcast", "all_to_all")
LONG = 3.0  # a call over this many times the median blocking call waited long (on 2 gloo ranks of this
# project's host the median is about the link's 0.45 ms; on 4 ranks two a core, about 8 ms)


def worker(program_dir: str, steps: int, out: str) -> None:
    """One rank: run the program with its collectives timed; write this rank's calls per step."""
    sys.path.insert(0, program_dir)
    import collectives  # the program's own modules, beside it
    import program
    import runtime
    import torch.distributed as dist

    steps_seen: list[list] = []
    current: dict = {"t0": 0.0, "calls": []}
    synced_clock = runtime.synced_clock

    def clock():  # called twice a step: as it begins (what ran since the last step is dropped), as it ends
        now = synced_clock()
        if current.get("in_step"):
            steps_seen.append(current["calls"])
        current.update(t0=now, calls=[], in_step=not current.get("in_step"))
        return now

    def timed(fn, name):
        def call(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            current["calls"].append((name, start - current["t0"], time.perf_counter() - start,
                                     bool(kwargs.get("async_op"))))
            return result
        return call

    runtime.synced_clock = clock
    for name in TIMED:
        if hasattr(dist, name):
            setattr(dist, name, timed(getattr(dist, name), name))
    for name in ("all_gather_single", "reduce_scatter_single"):
        if hasattr(collectives, name):
            setattr(collectives, name, timed(getattr(collectives, name), name))
    program.main(["--steps", str(steps), "--quiet"])
    Path(out, f"rank{os.environ['RANK']}.json").write_text(json.dumps(steps_seen))
    runtime.finish()  # without interpreter teardown, as the program's own __main__ ends


def quantile(values: list[float], q: float) -> float:
    """The value a fraction ``q`` of the way up the sorted ``values`` (nearest rank, no interpolation)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(program_dir: Path, out: Path, warmup: int) -> None:
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"), key=lambda p: int(p.stem[4:]))]
    ranks = [steps[warmup:] for steps in ranks]
    n_steps = min(len(steps) for steps in ranks)
    calls = min(len(step) for steps in ranks for step in steps[:n_steps])
    print(f"{program_dir}: {len(ranks)} ranks, {n_steps} steps after {warmup} of warm-up, {calls} collectives a step")
    print("call  kind                    at ms (rank 0)  "
          + "  ".join(f"rank {r} median / mean ms" for r in range(len(ranks))))
    for i in range(calls):
        kind, _, _, asynchronous = ranks[0][0][i]
        at = statistics.median(step[i][1] for step in ranks[0][:n_steps])
        cells = []
        for steps in ranks:
            took = [step[i][2] for step in steps[:n_steps]]
            cells.append(f"{1e3 * statistics.median(took):8.2f} / {1e3 * statistics.mean(took):6.2f}      ")
        print(f"{i:4d}  {kind + (' (async)' if asynchronous else ''):22s}  {at * 1e3:8.2f}      " + "  ".join(cells))
    blocking = [step[i][2] for steps in ranks for step in steps[:n_steps] for i in range(calls) if not step[i][3]]
    if blocking:
        print(f"blocking calls, every rank: p50 {1e3 * quantile(blocking, .5):.2f} ms, "
              f"p75 {1e3 * quantile(blocking, .75):.2f}, p90 {1e3 * quantile(blocking, .9):.2f}, "
              f"max {1e3 * max(blocking):.2f}, mean {1e3 * statistics.mean(blocking):.2f}")
        both = one = 0
        long_s = LONG * quantile(blocking, .5)
        for s in range(n_steps):
            for i in range(calls):
                if ranks[0][s][i][3]:
                    continue
                long = sum(steps[s][i][2] > long_s for steps in ranks)
                both += long == len(ranks)
                one += 0 < long < len(ranks)
        total = n_steps * sum(not c[3] for c in ranks[0][0][:calls])
        print(f"calls over {long_s * 1e3:.2f} ms ({LONG:g} x the median): on every rank {both} of {total} "
              f"(the collective slow), on some {one} (a rank came late)")
    for r, steps in enumerate(ranks):
        sums = [sum(c[2] for c in step[:calls] if not c[3]) for step in steps[:n_steps]]
        print(f"rank {r}: blocking collectives a step: median {1e3 * statistics.median(sums):.2f} ms, "
              f"mean {1e3 * statistics.mean(sums):.2f}")
    plan = json.loads((program_dir / "plan.json").read_text())
    totals = dict(plan["totals"])
    if "comm_time" in totals:
        print(f"the plan ({plan['hardware']}): comm_time {1e3 * totals['comm_time']['value']:.2f} ms a step "
              f"over {len(plan['collectives'])} collectives (the link's formula; each kind's calibrated wait "
              f"is in overhead_time)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="a compiled program's directory (ultraplan compile ... -o DIR)")
    parser.add_argument("--nproc", type=int, default=None, help="ranks (default: the plan's mesh size)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out at the start")
    parser.add_argument("--worker", nargs=2, metavar=("STEPS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(os.path.abspath(args.dir), int(args.worker[0]), args.worker[1])
        return
    program_dir = Path(args.dir)
    if not (program_dir / "plan.json").is_file() or not (program_dir / "program.py").is_file():
        raise SystemExit(f"{program_dir}: not a compiled program (no plan.json and program.py there); "
                         f"make one with: ultraplan compile SPEC --mesh N -o {program_dir}")
    plan = json.loads((program_dir / "plan.json").read_text())
    nproc = args.nproc or math.prod(plan["mesh"])
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-m", "ultraplan.launch", "--standalone", "--nproc_per_node", str(nproc),
                               os.path.abspath(__file__), str(program_dir), "--worker", str(args.steps), out],
                              env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
        if done.returncode:
            raise SystemExit(f"collective_waits: the job ended with exit code {done.returncode} (its lines above say why)")
        report(program_dir, Path(out), args.warmup)


if __name__ == "__main__":
    main()
