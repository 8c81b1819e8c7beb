"""The cost model against reality: predicted and measured step times of compiled programs.

    python bench/step_time.py                                   # the table of docs/cost-model.md
    python bench/step_time.py --nproc 2 --specs dense-tiny --strategies dp tp --repeats 1

For each rank count: ``ultraplan calibrate --nproc N`` writes a spec of this machine (into a
temporary directory, or ``--hardware-dir``), then every (spec, strategy) is compiled with it and run
``--repeats`` times, the cases interleaved so that a change of the machine's load touches every case
alike. Each run's measured step time is the median of its steps after the warm-up (``run --json``'s
``step_time_measured_s``, over steps enough for ``--run-seconds`` of them at its planned step time,
at least ``--steps`` and at most MAX_STEPS: a 20 ms program's median moved 19.6 to 25.2 ms between
five 12-step runs on an idle host, 17.7 to 20.3 between five 40-step ones; or ``--long-steps`` for a
program planned at over a second a step); the table gives the median over repeats (three by default:
one run at a slow moment, as moe-tiny ep's 125 ms against 50 ms in session 12, does not move it), the plan's
``step_time_predicted_s``, their ratio, and for each spec and rank count whether the predicted order
of strategies is the measured one wherever two measured times differ by more than 25%. The load
average is printed beside (other work on the machine stretches every figure).

The machine's load moves by minutes, and a calibration describes the minute it ran in. With
``--refit`` (the default) ``op_overhead``, which carries most of a tiny program's modelled step, is
fitted again on the reference program right before each round of runs (``calibrate.refit``:
every other figure kept), each case planned with that round's spec, and the table gives both
predictions: ``once`` (the calibration before the rounds) and ``at run`` (the median over rounds
of the round's own). ``--no-refit`` keeps the one calibration. The plans price each collective call
at its kind's calibrated figure on its group's size (``collective_by_group``); ``bench/step_time_kinds.py``
re-prices a run recorded before they did (session 10's, when a plan priced every call at
``collective_overhead``).

``--no-drift-column`` predicts each round a second time with that round's spec less its
``collective_drift`` (passes/sync_drift.py), ``op_overhead`` fitted again without it: the model as it
was before session 20, on the same runs (the column ``no drift``).

``--baseline DIR`` puts another version of the cost model beside this one on the same runs: DIR is
put first on PYTHONPATH (a directory holding an ``ultraplan`` package of that version), which then
calibrates its own spec right after this one and plans every case; the table gains its prediction
(``before``). The programs run are this version's (a named strategy's program does not depend on
the cost model).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ULTRAPLAN = [sys.executable, "-m", "ultraplan"]
DEFAULT_CASES = {"dense-tiny": ["dp", "fsdp", "tp"], "moe-tiny": ["dp", "fsdp", "ep"],
                 "dense-100m": ["dp", "fsdp", "tp"]}
ORDER_MARGIN = 1.25  # strategies whose measured times differ by more than this must be predicted in order
LONG_STEP_S = 1.0  # a program planned at more seconds a step than this runs --long-steps
MAX_STEPS = 200  # steps of a short program's run at most (its --run-seconds at the planned step time)


DRIFT_LINE = re.compile(r"^  collective_drift: .*\n", re.M)


def with_path(path: str | None) -> dict | None:
    """The environment that imports ultraplan from ``path`` first (None: this checkout's)."""
    return None if path is None else dict(os.environ, PYTHONPATH=path)


def calibrate(nproc: int, out: Path, env: dict | None = None) -> None:
    subprocess.run([*ULTRAPLAN, "calibrate", "--nproc", str(nproc), "-o", str(out)], check=True, env=env,
                   cwd=tempfile.gettempdir() if env else None)


def compile_case(spec: str, strategy: str, nproc: int, hardware: Path, out: Path, env: dict | None = None) -> bool:
    done = subprocess.run([*ULTRAPLAN, "compile", spec, "--mesh", str(nproc), "--strategy", strategy,
                           "--hardware", str(hardware), "-o", str(out)], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir() if env else None)
    if done.returncode != 0:
        print(f"  {spec} {strategy} on {nproc}: not compiled: {done.stderr.strip().splitlines()[-1]}", file=sys.stderr)
    return done.returncode == 0


PREDICT = """
import json, sys
from ultraplan import api
hardware, nproc, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = [api.plan(spec, nproc, hardware=hardware, strategy=strategy).total("step_time").value for spec, strategy in cases]
print(json.dumps(out))
"""


def steps_for(planned: float, args: argparse.Namespace) -> int:
    """Steps of one run of a program planned at ``planned`` seconds a step: ``--long-steps`` past
    LONG_STEP_S (their warm-up is long), else enough for ``--run-seconds`` after the 2 warm-up steps,
    at least ``--steps`` and at most MAX_STEPS."""
    if planned >= LONG_STEP_S:
        return args.long_steps
    return max(args.steps, min(MAX_STEPS, 2 + math.ceil(args.run_seconds / planned)))


def refit_and_predict(base: Path, out: Path, nproc: int, cases: list[dict], drift: bool = True) -> list[float]:
    """``base`` copied to ``out`` with ``op_overhead`` fitted again now (``calibrate.refit``, the
    reference run for ``calibrate.reference_steps``; the median of
    three runs, as one run at a bad moment, 31.8 ms where the next program's step took 15.3, put
    every 2-rank prediction of session 11's first round 1.6 times over; and the matmul rates timed
    again before it, ``peak_flops``), and every case's modelled step time with it (one process plans
    them all). Without ``drift``: ``base`` less its ``collective_drift``, its matmul rates kept (the
    model as it was before passes/sync_drift.py, on the same measurements)."""
    out.write_text(base.read_text() if drift else DRIFT_LINE.sub("", base.read_text()))
    subprocess.run([sys.executable, "-c", f"from pathlib import Path; from ultraplan.calibrate import refit; "
                    f"refit(Path({str(out)!r}), {nproc}, runs=3, rates={drift})"], check=True, stdout=sys.stderr)
    pairs = json.dumps([[c["spec"], c["strategy"]] for c in cases])
    done = subprocess.run([sys.executable, "-c", PREDICT, str(out), str(nproc), pairs], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout)


def run_case(out: Path, steps: int, tries: int = 2, extra: tuple[str, ...] = ()) -> dict | None:
    """``run --json``'s report (``extra``: more ``run`` flags); a failed run is tried again once (gloo can
    abort a rank at exit on a loaded machine, runtime.finish says why), then left out."""
    for _ in range(tries):
        done = subprocess.run([*ULTRAPLAN, "run", str(out), "--steps", str(steps), "--json", *extra],
                              capture_output=True, text=True)
        if done.returncode == 0:
            return json.loads(done.stdout)
        said = done.stderr.strip().splitlines()
        print(f"  {out.name}: the run failed (exit code {done.returncode}): {said[-1] if said else '(no message)'}",
              file=sys.stderr, flush=True)
    return None


def order_check(rows: list[dict]) -> tuple[int, int]:
    """(pairs whose measured times differ by more than ORDER_MARGIN, of those predicted in that order)."""
    pairs = agree = 0
    for a, b in itertools.combinations(rows, 2):
        slow, fast = (a, b) if a["measured"] > b["measured"] else (b, a)
        if slow["measured"] > ORDER_MARGIN * fast["measured"]:
            pairs += 1
            agree += slow["predicted"] > fast["predicted"]
    return pairs, agree


def print_table(table: list[dict], columns: list[tuple[str, str]]) -> None:
    """The markdown table of ``table``'s cases, a (prediction, its ratio to the measured time) pair per
    ``columns`` entry (key, label), then per column the cases within 25% and the order check."""
    print("| spec | ranks | strategy | " + "".join(f"{label} ms | {label} / measured | " for _, label in columns)
          + "measured ms (runs) | load |")
    print("|---" * (5 + 2 * len(columns)) + "|")
    for c in table:
        print(f"| {c['spec']} | {c['nproc']} | {c['strategy']} | "
              + "".join(f"{c[key] * 1e3:.1f} | {c[key] / c['measured']:.2f} | " for key, _ in columns)
              + f"{c['measured'] * 1e3:.1f} ({', '.join(f'{r * 1e3:.0f}' for r in c['runs'])}) | "
              f"{statistics.median(c['load']):.1f} |")
    for key, label in columns:
        within = sum(abs(c[key] / c["measured"] - 1) <= 0.25 for c in table)
        print(f"\n{label}: within 25% in {within} of {len(table)}")
        for (spec, nproc), group in itertools.groupby(table, key=lambda c: (c["spec"], c["nproc"])):
            pairs, agree = order_check([dict(c, predicted=c[key]) for c in group])
            print(f"  order {spec} on {nproc}: {agree} of {pairs} pairs differing by > 25% predicted in the measured order")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--specs", nargs="+", default=list(DEFAULT_CASES))
    parser.add_argument("--strategies", nargs="+", default=None, help="default: three per spec (DEFAULT_CASES)")
    parser.add_argument("--steps", type=int, default=10, help="steps per run at least (the first 2 are warm-up)")
    parser.add_argument("--run-seconds", type=float, default=3.0,
                        help="a short program runs steps for this long at its planned step time (at most MAX_STEPS)")
    parser.add_argument("--long-steps", type=int, default=12,
                        help="steps per run of a program planned at over a second a step (default 12: dense-100m's "
                             "fsdp on 4 ranks takes six steps to settle, 24, 26, 13, 7.9, 8.7, 7.9 s, then 6.5 to 7.9)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (their median: one slow run moves it not)")
    parser.add_argument("--hardware-dir", default=None, help="keep the calibrated specs here")
    parser.add_argument("--json-out", default=None, help="write the cases (runs, prediction, load) here as well")
    parser.add_argument("--baseline", default=None, help="PYTHONPATH of another cost model to predict beside")
    parser.add_argument("--no-drift-column", action="store_true",
                        help="also predict each round without the spec's collective_drift (op_overhead refitted "
                             "without it): the column 'no drift'")
    parser.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True,
                        help="fit op_overhead again before each round of runs (default: yes)")
    args = parser.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    hw_dir = Path(args.hardware_dir or tmp.name)
    hw_dir.mkdir(parents=True, exist_ok=True)
    table = []
    for nproc in args.nproc:
        hardware = hw_dir / f"this-machine-{nproc}.yaml"
        calibrate(nproc, hardware)
        base_hw = hw_dir / f"baseline-{nproc}.yaml"
        if args.baseline:
            calibrate(nproc, base_hw, with_path(args.baseline))
        cases = []
        for spec in args.specs:
            for strategy in args.strategies or DEFAULT_CASES.get(spec, ["dp", "fsdp", "tp"]):
                out = Path(tmp.name) / f"{spec}-{strategy}-{nproc}"
                if compile_case(spec, strategy, nproc, hardware, out):
                    cases.append({"spec": spec, "strategy": strategy, "nproc": nproc, "dir": out, "runs": []})
                    base = out.with_name(out.name + "-baseline")
                    if args.baseline and compile_case(spec, strategy, nproc, base_hw, base, with_path(args.baseline)):
                        totals = dict(json.loads((base / "plan.json").read_text())["totals"])
                        cases[-1]["before"] = totals["step_time"]["value"]
        for case in cases:
            case["once"] = dict(json.loads((case["dir"] / "plan.json").read_text())["totals"])["step_time"]["value"]
            case["steps"] = steps_for(case["once"], args)
        for repeat in range(args.repeats):
            if args.refit and cases:
                fresh = refit_and_predict(hardware, hw_dir / f"this-machine-{nproc}-round{repeat}.yaml", nproc, cases)
                for case, value in zip(cases, fresh):
                    case.setdefault("at_run", []).append(value)
                if args.no_drift_column:
                    round_spec = hw_dir / f"this-machine-{nproc}-round{repeat}.yaml"
                    plain = refit_and_predict(round_spec, round_spec.with_name(round_spec.stem + "-no-drift.yaml"),
                                              nproc, cases, drift=False)
                    for case, value in zip(cases, plain):
                        case.setdefault("no_drift_runs", []).append(value)
            for case in cases:
                report = run_case(case["dir"], case["steps"])
                if report is None:
                    continue
                case["runs"].append(report["step_time_measured_s"])
                case.setdefault("round_predicted", []).append(case["at_run"][-1] if args.refit else case["once"])
                load = os.getloadavg()[0]
                case.setdefault("load", []).append(load)
                print(f"  {case['spec']} {case['strategy']} on {nproc} (repeat {repeat}): measured "
                      f"{case['runs'][-1] * 1e3:.1f} ms, predicted {case['round_predicted'][-1] * 1e3:.1f} ms "
                      f"(once {case['once'] * 1e3:.1f} ms), load {load:.1f}", file=sys.stderr, flush=True)
        cases = [c for c in cases if c["runs"]]
        for case in cases:
            case["measured"] = statistics.median(case["runs"])
            case["predicted"] = statistics.median(case["at_run"]) if args.refit else case["once"]
            if "no_drift_runs" in case:
                case["no_drift"] = statistics.median(case["no_drift_runs"])
        table += cases
        if args.json_out:
            Path(args.json_out).write_text(json.dumps([{k: v for k, v in c.items() if k != "dir"} for c in table],
                                                      indent=1))
    columns = ([("before", "before")] if args.baseline and all("before" in c for c in table) else [])
    columns += [("once", "once")] + ([("predicted", "at run")] if args.refit else [])
    columns += [("no_drift", "no drift")] if table and all("no_drift" in c for c in table) else []
    print_table(table, columns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
