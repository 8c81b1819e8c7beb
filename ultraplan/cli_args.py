"""The flags several ``ultraplan`` commands share, and the checks that run before anything heavy loads."""

from __future__ import annotations

import argparse
import sys

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


def say_defaults(args: argparse.Namespace, plan) -> None:
    line = defaults_used(args, plan)
    if line:
        print(line, file=sys.stderr)


def bucket_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bucket-mb", type=float, default=None, metavar="MIB",
                   help="width of the gradient buckets in MiB (default 50; a gradient counts at most half of it)")


def place_arg(p: argparse.ArgumentParser) -> None:
    """--place: value-table and expert placement (passes/placement.py), pins through --force's list."""
    p.add_argument("--place", action="append", dest="force", metavar="TABLE=number|dim|replicate",
                   help="place value tables / expert weights (a glob over canonical parameter names, e.g. "
                        "'layers.*.pkm.values=number'): rows split, value dim split or replicated; one per mesh "
                        "axis, comma separated, or one for all; repeatable")


def plan_args(p: argparse.ArgumentParser, *, modes: bool = True) -> None:
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
    place_arg(p)
    if modes:
        p.add_argument("--mode", choices=("train", "infer"), default="train")
    else:
        p.set_defaults(mode="train")
