"""``ultraplan viz``, ``explain``, ``diff``, ``fields`` and ``plan --sweep``: the commands that read
plans and specs (nothing here runs a program)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ultraplan.cli_args import STAGES, plan_args, validated
from ultraplan.compiler.errors import SpecError, nearest
from ultraplan.paths import resolve_spec_path


def cmd_viz(args: argparse.Namespace) -> int:
    from ultraplan import api
    from ultraplan.backends.graphviz import plan_to_dot, render_svg

    plan = api.read_plan(args.plan)
    dot = plan_to_dot(plan, fold=not args.unfold)
    out = Path(args.output)
    if out.suffix == ".dot":
        out.write_text(dot)
    elif not render_svg(dot, out):
        out.with_suffix(".dot").write_text(dot)
        print(f"graphviz 'dot' is not installed: wrote {out.with_suffix('.dot')} instead", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def _is_plan(path: str) -> bool:
    """``explain`` of a plan.json (or a compiled directory) rather than of a spec."""
    return path.endswith(".json") or (Path(path).is_dir() and (Path(path) / "plan.json").exists())


def cmd_explain_plan(args: argparse.Namespace) -> int:
    from ultraplan import api
    from ultraplan.backends.explain_plan import explain_plan
    from ultraplan.passes.alternatives import plan_choices

    plan = api.read_plan(args.spec)
    choices = None
    if not args.no_candidates:
        try:
            hardware = api.load_hardware(args.hardware or plan.hardware)
        except SpecError as exc:
            raise ValueError(f"the plan's hardware {plan.hardware!r} is not a bundled name or a file here ({exc.message}); "
                             "give its spec with --hardware PATH, or --no-candidates") from None
        choices = plan_choices(plan, hardware)
    print(explain_plan(plan, choices, None if args.all else 4), end="")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from ultraplan import api
    from ultraplan.backends.diff import diff, render, to_json

    d = diff(api.read_plan(args.a), api.read_plan(args.b))
    print(to_json(d) if args.json else render(d), end="")
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    """``explain SPEC --tables``: per value table / expert group, its placement, bytes moved per step,
    memory per device and the batch at which the choice would flip (passes/placement_report.py)."""
    from ultraplan import api
    from ultraplan.passes.context import Mesh
    from ultraplan.passes.placement_report import render, table_reports

    mesh = Mesh.parse(args.mesh)
    reports = table_reports(api.load(args.spec), api.load_hardware(args.hardware), mesh, batch=args.batch,
                            seq=args.seq, mode=args.mode, strategies=api.parse_strategy(args.strategy, mesh),
                            forces=api.parse_forces(args.force), fuse=args.fuse)
    print(render(reports) if reports else "the model has no value tables or expert weights")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    if _is_plan(args.spec):
        return cmd_explain_plan(args)
    if getattr(args, "tables", False):
        return cmd_tables(args)
    if getattr(args, "crossover", None):
        return cmd_crossover(args)
    if args.stage not in STAGES:
        raise ValueError(f"--stage must be one of {', '.join(STAGES)}, got {args.stage!r}")
    from ultraplan.compiler.validate import load_model_spec

    spec = load_model_spec(resolve_spec_path(args.spec, "models"))
    from ultraplan import api
    from ultraplan.backends.explain import explain_graph
    from ultraplan.passes.context import Mesh
    from ultraplan.passes.pipeline import make_plan
  # unsized: size_ffn's report shows
    mesh = Mesh.parse(args.mesh)
    _, gm, reports = make_plan(spec, api.load_hardware(args.hardware), mesh, batch=args.batch, seq=args.seq,
                               mode=args.mode, stop_after=args.stage, strategies=api.parse_strategy(args.strategy, mesh),
                               forces=api.parse_forces(args.force), fuse=args.fuse)
    print(explain_graph(gm, reports))
    return 0


def cmd_fields(args: argparse.Namespace) -> int:
    from ultraplan.compiler.reference import render, sections

    kinds = list(sections())
    if args.kind is not None and args.kind not in kinds:
        guess = nearest(args.kind, kinds)
        raise ValueError(f"no spec section or sublayer kind {args.kind!r}; "
                         + (f"did you mean {guess!r}? " if guess else "") + "kinds: " + ", ".join(kinds))
    print(render(args.kind), end="")
    return 0


# ---- plan --sweep (ultraplan/sweep.py) -----------------------------------------------------------


def cmd_sweep(args: argparse.Namespace) -> int:
    from ultraplan.sweep import parse_sweep, render, sweep

    key, values = parse_sweep(args.sweep)
    plan_args = {"hardware": args.hardware, "batch": args.batch, "seq": args.seq, "mode": args.mode,
                 "strategy": args.strategy, "force": args.force, "bucket_mb": args.bucket_mb, "fuse": args.fuse}
    print(render(key, sweep(args.spec, args.mesh, key, values, **plan_args)))
    return 0


# ---- explain --crossover (ultraplan/decision.py) --------------------------------------------------


def cmd_crossover(args: argparse.Namespace) -> int:
    validated(args.spec)
    from ultraplan.decision import decide, render

    plan_args = {"hardware": args.hardware, "batch": args.batch, "seq": args.seq, "mode": args.mode,
                 "strategy": args.strategy, "force": args.force, "fuse": args.fuse}
    print(render(decide(args.spec, args.mesh, args.crossover, args.over, **plan_args)))
    return 0


def _crossover_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--crossover", default=None, metavar="NODE=SBP_A/SBP_B",
                   help="plan with NODE pinned to each SBP and solve (sympy) the batch at which their modelled "
                        "step times are equal, e.g. 'layers_*_ffn_w_up=S(0)/B'")
    p.add_argument("--over", choices=("batch", "seq"), default="batch", help="the variable --crossover solves for")


def add_read_parsers(sub) -> None:
    """``viz``, ``explain``, ``diff`` and ``fields``."""
    p = sub.add_parser("viz", help="draw a plan.json with graphviz")
    p.add_argument("plan")
    p.add_argument("-o", "--output", required=True, help="plan.svg (or .png, .pdf; .dot writes the source)")
    p.add_argument("--unfold", action="store_true", help="draw every layer (default: one box per distinct block)")
    p.set_defaults(func=cmd_viz)
    p = sub.add_parser("explain", help="a plan.json's costs per layer and every node's candidates; or a spec's "
                       "annotated graph after a pass, as readable Python")
    p.add_argument("spec", help="plan.json (or a compiled directory), or a spec")
    plan_args(p)
    p.add_argument("--stage", default=STAGES[-1], help="the pass after which to stop: " + ", ".join(STAGES))
    p.add_argument("--all", action="store_true", help="plan.json: list every candidate (default: the best 4)")
    p.add_argument("--no-candidates", action="store_true", help="plan.json: the per-layer costs only (no re-pricing)")
    p.add_argument("--tables", action="store_true", help="instead: per value table / expert group, its placement, "
                   "bytes moved per step, memory per device and the batch at which the choice would flip")
    _crossover_args(p)
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("diff", help="where two plan.json differ and what each difference costs")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true", help="print the differences as JSON")
    p.set_defaults(func=cmd_diff)
    p = sub.add_parser("fields", help="the spec language's fields: type, default, constraint, meaning")
    p.add_argument("kind", nargs="?", default=None, help="model, layers, sublayer, a sublayer kind (attention, ffn, "
                   "moe, ...), norm, train, hardware or link; all when left out")
    p.set_defaults(func=cmd_fields)
