"""The cost model on one GPU: each bundled ~100M spec compiled for one device, run for a few steps,
its measured step time beside the plan's under a datasheet hardware spec (``h200-8`` by default) and,
with ``--calibrate``, under this machine measured by ``ultraplan calibrate --nproc 1 --links-from
HARDWARE`` (one GPU: every rate timed, no link) right before the runs; ``--kernels`` runs each
program with Triton's kernels for its fused ops, torch's, or both.

    python bench/step_time_gpu.py --calibrate              # on CUDA: tools/gpu_check.sh runs it
    python bench/step_time_gpu.py --specs dense-100m --batches 8 64 --hardware h200-8 --kernels triton torch

Measured: ``run --json``'s ``step_time_measured_s``, the median of the steps after the first two (each
step from one barrier to the next after a device synchronise, backends/runtime.py); predicted:
``step_time_predicted_s``, the plan's ``step_time`` under the spec it was compiled with (the calibrated
one with ``--calibrate``; the datasheet's is planned beside it). The programs run in
float32 (the specs' precision) and torch leaves TF32 off, so their matrix products are priced at the
spec's fp32 rate. On the CPU (``--kernels torch`` only) the script runs so that it is tested
(tests/unit/test_bench.py), not for its figures.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ULTRAPLAN = [sys.executable, "-m", "ultraplan"]
SPECS = ["dense-100m", "moe-100m", "pkm-100m", "peer-100m", "ultramem-100m", "ultramem-v2-100m"]


# bench/step_time.py's runner: run --json, a failed run tried once more
STEP_TIME = runpy.run_path(str(Path(__file__).with_name("step_time.py")))


def compile_case(spec: str, batch: int, hardware: str, out: Path) -> None:
    done = subprocess.run([*ULTRAPLAN, "compile", spec, "--mesh", "1", "--hardware", hardware, "--batch", str(batch),
                           "-o", str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench/step_time_gpu.py: {spec} at batch {batch} did not compile:\n{done.stderr.strip()}")


def run_case(out: Path, steps: int, kernels: str) -> dict:
    report = STEP_TIME["run_case"](out, steps, extra=("--kernels", kernels))
    if report is None:
        raise SystemExit(f"bench/step_time_gpu.py: {out.name} --kernels {kernels} failed twice (the lines above say why)")
    return report


def calibrated_spec(hardware: str, out: Path, quick: bool) -> Path:
    """This machine as one device, its links ``hardware``'s (``ultraplan calibrate --nproc 1``)."""
    done = subprocess.run([*ULTRAPLAN, "calibrate", "--nproc", "1", "--links-from", hardware, "-o", str(out)]
                          + (["--quick"] if quick else []), capture_output=True, text=True)
    print(done.stderr + done.stdout, file=sys.stderr, flush=True)  # its progress: what it timed
    if done.returncode != 0:
        raise SystemExit(f"bench/step_time_gpu.py: the calibration failed (exit code {done.returncode})")
    return out


def datasheet_time(spec: str, batch: int, hardware: str) -> float:
    from ultraplan import api

    return float(api.plan(spec, "1", hardware=hardware, batch=batch).total("step_time").value)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", nargs="+", default=SPECS)
    p.add_argument("--batches", nargs="+", type=int, default=[8, 64], help="global batches (sequences of seq_len)")
    p.add_argument("--hardware", default="h200-8", help="the hardware spec the plans are priced on")
    p.add_argument("--steps", type=int, default=20, help="steps per run (the first 2 are warm-up)")
    p.add_argument("--kernels", nargs="+", default=["triton", "torch"] if torch.cuda.is_available() else ["torch"],
                   help="the fused ops' kernels to run each program with")
    p.add_argument("--calibrate", action="store_true",
                   help="compile with this machine calibrated as one device (links: --hardware's) and price both")
    p.add_argument("--quick", action="store_true", help="--calibrate --quick (seconds; rougher figures)")
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hardware = str(calibrated_spec(a.hardware, Path(tmp) / "this-device.yaml", a.quick)) if a.calibrate \
            else a.hardware
        spec_text = Path(hardware).read_text() if a.calibrate else None
        cases = [(spec, batch, Path(tmp) / f"{spec}-{batch}") for spec in a.specs for batch in a.batches]
        with concurrent.futures.ThreadPoolExecutor(max(1, min(len(cases), os.cpu_count() or 1))) as pool:
            list(pool.map(lambda c: compile_case(c[0], c[1], hardware, c[2]), cases))
        label = f"this {device} calibrated (links: {a.hardware}'s)" if a.calibrate else a.hardware
        print(f"step times on one {device} against the plans under {label} ({a.steps} steps, median after 2)")
        extra = f" {a.hardware} ms |" if a.calibrate else ""
        print(f"| spec | batch | kernels |{extra} predicted ms | measured ms | predicted / measured | tokens/s |")
        print("|---" * (7 + bool(a.calibrate)) + "|")
        for spec, batch, out in cases:
            datasheet = datasheet_time(spec, batch, a.hardware) if a.calibrate else None
            for kernels in a.kernels:
                report = run_case(out, a.steps, kernels)
                predicted, measured = report["step_time_predicted_s"], report["step_time_measured_s"]
                seq = json.loads((out / "plan.json").read_text())["seq"]
                row = {"spec": spec, "batch": batch, "seq": seq, "kernels": kernels, "predicted_s": predicted,
                       "measured_s": measured, "step_times_s": report["step_times_s"]}
                if datasheet is not None:
                    row["datasheet_s"] = datasheet
                rows.append(row)
                before = f" {datasheet * 1e3:.2f} |" if datasheet is not None else ""
                print(f"| {spec} | {batch} | {kernels} |{before} {predicted * 1e3:.2f} | {measured * 1e3:.2f} | "
                      f"{predicted / measured:.2f} | {batch * seq / measured:,.0f} |", flush=True)
                if a.json_out:  # after every row: a run stopped at its time limit keeps what it measured
                    Path(a.json_out).write_text(json.dumps({"device": device, "hardware": a.hardware,
                                                            "calibrated_spec": spec_text, "rows": rows}, indent=1) + "\n")
    if spec_text:
        print(spec_text)
    return rows


if __name__ == "__main__":
    main()
