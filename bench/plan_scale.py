"""How fast ``--strategy auto`` plans at scale: seconds per plan (imports excluded), the search's own
seconds, peak memory, and the chosen strategy per block of identical layers.

    python bench/plan_scale.py                      # the cases below (a few minutes on 2 cores)
    python bench/plan_scale.py --cases dense-tiny:2:cpu     # one case: SPEC:MESH:HARDWARE[:BATCH[:SEQ]]

Cases: a Llama-3-8B-shaped spec on 8x8 (its batch 8 of 8192 tokens) and on 64 devices (batch 64 of 1024
tokens: on 64 devices the 8-sequence batch cannot split, and no layout of it fits), the constructed 120B UltraMemV2 spec on
128x8, and the UltraMemV2 paper's Table 10 models on 8, all on H200 nodes of 8 (h200-128x8.yaml).
CPU seconds (``time.process_time``) beside the wall seconds: on a shared machine they move less
with the load. Peak memory: the process's peak resident set (``resource.getrusage``; torch included) and the peak of
Python allocations while planning (``tracemalloc``, in a second plan so that it does not touch the
timing). Meta's FX+ILP autoparallel, for Llama-3-8B on this kind of 2-core machine, took 152-170 s
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
            "bucket_bound": plan.total("search_bucket_bound").value,
            "memory_per_device": plan.total("memory_per_device").value, "fits": plan.fits, "traced_peak_bytes": traced,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "blocks": [d.removeprefix("auto block ") for d in decisions if d.startswith("auto block ")],
            "notes": [d for d in decisions if d.startswith("auto: parameters") or d.startswith("auto: no plan")]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="SPEC:MESH:HARDWARE[:BATCH[:SEQ]], comma separated")
    parser.add_argument("--warmup", default="dense-tiny:2:cpu", help="a first plan that pays one-time warm-ups")
    args = parser.parse_args(argv)
    import ultraplan.api  # noqa: F401  imports are not part of a plan's time

    print(f"machine: {machine()}")
    if args.warmup:
        bench(args.warmup)
    results = []
    for case in args.cases.split(","):
        r = bench(case)
        results.append(r)
        print(f"{case}: {r['seconds']:.2f} s per plan ({r['cpu_seconds']:.2f} s of CPU, {r['search_seconds']:.2f} s of "
              f"search: {r['groups']} groups for "
              f"{r['nodes']} nodes), step {r['step_time']:.4g} s (objective {r['objective']:.4g} s, within "
              f"{r['bucket_bound']:.3g} s), "
              f"{r['memory_per_device'] / 2**30:.1f} GiB per device{'' if r['fits'] else ' (does not fit)'}, peak "
              f"{r['traced_peak_bytes'] / 1e6:.0f} MB traced while planning, {r['max_rss_bytes'] / 1e6:.0f} MB resident",
              flush=True)
        for line in r["blocks"] + r["notes"]:
            print(f"    {line}")
    return results


if __name__ == "__main__":
    main()
