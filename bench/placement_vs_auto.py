"""Is ``--strategy auto`` ever slower (modelled) than the same search with a value table forced one way?

    python bench/placement_vs_auto.py                     # the paper configurations, meshes 2 to 128x8, batch 1 to 4096
    python bench/placement_vs_auto.py --tiny              # pkm-tiny on 2x2 at batch 4 and 512 (CI's subset)
    python bench/placement_vs_auto.py --spec specs/models/paper/ultramem-227m-1.2b.yaml --mesh 8 --hardware h200-8
    nice python bench/placement_vs_auto.py --jsonl bench/results/placement_vs_auto.jsonl   # resumable, grid order
    python bench/placement_vs_auto.py --summary bench/results/placement_vs_auto.jsonl

The search sees every placement of every table as signatures of its lookups (passes/search*.py), so
free it can only do as well or better than with a table pinned (``--place GLOB=WORDS``, which the
search plans around). Per spec, mesh and batch the free search is planned once, then once per table
group (the module owning the table, every layer's at once: ``memory_tables.ring.*``,
``layers.*.ultramem.*``, ``memory_tables.layer*_ultramem_v2.*``, expert weights ``layers.*.moe.w_*``)
and placement (the same word on every axis, and ``number,dim`` on a 2-D mesh).
A violation is a forced plan that fits the device and whose modelled step time is below the free
one's by more than 1e-9 relatively (or that fits where the free plan does not). Placements the sizes
do not allow are skipped (counted). Inference is one new token per sequence (``--mode infer --seq 1``,
the decode step); ``--mode train`` plans the spec's sequence length. Prints one line per violation
and a summary; ``--json`` writes every comparison, ``--jsonl`` appends each point as it finishes and
skips the points already there (a stopped run resumes). Points run in grid order: one batch of every
spec and mesh before a second batch of any (the batches rotated per pair), so a stopped run covers
every configuration and mesh. The spec is read and lowered once per spec and mode
(bench/plan_cache.py: the unchanged pipeline on a copy of the graph, the plan ``api.plan`` makes).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "specs" / "models" / "paper").glob("*.yaml"))
FULL_MESHES = [("2", "h200-8"), ("8", "h200-8"), ("8x8", "h200-128x8"), ("128x8", "h200-128x8")]
FULL_BATCHES = tuple(4**i for i in range(7))  # 1, 4, ..., 4096
TINY = {"specs": ["pkm-tiny"], "meshes": [("2x2", "h200-2x8")], "batches": (4, 512)}
RELATIVE = 1e-9


def placements(mesh: str) -> list[str]:
    """The placements compared: each word on every axis, and number across nodes with dim inside on 2-D."""
    axes = len(mesh.split("x"))
    return [",".join([w] * axes) for w in ("number", "dim", "replicate")] + (["number,dim"] if axes == 2 else [])


def group_globs(groups) -> list[str]:
    """One glob per table group, every layer's tables at once: ``layers.3.ultramem.*`` and
    ``memory_tables.layer3_ultramem_v2.*`` (a spec's own module names) become ``layers.*.ultramem.*`` and
    ``memory_tables.layer*_ultramem_v2.*``; a spec whose tables share a module keeps that one name."""
    return sorted({re.sub(r"(^|\.)layer(s\.|_?)\d+(?=[._])", r"\1layer\2*", g) for g in groups})


def compare(spec: str, mesh: str, hardware: str, batch: int, mode: str = "infer", planner=None) -> dict:
    """The free search against every forced placement of every table group, at one point."""
    from ultraplan.passes.context import PlanError
    from ultraplan.passes.placement_report import table_groups

    from ultraplan import api

    plan = planner.plan if planner is not None else api.plan
    point = dict(hardware=hardware, batch=batch, mode=mode, seq=1 if mode == "infer" else None, strategy="auto")
    start = time.perf_counter()
    free = plan(spec, mesh, **point)
    base = {"spec": spec, "mesh": mesh, "batch": batch, "mode": mode, "auto_step_time": free.total("step_time").value,
            "auto_fits": free.fits}
    out = {**base, "hardware": hardware, "forced": [], "violations": [], "skipped": 0}
    for glob in group_globs(table_groups(free)):
        for words in placements(mesh):
            try:
                forced = plan(spec, mesh, force=[f"{glob}={words}"], **point)
            except PlanError as exc:
                out["skipped"] += 1
                out.setdefault("not_possible", []).append({"table": glob, "placement": words, "why": str(exc)[:300]})
                continue
            row = {"table": glob, "placement": words, "step_time": forced.total("step_time").value, "fits": forced.fits}
            out["forced"].append(row)
            faster = row["step_time"] < base["auto_step_time"] * (1 - RELATIVE)
            if forced.fits and (faster or not free.fits):
                out["violations"].append(row)
    out["seconds"] = time.perf_counter() - start
    return out


def grid_order(specs: list[str], meshes: list[tuple[str, str]], batches: tuple[int, ...]) -> list[tuple]:
    """(spec, mesh, hardware, batch): every (spec, mesh) pair at one batch before any at a second; pair k
    starts k * 2 batches along (batches stepped by 3, prime to 7), so the first round spans the batches."""
    stride = 3 if len(batches) % 3 else 1
    order = [batches[i * stride % len(batches)] for i in range(len(batches))]
    pairs = [(s, m, h) for s in specs for m, h in meshes]
    return [(s, m, h, order[(r + 2 * k) % len(order)]) for r in range(len(order)) for k, (s, m, h) in enumerate(pairs)]


def read_jsonl(path: str | None) -> dict[tuple, dict]:
    done: dict[tuple, dict] = {}
    if path and Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["spec"], r["mesh"], r["batch"], r["mode"])] = r
    return done


def summary(results: list[dict]) -> dict:
    """Counts for the docs: points, forced plans, those that fit, auto equal to or below the best of them."""
    fitting = [r for r in results if any(f["fits"] for f in r["forced"])]
    best = {id(r): min(f["step_time"] for f in r["forced"] if f["fits"]) for r in fitting}
    equal = [r for r in fitting if abs(r["auto_step_time"] - best[id(r)]) <= RELATIVE * best[id(r)]]
    worse = [r for r in fitting if r["auto_step_time"] > best[id(r)] * (1 + RELATIVE)]
    return {"points": len(results), "forced": sum(len(r["forced"]) for r in results),
            "forced_fit": sum(f["fits"] for r in results for f in r["forced"]),
            "not_possible": sum(r["skipped"] for r in results), "points_where_forced_fits": len(fitting),
            "auto_equal": len(equal), "auto_better": len(fitting) - len(equal) - len(worse), "auto_worse": len(worse),
            "auto_fits": sum(r["auto_fits"] for r in results),
            "violations": sum(len(r["violations"]) for r in results)}


def markdown(results: list[dict]) -> str:
    """The docs' table: per mesh and in all, the points, forced plans, those that fit, and auto's standing."""
    lines = ["| mesh | points (specs) | batches | forced plans (not possible) | forced plans that fit | "
             "points where one fits | auto = best forced | auto < best forced | auto > best forced | auto fits | "
             "violations (forced plans) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    meshes = sorted({r["mesh"] for r in results}, key=lambda m: (len(m.split("x")), int(m.split("x")[0])))
    for mesh in [*meshes, "all"]:
        rs = [r for r in results if mesh in ("all", r["mesh"])]
        c = summary(rs)
        lines.append(f"| {mesh} | {c['points']} ({len({r['spec'] for r in rs})}) | "
                     f"{','.join(str(b) for b in sorted({r['batch'] for r in rs}))} | {c['forced']} ({c['not_possible']}) | "
                     f"{c['forced_fit']} | {c['points_where_forced_fits']} | {c['auto_equal']} | {c['auto_better']} | "
                     f"{c['auto_worse']} | {c['auto_fits']} | {c['violations']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CI's subset: tiny specs on 2 and 2x2, two batches")
    parser.add_argument("--spec", action="append", help="a spec (repeatable; default: specs/models/paper/*)")
    parser.add_argument("--mesh", help="one mesh (with --hardware) instead of 2, 8, 8x8 and 128x8")
    parser.add_argument("--hardware", default="h200-128x8")
    parser.add_argument("--batch", type=int, action="append", help="a batch (repeatable; default 1, 4, ..., 4096)")
    parser.add_argument("--mode", choices=("infer", "train"), default="infer")
    parser.add_argument("--json", help="write every comparison here")
    parser.add_argument("--jsonl", help="append each point here; points already there are skipped")
    parser.add_argument("--summary", metavar="JSONL", help="only summarise the points in this file")
    args = parser.parse_args(argv)
    if args.summary:
        results = list(read_jsonl(args.summary).values())
        print(json.dumps(summary(results)))
        print(markdown(results), end="")
        for r in results:
            for v in r["violations"]:
                print(f"VIOLATION {r['spec']} {r['mesh']} batch {r['batch']}: {v['table']}={v['placement']} "
                      f"{v['step_time']:.9g} s < auto {r['auto_step_time']:.9g} s")
        return results
    specs = args.spec or (TINY["specs"] if args.tiny else PAPER)
    meshes = [(args.mesh, args.hardware)] if args.mesh else TINY["meshes"] if args.tiny else FULL_MESHES
    batches = tuple(args.batch or (TINY["batches"] if args.tiny else FULL_BATCHES))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from plan_cache import CachedPlanner

    planner, done, results = CachedPlanner(), read_jsonl(args.jsonl), []
    for spec, mesh, hardware, batch in grid_order(specs, meshes, batches):
        r = done.get((spec, mesh, batch, args.mode))
        if r is None:
            r = compare(spec, mesh, hardware, batch, args.mode, planner)
            if args.jsonl:
                Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(r) + "\n")
        results.append(r)
        print(f"{spec} on {mesh} ({hardware}), {args.mode} batch {batch}: auto {r['auto_step_time']:.6g} s"
              f"{'' if r['auto_fits'] else ' (does not fit)'}, {len(r['forced'])} forced, {r['skipped']} "
              f"not possible, {len(r['violations'])} violation(s) [{r['seconds']:.1f} s]", file=sys.stderr,
              flush=True)
        for v in r["violations"]:
            print(f"VIOLATION {spec} {mesh} batch {batch}: {v['table']}={v['placement']} "
                  f"{v['step_time']:.9g} s < auto {r['auto_step_time']:.9g} s", flush=True)
    total = sum(len(r["violations"]) for r in results)
    print(f"{len(results)} points, {sum(len(r['forced']) for r in results)} forced plans, {total} violation(s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
