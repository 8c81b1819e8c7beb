"""How fast ``--strategy auto`` plans at scale: seconds per plan (imports excluded), the search's own
seconds, peak memory, and the chosen strategy per block of identical layers.

    python bench/plan_scale.py                      # the cases below (a few minutes on 2 cores)
    python bench/plan_scale.py --cases dense-tiny:2:cpu     # one case: SPEC:MESH:HARDWARE[:BATCH[:SEQ]]
    python bench/plan_scale.py --cases '' --knapsack paper/ultramem-v2-2.5b-120b-top256:128x8:h200-128x8
                                                    # its integer program, memory-bound (below)

Cases: a Llama-3-8B-shaped spec on 8x8 (its batch 8 of 8192 tokens) and on 64 devices (batch 64 of 1024
tokens: on 64 devices the 8-sequence batch cannot split, and no layout of it fits), the constructed 120B UltraMemV2 spec on
128x8, and the UltraMemV2 paper's Table 10 models on 8, all on H200 nodes of 8 (h200-128x8.yaml).
CPU seconds (``time.process_time``) beside the wall seconds: on a shared machine they move less
with the load. Peak memory: the process's peak resident set (``resource.getrusage``; torch included) and the peak of
Python allocations while planning (``tracemalloc``, in a second plan so that it does not touch the
timing). ``--knapsack`` solves one case's integer program alone with the device memory set between
its leanest assignment's bytes and its fastest's (at each ``--shares`` of that range), where the
memory row binds and branch and cut runs: CPU seconds, the optimum, its memory and index sum.
Meta's FX+ILP autoparallel, for Llama-3-8B on this kind of 2-core machine, took 152-170 s
on an 8x8 mesh and 32-42 s on a 1-D mesh of 64 (the issue's measurements).
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plan_speed import machine

TABLE10 = ("olmoe-227m-1.2b", "ultramem-227m-1.2b", "memory-plus-227m-1.2b", "ultramem-v2-227m-1.2b", "olmoe-1b-7b",
           "ultramem-v2-1b-7b")
CASES = ("llama3-8b-shape:8x8:h200-128x8", "llama3-8b-shape:64:h200-128x8:64:1024",
         "paper/ultramem-v2-2.5b-120b-top256:128x8:h200-128x8", *(f"paper/{s}:8:h200-8" for s in TABLE10))


def plan_once(spec: str, mesh: str, hardware: str, batch: int | None, seq: int | None):
    from ultraplan.compiler.validate import load_model_spec
    from ultraplan.passes.context import Mesh
    from ultraplan.passes.pipeline import make_plan

    from ultraplan import api

    parsed = Mesh.parse(mesh)
    return make_plan(load_model_spec(api.resolve_spec_path(spec, "models")), api.load_hardware(hardware), parsed,
                     batch=batch, seq=seq, strategies=("auto",) * len(parsed.shape))


def bench(case: str) -> dict:
    spec, mesh, hardware, *rest = case.split(":")
    batch = int(rest[0]) if rest else None
    seq = int(rest[1]) if len(rest) > 1 else None
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    plan, gm, reports = plan_once(spec, mesh, hardware, batch, seq)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    found = gm.meta["ultraplan.search"]
    tracemalloc.start()
    plan_once(spec, mesh, hardware, batch, seq)
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    decisions = next(r for r in reports if r.name == "choose_sbp").decisions
    return {"case": case, "seconds": seconds, "cpu_seconds": cpu, "search_seconds": found.seconds,
            "groups": len(found.problem.groups),
            "nodes": len(found.group_of), "objective": found.objective, "step_time": plan.total("step_time").value,
            "memory_per_device": plan.total("memory_per_device").value, "fits": plan.fits, "traced_peak_bytes": traced,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "blocks": [d.removeprefix("auto block ") for d in decisions if d.startswith("auto block ")],
            "notes": [d for d in decisions if d.startswith("auto: parameters") or d.startswith("auto: no plan")]}


def knapsack(case: str, shares: list[float]) -> list[dict]:
    """The case's integer program (clustered, as auto builds it) solved at device memories between
    its leanest and its fastest assignment's: the memory-bound programs of docs/search.md."""
    import dataclasses
    import math

    from ultraplan.compiler.validate import load_model_spec
    from ultraplan.passes.context import Mesh
    from ultraplan.passes.pipeline import make_context, make_plan
    from ultraplan.passes.search import build_problem
    from ultraplan.passes.search_ilp import leanest, solve

    from ultraplan import api

    spec, mesh, hardware, *rest = case.split(":")
    batch = int(rest[0]) if rest else None
    loaded = load_model_spec(api.resolve_spec_path(spec, "models"))
    hw, parsed = api.load_hardware(hardware), Mesh.parse(mesh)
    auto = ("auto",) * len(parsed.shape)
    _, gm, _ = make_plan(loaded, hw, parsed, batch=batch, stop_after="fuse", strategies=auto)
    problem, _, _, _ = build_problem(gm, make_context(loaded, hw, parsed, batch=batch, strategies=auto), {}, {})
    fast, lean = solve(dataclasses.replace(problem, capacity=math.inf)).memory, leanest(problem).memory
    out = []
    for share in shares:
        capacity = lean + share * (fast - lean)
        cpu = time.process_time()
        found = solve(dataclasses.replace(problem, capacity=capacity))
        cpu = time.process_time() - cpu
        out.append({"share": share, "cpu_seconds": cpu, "time": found.time, "memory": found.memory,
                    "capacity": capacity, "index_sum": sum(found.choice)})
        print(f"{case} at {capacity / 2**30:.2f} GiB ({share:g} of {lean / 2**30:.2f}..{fast / 2**30:.2f}): "
              f"{cpu:.2f} CPU s, step {found.time:.6g} s, {found.memory / 2**30:.2f} GiB, index sum "
              f"{sum(found.choice)}", flush=True)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="SPEC:MESH:HARDWARE[:BATCH[:SEQ]], comma separated")
    parser.add_argument("--warmup", default="dense-tiny:2:cpu", help="a first plan that pays one-time warm-ups")
    parser.add_argument("--knapsack", default="", help="SPEC:MESH:HARDWARE[:BATCH]: its program, memory-bound")
    parser.add_argument("--shares", default="0.2,0.5,0.8", help="where in the leanest..fastest memory range")
    args = parser.parse_args(argv)
    import ultraplan.api  # noqa: F401  imports are not part of a plan's time

    print(f"machine: {machine()}")
    if args.warmup:
        bench(args.warmup)
    results = []
    if args.knapsack:
        results += knapsack(args.knapsack, [float(v) for v in args.shares.split(",")])
    for case in filter(None, args.cases.split(",")):
        r = bench(case)
        results.append(r)
        print(f"{case}: {r['seconds']:.2f} s per plan ({r['cpu_seconds']:.2f} s of CPU, {r['search_seconds']:.2f} s of "
              f"search: {r['groups']} groups for "
              f"{r['nodes']} nodes), step {r['step_time']:.4g} s (objective {r['objective']:.4g} s), "
              f"{r['memory_per_device'] / 2**30:.1f} GiB per device{'' if r['fits'] else ' (does not fit)'}, peak "
              f"{r['traced_peak_bytes'] / 1e6:.0f} MB traced while planning, {r['max_rss_bytes'] / 1e6:.0f} MB resident",
              flush=True)
        for line in r["blocks"] + r["notes"]:
            print(f"    {line}")
    return results


if __name__ == "__main__":
    main()
