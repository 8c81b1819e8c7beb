"""Fuzz the spec loader and `ultraplan stats` with mutated bundled specs; print the counts.

    .venv/bin/python tools/fuzz_specs.py --cases 10000 --seed 0 [--cli-every 20]

Every case is loaded (validation); every ``--cli-every``-th case also runs ``ultraplan stats`` in
process (lowering is the slow part). A case ends cleanly (a positioned SpecError, or exit code 2
with one ``error:`` message), succeeds, or is a traceback, which is printed. docs/fuzz.md records a run.
"""

from __future__ import annotations

import argparse
import collections
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.spec_mutations import classify, mutate


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cli-every", type=int, default=20, help="run `stats` on every Nth case (default 20)")
    parser.add_argument("--timeout", type=int, default=60, help="seconds per case")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    counts: collections.Counter[str] = collections.Counter()
    cli_counts: collections.Counter[str] = collections.Counter()
    signal.signal(signal.SIGALRM, _alarm)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.cases):
            name, what, text = mutate(rng)
            cli = args.cli_every > 0 and i % args.cli_every == 0
            signal.alarm(args.timeout)
            try:
                outcome, detail = classify(text, Path(tmp) / "case.yaml", cli=cli)
            except CaseTimeout:
                outcome, detail = "timeout", f"over {args.timeout} s"
            finally:
                signal.alarm(0)
            counts[outcome] += 1
            if cli:
                cli_counts[outcome] += 1
            if outcome in ("traceback", "timeout"):
                print(f"case {i} ({name}: {what}): {outcome}: {detail}", flush=True)
    elapsed = time.perf_counter() - start
    print(f"{args.cases} cases (seed {args.seed}) in {elapsed:.0f} s: {counts['clean']} clean errors, "
          f"{counts['success']} successes, {counts['traceback']} tracebacks, {counts['timeout']} timeouts; "
          f"of them through `ultraplan stats`: {sum(cli_counts.values())} cases, {cli_counts['clean']} clean, "
          f"{cli_counts['success']} successes, {cli_counts['traceback']} tracebacks, {cli_counts['timeout']} timeouts")
    return int(counts["traceback"] + counts["timeout"] > 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
