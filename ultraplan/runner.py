"""Launch a compiled program with torchrun and, on request, check it against the eager reference."""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ultraplan.api import read_plan
from ultraplan.data import NO_DATA, DataFlags
from ultraplan.launch import run_job
from ultraplan.passes.context import Mesh
from ultraplan.passes.plan import Plan
from ultraplan.program_dir import check_program_dir
from ultraplan.reference import relative_differences, train_reference

# fp32 tolerances. Splitting the batch over ranks changes the order of the gradient sums, which
# moves each loss by ~1e-7 relative (measured: <1e-6 over 30 steps of dense-tiny on 4 ranks).
LOSS_TOLERANCE = 1e-5
# Parameters drift more: AdamW's first steps move every element by ~lr * sign(gradient), so an
# element whose gradient is mostly cancellation carries its rounding noise into the update.
# Measured on dense-tiny, 4 ranks: 4e-5 (Frobenius, relative) after 5 steps, 5e-5 after 30.
# 1e-4 keeps a 2x margin; a wrong gradient scale or a missing all-reduce shows up at 1e-2 or more
# after one step. Errors smaller than 1e-4 are what `--dtype float64` is for (below).
PARAM_TOLERANCE = 1e-4
# float64: the same runs agree to ~1e-15 in the loss and ~1e-13 in the parameters (AdamW's
# amplification works on float64 rounding now), so 1e-10 leaves a wide margin while catching any
# error of the plan itself, however small.
# bfloat16 (a plan with train.precision bf16, run in float32 and compared with the float32 eager
# run; docs/precision.md derives these): bfloat16 rounds each op to 2^-8 relative, which leaves the
# first loss within ~1e-6 (errors average over the positions), but AdamW's first steps move every
# element by ~lr * sign(gradient), and the signs of small gradient elements are rounding noise, so
# the losses part by about 0.4% of each step's decrease; memory layers' top-k selections flip too.
# Measured on 20 steps (the default): 2.7e-3 (dense-tiny dp, 2 ranks), 1.6e-3 (moe-tiny ep),
# 1.24e-2 (ultramem-tiny, 1 rank); a dp program with its gradient all-reduce removed is 3.2e-2 off
# at the second step and 5e-2 to 2.4e-1 after. 2e-2 lies between. Parameters are a gross check
# only (NaN, divergence): elements whose gradient is all rounding move by ~lr either way, 0.88
# relative on ultramem-tiny's tables after 20 steps, 0.41 on moe-tiny's experts, 0.034 dense-tiny.
BF16_LOSS_TOLERANCE = 2e-2
BF16_PARAM_TOLERANCE = 1.0
TOLERANCES = {"float32": {"loss": LOSS_TOLERANCE, "params": PARAM_TOLERANCE},
              "float64": {"loss": 1e-10, "params": 1e-10},
              "bfloat16": {"loss": BF16_LOSS_TOLERANCE, "params": BF16_PARAM_TOLERANCE}}
RUN_DTYPES = ("float32", "float64")  # what --dtype takes; bfloat16 is the plan's, not a run's


def launch(out_dir: Path, nproc: int, steps: int, seed: int, dump: Path | None, quiet: bool = False,
           dtype: str = "float32", extra: Sequence[str] = (), data: DataFlags = NO_DATA) -> int:
    """Run ``torchrun --nproc_per_node nproc program.py`` (through ultraplan.launch: signals forwarded, no
    rank left behind, one line per failure); return its exit code. ``extra``: more flags for the program
    (checkpoint_flags, the failure flags); ``data``: the token files' flags."""
    out_dir = out_dir.resolve()
    cmd = [sys.executable, "-m", "ultraplan.launch", "--standalone", f"--nproc_per_node={nproc}",
           str(out_dir / "program.py"), "--steps", str(steps), "--seed", str(seed), "--dtype", dtype, *extra]
    if dump is not None:
        cmd += ["--dump", str(dump)]
    if quiet:
        cmd.append("--quiet")
    cmd += data.program_args()  # --data, --val-data, --metrics, ...
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return run_job(cmd, env, out_dir)


def checkpoint_flags(checkpoint_dir: Path | None, checkpoint_every: int | None, resume: bool,
                     asynchronous: bool = False) -> tuple[str, ...]:
    """The program's checkpoint flags (backends/checkpoint.py), checked here so a mistake is one line."""
    if (checkpoint_every is not None or resume or asynchronous) and checkpoint_dir is None:
        raise ValueError("--checkpoint-every, --checkpoint-async and --resume need --checkpoint-dir DIR "
                         "(where checkpoints are kept)")
    if checkpoint_every is not None and checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be at least 0, got {checkpoint_every}")
    if checkpoint_dir is None:
        return ()
    flags = ("--checkpoint-dir", str(Path(checkpoint_dir).resolve()))
    flags += ("--checkpoint-every", str(checkpoint_every)) if checkpoint_every is not None else ()
    return flags + (("--resume",) if resume else ()) + (("--checkpoint-async",) if asynchronous else ())


def run(out_dir: Path, *, nproc: int | None, steps: int | None, seed: int | None, check: bool,
        quiet: bool = False, dtype: str = "float32", data: DataFlags = NO_DATA, checkpoint_dir: Path | None = None,
        checkpoint_every: int | None = None, resume: bool = False, checkpoint_async: bool = False,
        extra_args: Sequence[str] = (), timed: bool = False) -> dict:
    """Run the program in ``out_dir``; with ``check`` compare it with the eager reference; with
    ``timed`` (or ``check``) report the measured step time beside the plan's (``step_report``).

    Returns a JSON-able report; ``report["ok"]`` is False when the run failed or the check did.
    ``report["losses"]`` are the losses of the steps this run made, ``report["loss_steps"]`` their
    step numbers (a resumed run starts after its checkpoint's step). A resumed run is checked
    against the same steps of an eager run from step 0.
    """
    plan = read_plan(out_dir)
    check_program_dir(Path(out_dir), plan)  # every file there, all of one compile
    mesh = Mesh(tuple(plan.mesh))
    nproc = mesh.size if nproc is None else nproc
    if nproc != mesh.size:
        raise ValueError(f"{out_dir} was compiled for mesh {mesh} ({mesh.size} processes), "
                         f"not {nproc}; recompile with --mesh {nproc} or drop --nproc")
    if steps is None and plan.training.steps < 1:
        raise ValueError(f"{out_dir}: plan.json trains {plan.training.steps} steps; pass --steps K (at least 1)")
    steps = plan.training.steps if steps is None else steps
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    seed = plan.training.seed if seed is None else seed
    if dtype not in RUN_DTYPES:
        raise ValueError(f"--dtype takes {' or '.join(RUN_DTYPES)}, got {dtype!r}")
    extra = checkpoint_flags(checkpoint_dir, checkpoint_every, resume, checkpoint_async)
    batches = data.reference_batches(plan.batch, plan.seq, dict(plan.model)["vocab_size"])  # None: synthetic task
    report: dict = {"dir": str(out_dir), "nproc": nproc, "steps": steps, "seed": seed, "dtype": dtype}
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "result.json" if check or timed else None
        made = Path(tmp) / "losses.json"
        code = launch(out_dir, nproc, steps, seed, dump, quiet, dtype,
                      (*extra, *extra_args, "--losses-out", str(made)), data)
        report["exit_code"] = code
        if code != 0:
            report["ok"] = False
            return report
        record = json.loads(made.read_text())
        report.update(losses=record["losses"], loss_steps=record["steps"])
        if dump is not None:
            result = json.loads(dump.read_text())
            report |= step_report(plan, result.get("step_times", []))
        if not check:
            report["ok"] = True
            return report
        params = torch.load(result["params"])
    first = result.get("first_step", 0)
    if first >= steps:
        raise ValueError(f"--check: the checkpoint resumed is at step {first}, so no step up to --steps {steps} ran; "
                         "raise --steps")
    comm = comm_report(plan, result, steps - first)
    comm |= saved_report(plan, result)
    ref_losses, ref_params = train_reference(plan, steps, seed, getattr(torch, dtype), batches)
    diffs = relative_differences(result["losses"], ref_losses[first:], params, ref_params)
    mixed = dtype == "float32" and plan.precision.compute != "float32"  # float64 checks run all in float64
    tolerance = TOLERANCES[plan.precision.compute if mixed else dtype]
    report.update({
        "losses": result["losses"], "reference_losses": ref_losses[first:],
        "max_rel_diff_loss": diffs["loss"], "max_rel_diff_params": diffs["params"],
        "tolerance": tolerance, "precision": plan.precision.compute if mixed else dtype,
        **comm,
        "ok": diffs["loss"] <= tolerance["loss"] and diffs["params"] <= tolerance["params"],
    })
    return report


# Steps left out of the step-time median: the first runs under comm_debug (a dispatch mode) and counts saved
# tensors, and the first ones also pay allocation and autograd's first-use costs.
WARMUP_STEPS = 2


def step_report(plan: Plan, step_times: list[float]) -> dict:
    """The median of the steps after ``WARMUP_STEPS`` (all of them when the run was shorter) beside
    the plan's modelled ``step_time`` under the hardware it was planned for (``plan.hardware``):
    a median, since other work on the machine stretches single steps."""
    steady = step_times[WARMUP_STEPS:] or step_times
    return {"step_time_measured_s": statistics.median(steady) if steady else None,
            "step_time_predicted_s": plan.total("step_time").value,
            "step_times_s": step_times, "step_time_warmup_steps": len(step_times) - len(steady),
            "hardware": plan.hardware}


def saved_report(plan: Plan, result: dict) -> dict:
    """Bytes autograd saved for the backward in the first step (the mean over ranks; parameters
    excluded) beside the plan's prediction (activations + gathered parameters + weight compute
    copies, in the plan's dtypes; a float64 run saves every float value in float64, so its measure
    is not comparable)."""
    measured = result.get("saved_activation_bytes") or [0]
    totals = dict(plan.totals)
    saved = ("memory_activations", "memory_gathered_parameters", "memory_param_copies")
    predicted = sum(totals[k].value for k in saved if k in totals)
    return {"saved_activation_bytes_measured": sum(measured) / len(measured),
            "saved_activation_bytes_predicted": predicted}


def comm_report(plan: Plan, result: dict, steps: int) -> dict:
    """Per step and kind: bytes handed to collectives (the mean over ranks: routed all_to_all payloads
    differ between ranks, their mean is what the plan predicts) and calls, measured and predicted
    (the plan's one list of collectives), and the calls torch's dispatcher ran in the first step (runtime.comm_debug).
    The plan's bytes are in each collective's dtype; a float64 run (``result["dtype"]``) hands every
    floating value in float64, int64 ones (indices, counts) as planned."""
    ranks = result["comm_by_rank"]
    kinds = sorted({k for r in ranks for k in r["bytes"]} | {c.collective for c in plan.collectives})
    predicted_bytes, predicted_calls = plan.step_collectives("float64" if result.get("dtype") == "float64" else None)
    return {
        "comm_bytes_measured": {k: sum(r["bytes"].get(k, 0) for r in ranks) / len(ranks) / steps for k in kinds},
        "comm_bytes_predicted": {k: predicted_bytes.get(k, 0) for k in kinds},
        "comm_calls_measured": {k: result["comm"]["calls"].get(k, 0) / steps for k in kinds},
        "comm_calls_predicted": {k: predicted_calls.get(k, 0) for k in kinds},
        "comm_calls_torch_first_step": {k: result.get("comm_debug_first_step", {}).get(k, 0) for k in kinds},
    }
