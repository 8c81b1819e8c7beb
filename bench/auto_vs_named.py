"""Is ``--strategy auto`` ever worse than a named strategy that fits? The cross product, by hand.

    nice python bench/auto_vs_named.py --order grid --jsonl bench/results/auto_vs_named.jsonl  # everything (a day here)
    python bench/auto_vs_named.py --specs dense-tiny --meshes 2x4 --batches 8 --modes infer
    python bench/auto_vs_named.py --summary bench/results/auto_vs_named.jsonl   # the table of a (partial) run

For every spec (default: every bundled one, specs/models/*.yaml and specs/models/paper/*.yaml,
smallest first), mesh, batch and mode: the auto plan's modelled step time against every named
combination (dp, fsdp, tp, sp, ep on each axis; on a 2-D mesh every ordered pair) that plans and
fits. Meshes of up to 8 devices are priced on ``h200-8`` (one node: a 2x4 mesh never leaves NVLink),
larger ones on ``h200-128x8`` (the same devices and links, 8 per node: an 8x8 mesh's axis 0 crosses
8 nodes over InfiniBand, its axis 1 stays inside each). Prints one line per case and the cases where
auto lost (there should be none): auto's ``step_time`` above a fitting named plan's by more than a
relative 1e-9, or auto's ``step_time`` differing from its ``search_objective`` (the search must
model the plan it makes) beyond the same tolerance. ``--jsonl`` appends each case as it finishes
and skips the cases already there, so a long run can be stopped and resumed.

Two things keep a case cheap without changing what is compared. The spec is read and lowered once
per spec and mode, and every plan runs the unchanged pipeline on a copy (bench/plan_cache.py; a
plan equal to ``api.plan``'s). And in training, where no layout can hold the parameters' state, the
named combinations are not planned: every plan keeps 16 B per stored parameter element (fp32
master, gradient and AdamW's two moments, passes/memory.py), and a device stores at least 1/n of
every parameter, so ``16 * parameters / devices`` above the device's memory means no named plan
fits (``skipped_by_bound``). The bound is checked against the auto plan's own memory in every case
(``bound_holds``). ``--order grid`` runs one (batch, mode) point of every spec and mesh before a
second of any (the points rotated per spec and mesh), so a stopped run covers the grid evenly.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

NAMED = ("dp", "fsdp", "tp", "sp", "ep")
MODELS = Path(__file__).resolve().parent.parent / "specs" / "models"
REL = 1e-9  # float tolerance on step times (relative)


def bundled_specs() -> list[str]:
    """Every bundled model spec by name (``paper/...`` for the paper's), smallest file first: a rough
    proxy for planning time, so that a stopped run has covered the cheap specs."""
    paths = sorted(MODELS.glob("*.yaml")) + sorted((MODELS / "paper").glob("*.yaml"))
    paths.sort(key=lambda p: (p.parent.name == "paper", "tiny" not in p.stem, p.stat().st_size))
    return [str(p.relative_to(MODELS).with_suffix("")) for p in paths]


def hardware_for(mesh: str) -> str:
    """h200-8 for one node's worth of devices, else h200-128x8 (the same figures over more nodes)."""
    size = 1
    for n in mesh.split("x"):
        size *= int(n)
    return "h200-8" if size <= 8 else "h200-128x8"


def named_combinations(mesh: str) -> list[str]:
    axes = len(mesh.split("x"))
    return [",".join(c) for c in itertools.product(NAMED, repeat=axes)]


def cached_planner():
    """bench/plan_cache.py's planner (imported by path: the bench also runs under runpy)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from plan_cache import CachedPlanner

    return CachedPlanner()


def parameter_state_bound(planner, spec: str, mesh: str) -> float:
    """Bytes per device every training plan keeps at least: 16 B per parameter element over the devices."""
    from ultraplan.compiler.node_info import info

    gm = planner.graph(spec, "train")
    elements = 0
    for node in gm.graph.nodes:
        param = info(node).param
        if param is not None:
            n = 1
            for d in param.shape:
                n *= int(d)
            elements += n
    devices = 1
    for n in mesh.split("x"):
        devices *= int(n)
    return 16.0 * elements / devices


def compare(spec: str, mesh: str, batch: int, mode: str, hardware: str | None = None, planner=None) -> dict:
    """The auto plan against every named plan that fits, at one point. ``planner``: a
    ``plan_cache.CachedPlanner`` (spec lowered once; enables the memory bound), else ``api.plan``."""
    from ultraplan.passes.context import PlanError

    from ultraplan import api

    plan = planner.plan if planner is not None else api.plan
    hardware = hardware or hardware_for(mesh)
    start = time.perf_counter()
    try:
        auto = plan(spec, mesh, hardware=hardware, batch=batch, mode=mode, strategy="auto")
    except (PlanError, ValueError) as exc:
        auto, reason = None, str(exc)
    auto_seconds = time.perf_counter() - start
    state = parameter_state_bound(planner, spec, mesh) if planner is not None and mode == "train" else 0.0
    capacity = api.load_hardware(hardware).memory_bytes
    named, refused, skipped = {}, 0, 0
    for strategy in named_combinations(mesh):
        if state > capacity:  # no layout holds the parameters' state (module docstring)
            skipped += 1
            continue
        try:
            candidate = plan(spec, mesh, hardware=hardware, batch=batch, mode=mode, strategy=strategy)
        except (PlanError, ValueError):
            refused += 1
            continue
        if candidate.fits:
            named[strategy] = candidate.total("step_time").value
    out = {"spec": spec, "mesh": mesh, "batch": batch, "mode": mode, "hardware": hardware, "named": named,
           "refused": refused, "skipped_by_bound": skipped, "state_bound": state,
           "plan_seconds": round(time.perf_counter() - start, 2), "auto_seconds": round(auto_seconds, 2)}
    if auto is None:  # auto plans whenever any named combination does
        out.update(auto=None, ok=not named and not skipped, why=reason, beaten_by={})
        return out
    step = auto.total("step_time").value
    objective = auto.total("search_objective").value
    memory = auto.total("memory_per_device").value if state else None  # the bound is checked where it was used
    beaten = {s: t for s, t in named.items() if step > t * (1 + REL)}
    modelled = abs(step - objective) <= REL * step
    bound_holds = memory is None or memory >= state * (1 - REL)
    try:  # how far from proven optimal the search left it (0: proven; plans before session 13 lack it)
        gap = auto.total("search_gap").value
    except KeyError:
        gap = 0.0
    out.update(auto=step, fits=auto.fits, objective=objective, gap=gap, beaten_by=beaten, modelled=modelled,
               auto_memory=memory, bound_holds=bound_holds,
               ok=(auto.fits or not named) and not beaten and modelled and bound_holds)
    return out


def describe(r: dict) -> str:
    best = min(r["named"].items(), key=lambda kv: kv[1]) if r["named"] else None
    best_text = f"{best[0]} {best[1]:.6g} s" if best else "none fits"
    auto = f"{r['auto']:.6g} s" + ("" if r.get("fits") else " (does not fit)") if r["auto"] is not None else "no plan"
    extra = "" if r.get("modelled", True) else f"; objective {r['objective']:.6g} s differs"
    if r.get("skipped_by_bound"):
        extra += f"; named not planned: parameter state {r['state_bound'] / 2**30:.3g} GiB/device"
    if not r.get("bound_holds", True):
        extra += f"; auto's memory {r['auto_memory']:.6g} B is below the bound {r['state_bound']:.6g} B"
    return (f"{'ok  ' if r['ok'] else 'LOST'} {r['spec']} --mesh {r['mesh']} --batch {r['batch']} {r['mode']}: "
            f"auto {auto}, best named {best_text} (of {len(r['named'])} that fit){extra} [{r['plan_seconds']:.0f} s]")


def primes(k: int) -> list[int]:
    return [p for p in range(2, k + 1) if k % p == 0 and all(p % q for q in range(2, p))]


def grid_order(specs: list[str], meshes: list[str], batches: list[int], modes: list[str]) -> list[tuple]:
    """Every (spec, mesh) pair's first (batch, mode) point before any pair's second. Pair (i, j) (spec
    i, mesh j) starts 3 i + 7 j points along the list of (batch, mode), so along a mesh the specs
    alternate modes and step through the batches, and along a spec the meshes do: the first round
    already holds every batch and mode, for every spec and for every mesh."""
    points = list(itertools.product(batches, modes))
    step = [next(k for k in (a, a + 2, a + 4, 1) if all(len(points) % p for p in primes(k))) for a in (3, 7)]
    return [(s, m, *points[(r + step[0] * i + step[1] * j) % len(points)])
            for r in range(len(points)) for i, s in enumerate(specs) for j, m in enumerate(meshes)]


def summary(results: list[dict]) -> dict:
    """Counts for the docs: cases, cases where a named plan fits, auto equal to or below the best of them."""
    fitting = [r for r in results if r["named"]]
    equal = [r for r in fitting if r["auto"] is not None
             and abs(r["auto"] - min(r["named"].values())) <= REL * min(r["named"].values())]
    below = [r for r in fitting if r["auto"] is not None and r["auto"] < min(r["named"].values()) * (1 - REL)]
    return {"cases": len(results), "named_fits": len(fitting), "auto_equal": len(equal),
            "auto_better": len(below), "no_named_fits": len(results) - len(fitting),
            "skipped_by_bound": sum(r.get("skipped_by_bound", 0) > 0 for r in results),
            "auto_fits": sum(bool(r.get("fits")) for r in results),
            "violations": [r for r in results if not r["ok"]]}


def markdown(results: list[dict], meshes: list[str]) -> str:
    """The docs' table: per mesh and in all, the cases, those where a named plan fits, auto equal to
    and below the best of those, the cases where none fits (auto fits / not), violations."""
    lines = ["| mesh | cases (train / infer) | specs | a named plan fits | auto = best named | auto < best named | "
             "no named fits: auto fits / not | named skipped by the bound | violations |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mesh in [*meshes, "all"]:
        rs = [r for r in results if mesh in ("all", r["mesh"])]
        c = summary(rs)
        none = [r for r in rs if not r["named"]]
        train = sum(r["mode"] == "train" for r in rs)
        lines.append(f"| {mesh} | {len(rs)} ({train} / {len(rs) - train}) | {len({r['spec'] for r in rs})} | "
                     f"{c['named_fits']} | {c['auto_equal']} | {c['auto_better']} | "
                     f"{sum(bool(r.get('fits')) for r in none)} / {sum(not r.get('fits') for r in none)} | "
                     f"{c['skipped_by_bound']} | {len(c['violations'])} |")
    return "\n".join(lines) + "\n"


def read_jsonl(path: str) -> dict[tuple, dict]:
    done: dict[tuple, dict] = {}
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["spec"], r["mesh"], r["batch"], r["mode"])] = r
    return done


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", default=None, help="comma-separated; default: every bundled spec")
    parser.add_argument("--meshes", default="2,4,8,2x4,8x8")
    parser.add_argument("--batches", default="1,8,64,512,4096")
    parser.add_argument("--modes", default="train,infer")
    parser.add_argument("--hardware", default=None, help="default: h200-8, or h200-128x8 beyond 8 devices")
    parser.add_argument("--jsonl", default=None, help="append each case here; cases already there are skipped")
    parser.add_argument("--order", choices=("spec", "spread", "grid"), default="spec",
                        help="spec: spec by spec; spread: each spec's first point before any spec's second; "
                             "grid: each (spec, mesh) pair's first point before any pair's second")
    parser.add_argument("--spread", action="store_true", help="the same as --order spread")
    parser.add_argument("--summary", metavar="JSONL", help="only summarise the cases in this file")
    args = parser.parse_args(argv)
    if args.summary:
        results = list(read_jsonl(args.summary).values())
        print(json.dumps({k: v for k, v in summary(results).items() if k != "violations"}))
        print(markdown(results, sorted({r["mesh"] for r in results}, key=lambda m: (len(m), m))), end="")
        for r in summary(results)["violations"]:
            print("  " + describe(r))
        return results
    specs = args.specs.split(",") if args.specs else bundled_specs()
    done = read_jsonl(args.jsonl) if args.jsonl else {}
    meshes, batches, modes = args.meshes.split(","), [int(b) for b in args.batches.split(",")], args.modes.split(",")
    points = list(itertools.product(meshes, batches, modes))
    order = "spread" if args.spread else args.order
    if order == "spread":  # points in a stride order (consecutive ones differ in mesh, batch and mode), specs round-robin
        stride = next(k for k in (7, 11, 13, 17, 1) if all(len(points) % p for p in primes(k)))
        points = [points[i * stride % len(points)] for i in range(len(points))]
        cases = [(spec, *point) for point in points for spec in specs]
    elif order == "grid":
        cases = grid_order(specs, meshes, batches, modes)
    else:
        cases = [(spec, *point) for spec in specs for point in points]
    planner = cached_planner()
    results, start = [], time.perf_counter()
    for spec, mesh, batch, mode in cases:
        r = done.get((spec, mesh, batch, mode))
        if r is None:
            r = compare(spec, mesh, batch, mode, args.hardware, planner)
            if args.jsonl:
                Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(r) + "\n")
        results.append(r)
        print(describe(r), flush=True)
    lost = [r for r in results if not r["ok"]]
    print(f"{len(results)} cases ({sum(bool(r['named']) for r in results)} where a named combination fits), "
          f"{len(lost)} where auto lost or mis-modelled, {time.perf_counter() - start:.0f} s")
    for r in lost:
        print("  " + describe(r) + ("; beaten by " + ", ".join(f"{s} {t:.6g} s" for s, t in r["beaten_by"].items())
                                    if r.get("beaten_by") else ""))
    return results


if __name__ == "__main__":
    main()
