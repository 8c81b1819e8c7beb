"""The ``ultraplan`` command: stats, plan, compile, run, export, viz, explain, diff, fields, data, report.

Spec and plan errors print one message (file:line:column: field: what and how to fix) and exit 2;
a failed ``run --check`` exits 1. Heavy modules (the planner, torch) are imported inside the
commands, after the spec has been validated: ``--help``, ``fields`` and a spec's mistakes answer
in a fraction of a second (tests/unit/test_fast_cli.py).

Here: ``stats``, ``plan`` and ``compile``, the parser and ``main``; the commands that read plans and
specs are in cli_read.py, those that run programs on this machine in cli_run.py, the shared flags
in cli_args.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ultraplan.cli_args import bucket_arg, check_counts, plan_args, say_defaults, validated
from ultraplan.cli_read import add_read_parsers, cmd_sweep
from ultraplan.cli_run import add_calibrate_parser, add_data_and_report_parsers, add_run_parsers
from ultraplan.compiler.errors import SpecError


def cmd_stats(args: argparse.Namespace) -> int:
    validated(args.spec, warn=True)
    from ultraplan import api
    from ultraplan.passes.stats import spec_stats

    spec, reports = api.load_with_reports(args.spec)
    stats = spec_stats(spec).as_dict(args.batch, by_component=args.by == "component")
    sized = [d for r in reports if r.name == "size_ffn" for d in r.decisions]
    if args.json:
        print(json.dumps(stats | ({"ffn_sizing": sized} if sized else {}), indent=1))
        return 0
    for line in sized:
        print(f"sized {line}")
    print(f"{spec.name}: {stats['params']:,} parameters, {stats['active_params']:,} active per token "
          f"({stats['params_non_embedding']:,} and {stats['active_params_non_embedding']:,} without embeddings)")
    print(f"forward FLOPs per token: {stats['flops_per_token_expr']} = {stats['flops_per_token']:,} at T={spec.seq_len}")
    print(f"weight bytes read per token, decode batch B={args.batch}: {stats['memory_access_bytes_per_token']:,.0f}"
          f"  (= {stats['memory_access_bytes_per_token_expr']})")
    if stats["memory_to_ffn"] is not None:
        print(f"memory-to-FFN FLOPs: {stats['memory_to_ffn']:.4f} (memory share of the two: "
              f"{stats['memory_to_ffn'] / (1 + stats['memory_to_ffn']):.1%})")
    for name, c in stats.get("by_component", {}).items():
        print(f"  {name:12s} {c['params']:>14,} params {c['active_params']:>14,} active "
              f"{c['flops_per_token']:>14,} FLOP/token {c['memory_access_bytes_per_token']:>16,.0f} B/token")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    validated(args.spec, warn=True)
    if args.sweep:
        return cmd_sweep(args)
    from ultraplan import api
    from ultraplan.passes.context import Mesh

    result = api.plan(args.spec, args.mesh, hardware=args.hardware, batch=args.batch, seq=args.seq, mode=args.mode,
                      strategy=args.strategy, force=args.force, bucket_mb=args.bucket_mb, fuse=args.fuse)
    text = result.to_json()
    say_defaults(args, result)
    if not result.fits:
        print(f"warning: {api.memory_warning(result)}", file=sys.stderr)
    if args.output:
        Path(args.output).write_text(text)
    if args.json:
        print(text, end="")
    else:
        totals = dict(result.totals)
        print(f"{result.spec_name}: {result.strategy} on mesh {Mesh(result.mesh)} ({result.hardware}), "
              f"B={result.batch}, T={result.seq}")
        for key, cost in totals.items():
            print(f"  {key:26s} {cost.value:<14.6g} = {cost.expr}")
        print(f"  fits in device memory      {result.fits} ({result.device_memory:.4g} bytes)")
        p = result.precision
        print(f"  precision                  compute {p.compute}; master weights, gradients, optimizer state "
              f"{p.master}; loss {p.loss}")
        if args.output:
            print(f"wrote {args.output}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    validated(args.spec)
    from ultraplan import api
    from ultraplan.passes.context import Mesh

    out = Path(args.output)
    result = api.compile(args.spec, args.mesh, out, hardware=args.hardware, batch=args.batch, seq=args.seq,
                         mode=args.mode, strategy=args.strategy, force=args.force, bucket_mb=args.bucket_mb, fuse=args.fuse,
                         allow_oversubscribe=args.allow_oversubscribe)
    say_defaults(args, result)
    if not result.fits:
        print(f"warning: {api.memory_warning(result)} (compiled anyway: --allow-oversubscribe)", file=sys.stderr)
    files = sorted(p.name for p in out.iterdir())
    print(f"compiled {result.spec_name} for mesh {Mesh(result.mesh)} into {out}: {', '.join(files)}")
    print(f"run it: torchrun --nproc_per_node {Mesh(result.mesh).size} {out / 'program.py'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ultraplan", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stats", help="parameters, active parameters, FLOPs and memory traffic per token")
    p.add_argument("spec")
    p.add_argument("--batch", type=int, default=1, help="decode batch for memory_access_bytes_per_token (default 1)")
    p.add_argument("--by", choices=("component",), default=None, help="add a breakdown by component")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("plan", help="make a plan for a mesh")
    p.add_argument("spec")
    plan_args(p)
    bucket_arg(p)
    p.add_argument("--json", action="store_true", help="print the plan JSON")
    p.add_argument("-o", "--output", help="write the plan JSON here")
    p.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...",
                   help="plan at each value of batch or seq (e.g. batch=1,8,64,512) and print where the chosen "
                        "signatures change, with the modelled step time at each point")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("compile", help="write program.py (a training program), plan.json, plan.dot, plan.svg")
    p.add_argument("spec")
    plan_args(p, modes=False)
    bucket_arg(p)
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--allow-oversubscribe", action="store_true",
                   help="compile a plan that does not fit the device memory (refused otherwise)")
    p.set_defaults(func=cmd_compile)
    add_run_parsers(sub)
    add_read_parsers(sub)
    add_data_and_report_parsers(sub)
    add_calibrate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_counts(args)
        return args.func(args)
    except (SpecError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `ultraplan explain ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # an output path that cannot be written, a directory given for a file, ...
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        planner = sys.modules.get("ultraplan.passes.context")  # no PlanError unless the planner was loaded
        if planner is None or not isinstance(exc, planner.PlanError):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
