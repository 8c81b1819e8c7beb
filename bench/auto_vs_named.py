"""Is ``--strategy auto`` ever worse than a named strategy that fits? The cross product, by hand.

    nice python bench/auto_vs_named.py --jsonl out/auto_vs_named.jsonl     # everything (hours here)
    python bench/auto_vs_named.py --specs dense-tiny --meshes 2x4 --batches 8 --modes infer

For every spec (default: every bundled one, specs/models/*.yaml and specs/models/paper/*.yaml,
smallest first), mesh, batch and mode: the auto plan's modelled step time against every named
combination (dp, fsdp, tp, sp, ep on each axis; on a 2-D mesh every ordered pair) that plans and
fits. Meshes of up to 8 devices are priced on ``h200-8`` (one node: a 2x4 mesh never leaves NVLink),
larger ones on ``h200-128x8`` (the same devices and links, 8 per node: an 8x8 mesh's axis 0 crosses
8 nodes over InfiniBand, its axis 1 stays inside each). Prints one line per case and the cases where
auto lost (there should be none): auto's ``step_time`` above a fitting named plan's by more than a
relative 1e-9 plus ``search_bucket_bound`` (gradient buckets the search counts by bytes:
docs/search.md), or auto's ``step_time`` differing from its ``search_objective`` (the search must
model the plan it makes) beyond the same tolerance. ``--jsonl`` appends each case as it finishes
and skips the cases already there, so a long run can be stopped and resumed.
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


def compare(spec: str, mesh: str, batch: int, mode: str, hardware: str | None = None) -> dict:
    """The auto plan against every named plan that fits, at one point."""
    from ultraplan.passes.context import PlanError

    from ultraplan import api

    hardware = hardware or hardware_for(mesh)
    start = time.perf_counter()
    try:
        auto = api.plan(spec, mesh, hardware=hardware, batch=batch, mode=mode, strategy="auto")
    except (PlanError, ValueError) as exc:
        auto, reason = None, str(exc)
    auto_seconds = time.perf_counter() - start
    named, refused = {}, 0
    for strategy in named_combinations(mesh):
        try:
            plan = api.plan(spec, mesh, hardware=hardware, batch=batch, mode=mode, strategy=strategy)
        except (PlanError, ValueError):
            refused += 1
            continue
        if plan.fits:
            named[strategy] = plan.total("step_time").value
    out = {"spec": spec, "mesh": mesh, "batch": batch, "mode": mode, "hardware": hardware, "named": named,
           "refused": refused, "plan_seconds": round(time.perf_counter() - start, 2),
           "auto_seconds": round(auto_seconds, 2)}
    if auto is None:  # auto plans whenever any named combination does
        out.update(auto=None, ok=not named, why=reason, beaten_by={})
        return out
    step = auto.total("step_time").value
    objective = auto.total("search_objective").value
    bound = auto.total("search_bucket_bound").value
    beaten = {s: t for s, t in named.items() if step > t * (1 + REL) + bound}
    out.update(auto=step, fits=auto.fits, objective=objective, bound=bound, beaten_by=beaten,
               modelled=abs(step - objective) <= REL * step + bound,
               ok=(auto.fits or not named) and not beaten and abs(step - objective) <= REL * step + bound)
    return out


def describe(r: dict) -> str:
    best = min(r["named"].items(), key=lambda kv: kv[1]) if r["named"] else None
    best_text = f"{best[0]} {best[1]:.6g} s" if best else "none fits"
    auto = f"{r['auto']:.6g} s" + ("" if r.get("fits") else " (does not fit)") if r["auto"] is not None else "no plan"
    extra = "" if r.get("modelled", True) else f"; objective {r['objective']:.6g} s differs"
    return (f"{'ok  ' if r['ok'] else 'LOST'} {r['spec']} --mesh {r['mesh']} --batch {r['batch']} {r['mode']}: "
            f"auto {auto}, best named {best_text} (of {len(r['named'])} that fit){extra} [{r['plan_seconds']:.0f} s]")


def primes(k: int) -> list[int]:
    return [p for p in range(2, k + 1) if k % p == 0 and all(p % q for q in range(2, p))]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", default=None, help="comma-separated; default: every bundled spec")
    parser.add_argument("--meshes", default="2,4,8,2x4,8x8")
    parser.add_argument("--batches", default="1,8,64,512,4096")
    parser.add_argument("--modes", default="train,infer")
    parser.add_argument("--hardware", default=None, help="default: h200-8, or h200-128x8 beyond 8 devices")
    parser.add_argument("--jsonl", default=None, help="append each case here; cases already there are skipped")
    parser.add_argument("--spread", action="store_true",
                        help="each spec's first point before any spec's second (a stopped run covers every spec)")
    args = parser.parse_args(argv)
    specs = args.specs.split(",") if args.specs else bundled_specs()
    done: dict[tuple, dict] = {}
    if args.jsonl and Path(args.jsonl).is_file():
        for line in Path(args.jsonl).read_text().splitlines():
            r = json.loads(line)
            done[(r["spec"], r["mesh"], r["batch"], r["mode"])] = r
    points = list(itertools.product(args.meshes.split(","), [int(b) for b in args.batches.split(",")],
                                    args.modes.split(",")))
    if args.spread:  # points in a stride order (consecutive ones differ in mesh, batch and mode), specs round-robin
        stride = next(k for k in (7, 11, 13, 17, 1) if all(len(points) % p for p in primes(k)))
        points = [points[i * stride % len(points)] for i in range(len(points))]
        cases = [(spec, *point) for point in points for spec in specs]
    else:
        cases = [(spec, *point) for spec in specs for point in points]
    results, start = [], time.perf_counter()
    for spec, mesh, batch, mode in cases:
        r = done.get((spec, mesh, batch, mode))
        if r is None:
            r = compare(spec, mesh, batch, mode, args.hardware)
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
