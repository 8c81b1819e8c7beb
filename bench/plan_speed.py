"""How fast ultraplan plans a realistic model: seconds per plan (imports excluded) and peak memory.

    python bench/plan_speed.py                        # llama3-8b-shape, --mesh 8 on h200-8, dp and fsdp
    python bench/plan_speed.py --spec dense-tiny --mesh 2 --hardware cpu   # seconds (what the test runs)
    python bench/plan_speed.py --profile              # also the top of a cProfile of each plan

Peak memory is measured twice: the process's peak resident set (``resource.getrusage``, which
includes torch itself) and the peak of Python allocations while planning (``tracemalloc``, in a
second plan so that its overhead does not touch the timing).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import platform
import pstats
import resource
import time
import tracemalloc


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.system()}"


def bench(spec: str, mesh: str, hardware: str, strategy: str, profile: bool = False, repeat: int = 3) -> dict:
    """Plan once cold, ``repeat`` times timed (the median is reported), once under tracemalloc (and
    once under cProfile when asked)."""
    from ultraplan.compiler.validate import load_model_spec
    from ultraplan.passes.context import Mesh
    from ultraplan.passes.pipeline import make_plan

    from ultraplan import api

    def once():
        gc.collect()  # a collection of the previous plan's garbage is not this plan's time
        start = time.perf_counter()
        parsed = Mesh.parse(mesh)
        plan, _, reports = make_plan(load_model_spec(api.resolve_spec_path(spec, "models")),
                                     api.load_hardware(hardware), parsed, strategies=api.parse_strategy(strategy, parsed))
        return time.perf_counter() - start, plan, reports

    first, plan, _ = once()  # pays one-time warm-ups too (torch's meta kernels, sympy's caches)
    runs = sorted((once() for _ in range(repeat)), key=lambda r: r[0])
    seconds, plan, reports = runs[len(runs) // 2]  # the median of the repeats
    tracemalloc.start()
    api.plan(spec, mesh, hardware=hardware, strategy=strategy)
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    out = {"spec": spec, "mesh": mesh, "hardware": hardware, "strategy": strategy,
           "seconds": seconds, "first_seconds": first,
           "traced_peak_bytes": traced_peak, "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "nodes": len(plan.nodes), "fits": plan.fits, "passes": {r.name: r.seconds for r in reports}}
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        api.plan(spec, mesh, hardware=hardware, strategy=strategy)
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(25)
        out["profile"] = text.getvalue()
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="llama3-8b-shape")
    parser.add_argument("--mesh", default="8")
    parser.add_argument("--hardware", default="h200-8")
    parser.add_argument("--strategies", default="dp,fsdp", help="comma separated; each planned on its own")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="timed plans after the first (median reported)")
    args = parser.parse_args(argv)
    import ultraplan.api  # noqa: F401  imports are not part of a plan's time

    print(f"machine: {machine()}")
    results = []
    for strategy in args.strategies.split(","):
        r = bench(args.spec, args.mesh, args.hardware, strategy, args.profile, args.repeat)
        results.append(r)
        print(f"{r['spec']} --mesh {r['mesh']} --hardware {r['hardware']} --strategy {strategy}: "
              f"{r['seconds']:.3f} s per plan (median; {r['first_seconds']:.3f} s the first in the process), "
              f"{r['nodes']} nodes, peak {r['traced_peak_bytes'] / 1e6:.1f} MB "
              f"traced while planning, {r['max_rss_bytes'] / 1e6:.0f} MB resident (process); passes: "
              + ", ".join(f"{k} {v:.3f} s" for k, v in r["passes"].items()), flush=True)
        if args.profile:
            print(r["profile"])
    return results


if __name__ == "__main__":
    main()
