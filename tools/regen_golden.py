"""Regenerate the golden emitted programs of the bundled specs and show what changed.

    make golden        (or: .venv/bin/python tools/regen_golden.py [--check])

A refactor must leave tests/golden byte-identical (tests/unit/test_program.py checks it); an
intended change to the emitters reruns this and reviews the diff it prints.
"""

from __future__ import annotations

import difflib
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
# (spec, mesh, strategy per axis): the three data-parallel ones, and one each of tp, ep and fsdp,sp
CASES = [("dense-tiny", "4", "dp"), ("dense-gqa-tied", "4", "dp"), ("dense-deep-groups", "2x2", "dp,dp"),
         ("dense-tiny", "2", "tp"), ("moe-tiny", "2x2", "dp,ep"), ("dense-gqa-tied", "2x2", "fsdp,sp")]
FILES = ("program.py", "plan.json", "plan.dot")


def case_dir(spec: str, mesh: str, strategy: str) -> Path:
    plain = all(s == "dp" for s in strategy.split(","))
    return GOLDEN / (f"{spec}__mesh{mesh}" if plain else f"{spec}__mesh{mesh}__{strategy.replace(',', '-')}")


def emit(spec: str, mesh: str, strategy: str, out: Path) -> None:
    from ultraplan import api

    api.compile(ROOT / "specs" / "models" / f"{spec}.yaml", mesh, out, strategy=strategy)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    changed = 0
    for spec, mesh, strategy in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            emit(spec, mesh, strategy, Path(tmp))
            target = case_dir(spec, mesh, strategy)
            for name in FILES:
                new = (Path(tmp) / name).read_text()
                old_path = target / name
                old = old_path.read_text() if old_path.exists() else ""
                if new == old:
                    continue
                changed += 1
                diff = difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(old_path), "regenerated")
                sys.stdout.writelines(list(diff)[:200])
                if not check:
                    target.mkdir(parents=True, exist_ok=True)
                    old_path.write_text(new)
    print(f"{changed} golden file(s) {'differ' if check else 'rewritten'}")
    return 1 if (check and changed) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
