"""``ultraplan calibrate``: measure this machine and write a hardware spec the cost model reads.

A torchrun job of ``nproc`` ranks (``ultraplan/calibrate_worker.py``) times matrix products, a
memory copy, the per-op overhead of a forward and backward through autograd, and every collective
kind at several sizes on each group size a mesh axis of that world can have. Here the collectives'
times are fitted, by least squares, to the cost model's own formula for them (``passes/sbp.box``,
the ring model the plan prices each collective with):

    seconds = messages(kind, n) * latency + wire_bytes(kind, n, payload) / bandwidth

one (latency, bandwidth) per group size (reported) and one over every row (the spec's link). Each
kind is also timed in place at 1 and 64 KiB, between chains of tiny ops with no barrier, as a
program calls it; what it takes beyond the link's formula is ``collective_by_group``, per call and
group size (the median over sizes; on a CPU host with more ranks than cores, mostly the wait for
the peers to be scheduled, which grows with the peers), ``collective_by_kind`` the median over group
sizes too, and ``collective_overhead`` the median of the kinds. The kinds also move bytes at their
own speeds (gloo's all_gather and reduce_scatter several times slower than its all_reduce): each
kind's bandwidth term is scaled by least squares on its rows, ``collective_wire_factor``. All
ranks of one host share its links, so ``intra_node`` holds the joint fit and ``inter_node`` the same
figures: nothing crosses a node here, and a plan for this machine never prices an axis across nodes.

On a CPU host of C usable cores (``host_cores``, the affinity mask) with N > C ranks, the rates are
timed by C ranks at once (a core each) and the cost model shares them out: each rank runs at
1 / ``oversub`` = C / N of them (passes/host_cost.py). Timing all N at once instead gives each
rank's median over windows the scheduler happened to give it alone (a 4-rank calibration on 2
cores measured a higher FLOP/s per rank than a 2-rank one). The collectives are timed with all N
ranks running, so their figures hold for N ranks: calibrate once per rank count you run with
(the spec describes this machine as ``nproc`` devices, ``devices_per_node: nproc``).

One rank (``--nproc 1``: a machine with one GPU, where NCCL cannot put two ranks on one device)
times everything but the collectives; the spec keeps the links of the spec named by
``--links-from`` (a datasheet spec, such as h200-8), says so, and serves plans of one device (a
plan of more prices its collectives at those links, unmeasured).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import sympy

from ultraplan.calibrate_fit import peak_flops, summarise
from ultraplan.calibrate_spec import REFERENCE, render_spec
from ultraplan.passes.plan import Plan

# the reference program (REFERENCE, calibrate_spec.py): the runs a (full) calibration fits op_overhead on (the median's)
REFERENCE_RUNS = 3
# the reference program's steps per run (the first 2 warm-up): its 20 ms steps on 4 ranks, five runs of
# each length on an idle 2-core host, medians 19.6 to 25.2 ms in 12-step runs, 17.7 to 20.3 in 40-step ones
REFERENCE_STEPS = 40
# and at least enough for REFERENCE_SECONDS at its planned step, at most REFERENCE_MAX_STEPS: as long
# as bench/step_time.py runs the programs it predicts (session 20: 40-step reference runs measured
# 21 to 28 ms where the same program's 200-step runs measured 20.0, and its prediction came out 1.28)
REFERENCE_SECONDS = 3.0
REFERENCE_MAX_STEPS = 200


def reference_steps(planned: float) -> int:
    """Steps of a reference run of a program planned at ``planned`` seconds a step (above)."""
    return max(REFERENCE_STEPS, min(REFERENCE_MAX_STEPS, 2 + math.ceil(REFERENCE_SECONDS / planned)))


def measure(nproc: int, quick: bool, only_matmul: bool = False) -> dict:
    """Run the worker on ``nproc`` ranks with torchrun; its progress lines pass through to stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "measured.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "ultraplan.calibrate_worker", "--out", str(out)] + (["--quick"] if quick else []) + (
               ["--only-matmul"] if only_matmul else [])
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))  # as runner.launch
        code = subprocess.run(cmd, env=env, check=False, stdout=sys.stderr).returncode
        if code != 0 or not out.is_file():
            raise RuntimeError(f"the calibration job failed (exit code {code}): {' '.join(cmd)}")
        return json.loads(out.read_text())


def fit_op_overhead(spec: Path, nproc: int, steps: int | None, floor: float | None = None) -> dict:
    """The per-plan-op overhead that makes the reference program's modelled step time its measured
    one: the program is compiled with ``spec`` (every other coefficient measured already), run for
    ``steps`` steps (None: ``reference_steps`` of its planned step), and its plan's ``step_time``, a
    rising function of ``op_overhead`` (linear in it, host_cost.py, but for the sync drift's square
    roots of the busy time, passes/sync_drift.py), is solved for the measured step by bisection.

    A plan op runs several torch ops (an attention a dozen, a linear one or two) and each pays the
    dispatcher and autograd; the microbenchmark's one tiny op is the floor it is not let below."""
    from ultraplan import api
    from ultraplan.passes.context import Mesh
    from ultraplan.passes.host_cost import OP_OVERHEAD, OVERSUB, host_values
    from ultraplan.passes.pipeline import make_context
    from ultraplan.runner import run

    with tempfile.TemporaryDirectory() as tmp:
        plan = api.compile(REFERENCE[0], str(nproc), tmp, hardware=str(spec), strategy=REFERENCE[1])
        steps = reference_steps(plan.total("step_time").value) if steps is None else steps
        print(f"calibrate: the reference program ({REFERENCE[0]}, {REFERENCE[1]} on {nproc} ranks), {steps} steps",
              file=sys.stderr, flush=True)
        report = run(Path(tmp), nproc=nproc, steps=steps, seed=None, check=False, quiet=True, timed=True)
    if not report["ok"]:
        raise RuntimeError(f"the reference program failed (exit code {report['exit_code']})")
    hardware = api.load_hardware(spec)
    floor = hardware.op_overhead if floor is None else floor  # the microbenchmark's, or an earlier fit (refit)
    step = step_of_op_overhead(plan, make_context(api.load(REFERENCE[0]), hardware, Mesh((nproc,)), batch=plan.batch,
                                                  seq=plan.seq, strategies=(REFERENCE[1],)).values())
    overhead = sympy.sympify(plan.total("overhead_time").expr).expand()
    launches = float(overhead.coeff(sympy.Symbol(str(OP_OVERHEAD))).subs(
        sympy.Symbol(str(OVERSUB)), host_values(hardware, nproc)[OVERSUB]))  # op launches, oversub counted
    measured = report["step_time_measured_s"]
    rest = step(0.0)
    fitted = max(floor, solve_rising(step, measured))
    print(f"calibrate: reference step {measured * 1e3:.1f} ms measured, {rest * 1e3:.1f} ms modelled without op "
          f"overhead, {launches:.0f} op launches (oversub included): {fitted * 1e6:.1f} us per plan op",
          file=sys.stderr, flush=True)
    return {"op_overhead": fitted, "op_overhead_floor": floor, "reference_measured": measured,
            "reference_rest": rest, "reference_launches": launches}


def step_of_op_overhead(plan: Plan, values: dict) -> Callable[[float], float]:
    """The plan's modelled ``step_time`` as a function of ``op_overhead``, every other symbol at
    ``values`` (the plan's context's)."""
    expr = sympy.sympify(plan.total("step_time").expr)
    by_name = {str(symbol): value for symbol, value in values.items()}
    op = sympy.Symbol("op_overhead")
    fixed = expr.xreplace({s: by_name[str(s)] for s in expr.free_symbols if str(s) != "op_overhead"})
    return sympy.lambdify(op, fixed, "math")


def solve_rising(f: Callable[[float], float], target: float) -> float:
    """The x >= 0 where the rising ``f`` reaches ``target`` (0 if it starts above), by bisection."""
    if f(0.0) >= target:
        return 0.0
    hi = 1e-6
    while f(hi) < target:
        hi *= 2
    lo = 0.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


def median_fit(spec: Path, nproc: int, steps: int | None, runs: int, floor: float | None = None) -> dict:
    """``fit_op_overhead`` on ``runs`` reference runs one after the other, the one with the median
    figure: a single run at a slow minute set a whole calibration's level (session 12's 4-rank one
    fitted 575 us per op on a 102 ms reference step, where refits minutes later ran it at 38 ms and
    fitted 140 us; docs/cost-model.md)."""
    fits = [fit_op_overhead(spec, nproc, steps, floor=floor) for _ in range(runs)]
    return sorted(fits, key=lambda f: f["op_overhead"])[(len(fits) - 1) // 2]


FLOOR = re.compile(r"floor ([0-9.]+) us")
OP_OVERHEAD_LINE = re.compile(r"^  op_overhead: .*$", re.M)
PEAK_LINE = re.compile(r"^  peak_flops: .*$", re.M)
REFIT_NOTE = re.compile(r"^# op_overhead refitted .*\n", re.M)


def refit(spec: Path, nproc: int, *, steps: int | None = None, runs: int = 1, rates: bool = False) -> dict:
    """Fit ``op_overhead`` again, now, on the reference program, every other figure of ``spec`` kept,
    and rewrite that one line (and say so in the spec's comment). On a shared host the load moves by
    minutes, and ``op_overhead`` carries most of a tiny program's modelled step: fitted at the moment
    programs run, it describes the machine they run on; the microbenchmarks (links, the per-call
    figures) move less and cost minutes. ``runs`` reference runs: the median of their medians. With
    ``rates`` the matmul rates are timed again first (seconds; a 100M program's step is mostly its
    matmuls, and one core's FLOP/s moved 1.5 times between two calibrations minutes apart here) and
    ``peak_flops`` rewritten, so the fit sees them. The floor is the first calibration's (its
    comment), else 0."""
    if rates:
        peak = peak_flops(measure(nproc, quick=False, only_matmul=True)["matmul"])
        text = PEAK_LINE.sub("  peak_flops: {" + ", ".join(f"{k}: {v:.4g}" for k, v in peak.items()) + "}",
                             spec.read_text())
        spec.write_text(text)
    text = spec.read_text()
    found = FLOOR.search(text)
    floor = float(found.group(1)) * 1e-6 if found else 0.0
    fitted = median_fit(spec, nproc, steps, runs, floor)
    stamp = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    note = (f"# op_overhead refitted {stamp} (load average {load:.2f}): the reference program "
            f"{fitted['reference_measured'] * 1e3:.1f} ms measured (median of {runs} run(s))"
            + ("; peak_flops timed again before it" if rates else "") + "\n")
    text = REFIT_NOTE.sub("", text).replace("hardware:\n", note + "hardware:\n", 1)
    text = OP_OVERHEAD_LINE.sub(f"  op_overhead: {fitted['op_overhead']:.4g}", text)
    spec.write_text(text)
    return fitted


def calibrate(output: Path, *, nproc: int, quick: bool = False, name: str | None = None,
              links_from: str | None = None) -> dict:
    """Measure, fit and write the spec at ``output``; return the figures (and the raw measurements).
    One rank times no collective: its links are ``links_from``'s (a hardware spec's path or bundled name)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    if nproc == 1 and links_from is None:
        raise ValueError("--nproc 1 times no collective (they need two ranks): name the hardware spec whose links "
                         "to keep with --links-from (e.g. h200-8 on one H200), or calibrate with --nproc 2 or more")
    if nproc > 1 and links_from is not None:
        raise ValueError(f"--links-from is for --nproc 1; {nproc} ranks measure their own links")
    kept = None
    if links_from is not None:
        from ultraplan.api import load_hardware

        kept = load_hardware(links_from)
    name = name or output.stem
    raw = measure(nproc, quick)
    figures = summarise(raw, kept)
    command = f"ultraplan calibrate -o {output} --nproc {nproc}" + (" --quick" if quick else "") + (
        f" --links-from {links_from}" if links_from else "")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_spec(name, nproc, figures, raw, command))  # op_overhead: the microbenchmark's
    figures |= median_fit(output, nproc, 5, 1) if quick else median_fit(output, nproc, None, REFERENCE_RUNS)
    output.write_text(render_spec(name, nproc, figures, raw, command))
    return figures | {"raw": raw}
