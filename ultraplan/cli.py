"""The ``ultraplan`` command: stats, plan, compile, run, export, viz, explain, diff, fields, data, report.

Spec and plan errors print one message (file:line:column: field: what and how to fix) and exit 2;
a failed ``run --check`` exits 1. Heavy modules (the planner, torch) are imported inside the
commands, after the spec has been validated: ``--help``, ``fields`` and a spec's mistakes answer
in a fraction of a second (tests/unit/test_fast_cli.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from ultraplan.compiler.errors import SpecError, nearest
from ultraplan.paths import resolve_spec_path

# passes.pipeline.PIPELINE's names (tested)
STAGES = ("precision", "shape_prop", "annotate_cost", "fuse", "choose_sbp", "build_plan", "find_blocks")
INT64_MAX = 2**63 - 1


def check_counts(args: argparse.Namespace) -> None:
    """--batch and --seq are whole numbers from 1 to 2^63 - 1 (torch sizes tensors in int64); a
    ValueError (exit 2) otherwise, before anything is loaded."""
    for flag in ("batch", "seq"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be at least 1, got {value}")
        if value is not None and value > INT64_MAX:
            raise ValueError(f"--{flag} must be at most 2^63 - 1, got {value}")


def validated(spec: str, *, warn: bool = False) -> None:
    """Load and validate SPEC without the planner, so that its mistakes are reported before torch loads;
    with ``warn``, print the spec's warnings (a model with no position information) to stderr."""
    from ultraplan.compiler.validate import load_model_spec

    model = load_model_spec(resolve_spec_path(spec, "models"))
    warning = model.position_warning() if warn else None
    if warning:
        print(warning, file=sys.stderr)


def defaults_used(args: argparse.Namespace, plan) -> str | None:
    """The values that change a plan's result and that nobody wrote: a batch or sequence length no
    flag gave, a learning rate the spec does not set. Said on stderr so that a JSON reader is not
    disturbed and a reader of the numbers knows where they came from."""
    import yaml

    train = (yaml.safe_load(plan.spec_text) or {}).get("train") or {}
    notes = []
    if args.batch is None:
        where = "train.batch_size" if "batch_size" in train else "the default train.batch_size"
        notes.append(f"batch {plan.batch} ({where}; --batch to change)")
    if args.seq is None:
        notes.append(f"sequence length {plan.seq} (model.seq_len; --seq to change)")
    if "lr" not in train:
        notes.append(f"learning rate {plan.training.lr:g} (the default: the spec sets no train.lr)")
    return "defaults: " + "; ".join(notes) if notes else None


def _say_defaults(args: argparse.Namespace, plan) -> None:
    line = defaults_used(args, plan)
    if line:
        print(line, file=sys.stderr)


def _bucket_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bucket-mb", type=float, default=None, metavar="MIB",
                   help="width of the gradient buckets in MiB (default 50; a gradient counts at most half of it)")


def _place_arg(p: argparse.ArgumentParser) -> None:
    """--place: value-table and expert placement (passes/placement.py), pins through --force's list."""
    p.add_argument("--place", action="append", dest="force", metavar="TABLE=number|dim|replicate",
                   help="place value tables / expert weights (a glob over canonical parameter names, e.g. "
                        "'layers.*.pkm.values=number'): rows split, value dim split or replicated; one per mesh "
                        "axis, comma separated, or one for all; repeatable")


def _plan_args(p: argparse.ArgumentParser, *, modes: bool = True) -> None:
    p.add_argument("--mesh", default="1", help="devices: N or NxM (axis 0 spans nodes); default 1")
    p.add_argument("--hardware", default=None, help="hardware spec path or bundled name (default: cpu)")
    p.add_argument("--batch", type=int, default=None, help="global batch B (default: the spec's train.batch_size)")
    p.add_argument("--seq", type=int, default=None, help="sequence length T (default: the spec's seq_len)")
    p.add_argument("--strategy", default=None,
                   help="one per mesh axis, comma separated: dp, fsdp, tp, sp, ep or auto (the search: the "
                        "cheapest signatures that fit; e.g. fsdp,tp, dp,auto or auto); default dp")
    p.add_argument("--force", action="append", default=None, metavar="NODE=SBP",
                   help="pin the SBP consumers of NODE see (a glob over node names; one SBP per axis, e.g. "
                        "'layers_*_attention_q=S(2)'); repeatable")
    p.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="keep every op as written (no fused ops: passes/fuse.py)")
    _place_arg(p)
    if modes:
        p.add_argument("--mode", choices=("train", "infer"), default="train")
    else:
        p.set_defaults(mode="train")


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
    _say_defaults(args, result)
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
    _say_defaults(args, result)
    if not result.fits:
        print(f"warning: {api.memory_warning(result)} (compiled anyway: --allow-oversubscribe)", file=sys.stderr)
    files = sorted(p.name for p in out.iterdir())
    print(f"compiled {result.spec_name} for mesh {Mesh(result.mesh)} into {out}: {', '.join(files)}")
    print(f"run it: torchrun --nproc_per_node {Mesh(result.mesh).size} {out / 'program.py'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ultraplan.data import DataFlags
    from ultraplan.runner import run

    data = DataFlags(args.data, args.data_dtype, args.val_data, args.val_every, args.val_batches, args.metrics)
    report = run(Path(args.dir), nproc=args.nproc, steps=args.steps, seed=args.seed, check=args.check,
                 quiet=args.json or args.quiet, dtype=args.dtype, data=data, checkpoint_dir=args.checkpoint_dir,
                 checkpoint_every=args.checkpoint_every, resume=args.resume, checkpoint_async=args.checkpoint_async,
                 extra_args=failure_flags(args),
                 timed=args.json)
    if args.json:
        print(json.dumps(report, indent=1))
    elif args.check and "max_rel_diff_loss" in report:
        verdict = "OK" if report["ok"] else "FAILED"
        print(f"check against eager: {verdict}: max relative difference of losses "
              f"{report['max_rel_diff_loss']:.2e}, of final parameters {report['max_rel_diff_params']:.2e} "
              f"(tolerances {report['tolerance']['loss']:.0e} and {report['tolerance']['params']:.0e})")
    code = report.get("exit_code", 0)
    if code > 128:  # SIGINT, SIGTERM: forwarded to every rank, each said where it stopped
        print(f"the program was stopped by {signal.Signals(code - 128).name}", file=sys.stderr)
        return code
    if code != 0:
        print(f"the program exited with code {code}", file=sys.stderr)
    return 0 if report["ok"] else 1


def cmd_export(args: argparse.Namespace) -> int:
    from ultraplan.export import export

    path, names = export(Path(args.checkpoint), Path(args.output))
    print(f"wrote {args.output}: {names} tensors from {path}")
    return 0


# ---- data and report ---------------------------------------------------------------------------


def _run_data_args(p: argparse.ArgumentParser) -> None:
    """`run`'s flags handed to the program (backends/train_data.py and progress.py define them there)."""
    p.add_argument("--data", default=None, metavar="PATH",
                   help="train on token ids from PATH (`ultraplan data prepare`, llm.c or nanoGPT .bin, or text "
                        "read as bytes); default: the synthetic permutation-walk task")
    p.add_argument("--data-dtype", choices=("uint16", "uint32"), default=None,
                   help="a header-less binary's id dtype (default uint16)")
    p.add_argument("--val-data", default=None, metavar="PATH", help="a held-out token file: a validation loss")
    p.add_argument("--val-every", type=int, default=None, metavar="N", help="steps between validation losses (10)")
    p.add_argument("--val-batches", type=int, default=None, metavar="K", help="batches per validation loss (2)")
    p.add_argument("--metrics", default=None, metavar="PATH", help="the JSON-lines log (default DIR/metrics.jsonl)")
    p.add_argument("--quiet", action="store_true", help="no progress line")


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from ultraplan.data import prepare

    for path, tokens in prepare(args.text, args.output, args.val_fraction).items():
        print(f"wrote {path}: {tokens:,} byte-level tokens (llm.c format, uint16, vocabulary 256)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ultraplan.report import report

    facts = report(Path(args.dir), Path(args.output) if args.output else None,
                   Path(args.metrics) if args.metrics else None)
    if args.json:
        print(json.dumps(facts, indent=1))
        return 0
    val = "" if facts["final_val_loss"] is None else f", validation {facts['final_val_loss']:.4f}"
    ratio = facts["measured_over_predicted"]
    print(f"{facts['steps']} steps: final loss {facts['final_loss']:.4f}{val}; step time measured "
          f"{facts['step_time_measured_s'] * 1e3:.3g} ms (median), predicted {facts['step_time_predicted_s'] * 1e3:.3g} ms"
          + (f" ({ratio:.3g}x)" if ratio else ""))
    print(f"wrote {facts['png']}")
    return 0


def _data_and_report_parsers(sub) -> None:
    p = sub.add_parser("data", help="token files: `data prepare TEXT... -o tokens.bin`")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("prepare", help="write text files' bytes as byte-level token ids (vocabulary 256)")
    p.add_argument("text", nargs="+", help="text files, concatenated in order")
    p.add_argument("-o", "--output", required=True, help="tokens.bin (llm.c's format: a 256-int32 header, uint16 ids)")
    p.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                   help="write the last F of the bytes to tokens.val.bin instead (held out for --val-data)")
    p.set_defaults(func=cmd_data_prepare)
    p = sub.add_parser("report", help="draw a run's loss curves and measured vs predicted step time (PNG)")
    p.add_argument("dir", help="a compiled directory that has run (its plan.json and metrics.jsonl)")
    p.add_argument("-o", "--output", default=None, help="the PNG (default DIR/report.png)")
    p.add_argument("--metrics", default=None, help="the metrics file (default DIR/metrics.jsonl)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_report)


def _failure_args(p: argparse.ArgumentParser) -> None:
    """The program's own failure flags (watchdog.py's add_arguments), passed through by ``run``."""
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop the job when a step makes no progress for this long, naming the stalled rank "
                        "(the program's default: 600; 0: off)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip a batch whose loss is NaN or infinite instead of stopping the run")


def failure_flags(args: argparse.Namespace) -> list[str]:
    return ([] if args.timeout is None else ["--timeout", str(args.timeout)]) + \
        (["--skip-nonfinite"] if args.skip_nonfinite else [])


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


# ---- calibrate (ultraplan/calibrate.py) ----------------------------------------------------------


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ultraplan.calibrate import calibrate

    out = Path(args.output)
    figures = calibrate(out, nproc=args.nproc, quick=args.quick, name=args.name)
    link = figures["link"]
    print(f"wrote {out}: peak {', '.join(f'{k} {v / 1e9:.3g} GFLOP/s' for k, v in figures['peak_flops'].items())}, "
          f"memory {figures['memory_bandwidth'] / 1e9:.3g} GB/s, op overhead {figures['op_overhead'] * 1e6:.3g} us, "
          f"link {link['bandwidth'] / 1e9:.3g} GB/s + {link['latency'] * 1e6:.3g} us per message")
    return 0


def _calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="measure this machine (FLOP/s, memory, collectives) into a hardware spec")
    p.add_argument("-o", "--output", required=True,
                   help="the hardware spec to write (e.g. specs/hardware/this-machine.yaml)")
    p.add_argument("--nproc", type=int, default=max(2, os.cpu_count() or 2),
                   help="ranks to measure with, at once (default: the CPU count, at least 2); the spec is "
                        "this machine as that many devices")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats: seconds, rougher figures")
    p.add_argument("--name", default=None, help="the spec's name (default: the output file's stem)")
    p.set_defaults(func=cmd_calibrate)


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
    _plan_args(p)
    _bucket_arg(p)
    p.add_argument("--json", action="store_true", help="print the plan JSON")
    p.add_argument("-o", "--output", help="write the plan JSON here")
    p.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...",
                   help="plan at each value of batch or seq (e.g. batch=1,8,64,512) and print where the chosen "
                        "signatures change, with the modelled step time at each point")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("compile", help="write program.py (a training program), plan.json, plan.dot, plan.svg")
    p.add_argument("spec")
    _plan_args(p, modes=False)
    _bucket_arg(p)
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--allow-oversubscribe", action="store_true",
                   help="compile a plan that does not fit the device memory (refused otherwise)")
    p.set_defaults(func=cmd_compile)
    p = sub.add_parser("run", help="run a compiled directory with torchrun")
    p.add_argument("dir")
    p.add_argument("--nproc", type=int, default=None, help="processes (default: the plan's mesh size)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--check", action="store_true", help="compare with the eager reference; exit 1 if off")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="float64 checks the plan to ~1e-10, free of fp32 rounding (default float32)")
    p.add_argument("--json", action="store_true", help="print a report: the losses of the steps run, with their numbers")
    p.add_argument("--checkpoint-dir", default=None, help="save checkpoints here (torch.distributed.checkpoint)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="save after every N-th step (and after the last, always when --checkpoint-dir is given)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--checkpoint-async", action="store_true",
                   help="save in the background (dcp.async_save): training goes on while the files are written")
    _run_data_args(p)
    _failure_args(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("export", help="write a checkpoint's model as one safetensors file (canonical names)")
    p.add_argument("checkpoint", help="a --checkpoint-dir (its latest complete checkpoint) or one step-N folder")
    p.add_argument("-o", "--output", required=True, help="model.safetensors")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("viz", help="draw a plan.json with graphviz")
    p.add_argument("plan")
    p.add_argument("-o", "--output", required=True, help="plan.svg (or .png, .pdf; .dot writes the source)")
    p.add_argument("--unfold", action="store_true", help="draw every layer (default: one box per distinct block)")
    p.set_defaults(func=cmd_viz)
    p = sub.add_parser("explain", help="a plan.json's costs per layer and every node's candidates; or a spec's "
                       "annotated graph after a pass, as readable Python")
    p.add_argument("spec", help="plan.json (or a compiled directory), or a spec")
    _plan_args(p)
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
    _data_and_report_parsers(sub)
    _calibrate_parser(sub)
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
