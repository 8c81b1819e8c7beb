"""Is ``--strategy auto`` ever worse than a named strategy that fits? The cross product, by hand.

    python bench/auto_vs_named.py                                  # bundled specs, meshes 2 4 8 2x4
    python bench/auto_vs_named.py --specs dense-tiny --meshes 2x4 --batches 8 --modes infer

For every spec, mesh, batch and mode: the auto plan's modelled step time against every named
combination (dp, fsdp, tp, sp, ep on each axis; on a 2-D mesh every ordered pair) that plans and
fits. Prints one line per case and the cases where auto lost (there should be none), and checks
that the plan's step_time equals the search's objective (the search models the plan exactly), up to
``search_bucket_bound`` where a gradient bucket key fills more than one bucket.
"""

from __future__ import annotations

import argparse
import itertools
import time

NAMED = ("dp", "fsdp", "tp", "sp", "ep")


def named_combinations(mesh: str) -> list[str]:
    axes = len(mesh.split("x"))
    return [",".join(c) for c in itertools.product(NAMED, repeat=axes)]


def compare(spec: str, mesh: str, batch: int, mode: str, hardware: str = "h200-8") -> dict:
    """The auto plan and the best named plan that fits, at one point."""
    from ultraplan.passes.context import PlanError

    from ultraplan import api

    try:
        auto = api.plan(spec, mesh, hardware=hardware, batch=batch, mode=mode, strategy="auto")
    except PlanError as exc:
        auto = None
        reason = str(exc)
    named = {}
    for strategy in named_combinations(mesh):
        try:
            plan = api.plan(spec, mesh, hardware=hardware, batch=batch, mode=mode, strategy=strategy)
        except PlanError:
            continue
        if plan.fits:
            named[strategy] = plan.total("step_time").value
    best = min(named.items(), key=lambda kv: kv[1]) if named else None
    out = {"spec": spec, "mesh": mesh, "batch": batch, "mode": mode, "best_named": best, "named": len(named)}
    if auto is None:
        out.update(auto=None, ok=best is None, why=reason)
        return out
    step = auto.total("step_time").value
    objective = auto.total("search_objective").value
    bound = auto.total("search_bucket_bound").value  # gradient buckets counted by bytes (docs/search.md)
    out.update(auto=step, fits=auto.fits, objective=objective, bound=bound,
               ok=auto.fits and (best is None or step <= best[1] * (1 + 1e-9) + bound)
               and abs(step - objective) <= 1e-9 * step + bound)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", default="dense-tiny,moe-tiny,pkm-tiny,peer-tiny,ultramem-tiny,ultramem-v2-tiny,"
                        "memory-plus-tiny,gpt2-tiny,olmoe-tiny,dense-gqa-tied,dense-deep-groups,dense-100m,moe-100m")
    parser.add_argument("--meshes", default="2,4,8,2x4")
    parser.add_argument("--batches", default="1,8,64,4096")
    parser.add_argument("--modes", default="train,infer")
    parser.add_argument("--hardware", default="h200-8")
    args = parser.parse_args(argv)
    results, start = [], time.perf_counter()
    for spec, mesh, batch, mode in itertools.product(args.specs.split(","), args.meshes.split(","),
                                                     [int(b) for b in args.batches.split(",")], args.modes.split(",")):
        r = compare(spec, mesh, batch, mode, args.hardware)
        results.append(r)
        best = f"{r['best_named'][0]} {r['best_named'][1]:.4g} s" if r["best_named"] else "none fits"
        auto = f"{r['auto']:.4g} s" if r["auto"] is not None else "no plan"
        print(f"{'ok  ' if r['ok'] else 'LOST'} {spec} --mesh {mesh} --batch {batch} {mode}: auto {auto}, best named "
              f"{best} (of {r['named']} that fit)", flush=True)
    lost = [r for r in results if not r["ok"]]
    print(f"{len(results)} cases, {len(lost)} where auto lost or mis-modelled, {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
