"""``ultraplan run``, ``export``, ``data prepare``, ``report`` and ``calibrate``: the commands that run
programs on this machine, and what they leave behind."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path


def cmd_run(args: argparse.Namespace) -> int:
    from ultraplan.data import DataFlags
    from ultraplan.runner import run

    data = DataFlags(args.data, args.data_dtype, args.val_data, args.val_every, args.val_batches, args.metrics)
    report = run(Path(args.dir), nproc=args.nproc, steps=args.steps, seed=args.seed, check=args.check,
                 quiet=args.json or args.quiet, dtype=args.dtype, data=data, checkpoint_dir=args.checkpoint_dir,
                 checkpoint_every=args.checkpoint_every, resume=args.resume, checkpoint_async=args.checkpoint_async,
                 extra_args=program_flags(args),
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


def add_data_and_report_parsers(sub) -> None:
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


def _program_args(p: argparse.ArgumentParser) -> None:
    """The program's own flags passed through by ``run``: failures (watchdog.py's add_arguments) and
    the fused ops' kernels."""
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop the job when a step makes no progress for this long, naming the stalled rank "
                        "(the program's default: 600; 0: off)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip a batch whose loss is NaN or infinite instead of stopping the run")
    p.add_argument("--kernels", choices=("triton", "torch"), default=None,
                   help="fused ops' kernels: triton (the program's kernels.py; its default on CUDA; on the CPU "
                        "under TRITON_INTERPRET=1, slow) or torch (the default on the CPU)")


def program_flags(args: argparse.Namespace) -> list[str]:
    return ([] if args.timeout is None else ["--timeout", str(args.timeout)]) + \
        (["--skip-nonfinite"] if args.skip_nonfinite else []) + \
        ([] if args.kernels is None else ["--kernels", args.kernels])


# ---- calibrate (ultraplan/calibrate.py) ----------------------------------------------------------


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ultraplan.calibrate import calibrate

    out = Path(args.output)
    figures = calibrate(out, nproc=args.nproc, quick=args.quick, name=args.name, links_from=args.links_from)
    link = figures["link"]
    print(f"wrote {out}: peak {', '.join(f'{k} {v / 1e9:.3g} GFLOP/s' for k, v in figures['peak_flops'].items())}, "
          f"memory {figures['memory_bandwidth'] / 1e9:.3g} GB/s, op overhead {figures['op_overhead'] * 1e6:.3g} us, "
          f"link {link['bandwidth'] / 1e9:.3g} GB/s + {link['latency'] * 1e6:.3g} us per message")
    return 0


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="measure this machine (FLOP/s, memory, collectives) into a hardware spec")
    p.add_argument("-o", "--output", required=True,
                   help="the hardware spec to write (e.g. specs/hardware/this-machine.yaml)")
    p.add_argument("--nproc", type=int, default=max(2, os.cpu_count() or 2),
                   help="ranks to measure with, at once (default: the CPU count, at least 2); the spec is "
                        "this machine as that many devices")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats: seconds, rougher figures")
    p.add_argument("--name", default=None, help="the spec's name (default: the output file's stem)")
    p.add_argument("--links-from", default=None, metavar="HARDWARE",
                   help="with --nproc 1 (one GPU: no collective to time), the hardware spec whose links to keep "
                        "(a path or bundled name, e.g. h200-8)")
    p.set_defaults(func=cmd_calibrate)


def add_run_parsers(sub) -> None:
    """``run`` and ``export``."""
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
    _program_args(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("export", help="write a checkpoint's model as one safetensors file (canonical names)")
    p.add_argument("checkpoint", help="a --checkpoint-dir (its latest complete checkpoint) or one step-N folder")
    p.add_argument("-o", "--output", required=True, help="model.safetensors")
    p.set_defaults(func=cmd_export)
