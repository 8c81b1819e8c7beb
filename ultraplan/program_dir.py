"""A compiled program directory: written whole or not at all, and checked before it is run.

``compile`` writes into a temporary sibling directory and renames it into place, so a failure
midway (a full disk, an exception) leaves the previous directory as it was, never a truncated
program.py, and recompiling never mixes files of two specs: what a compile writes (``COMPILED``)
comes only from the new compile. Whatever else the old directory held (a run's checkpoints and
metrics, a user's notes) is moved into the new one after the swap. The swap is two renames (old
aside, new in; Linux's RENAME_EXCHANGE is not in Python's os module): a crash between them leaves
both complete, as ``.DIR.old-*/DIR`` and ``.DIR.new-*``; a crash after them, the old directory's
other entries in ``.DIR.old-*/DIR``.
"""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from ultraplan.backends.program import VERBATIM
from ultraplan.passes.plan import Plan

# every name a compile writes (kernels.py and plan.svg only for some plans, __pycache__ by Python)
COMPILED = frozenset({"program.py", "kernels.py", "plan.json", "plan.dot", "plan.svg", "__pycache__", *VERBATIM})


def _sibling(out: Path, kind: str) -> Path:
    """A new empty directory beside ``out`` (mkdir, unlike mkdtemp, honours the umask: 0755 as a rule)."""
    path = out.parent / f".{out.name}.{kind}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


@contextlib.contextmanager
def compiled_directory(out: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out``; when the block ends without an exception it
    replaces ``out`` (the entries of the old ``out`` outside ``COMPILED`` carried over), else it is removed."""
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; choose another -o")
    if Path.cwd() == out or out in Path.cwd().parents:
        raise ValueError(f"{out}: compile replaces the output directory as a whole, and this one holds the "
                         "current directory; pass -o a directory below it (e.g. -o out)")
    out.parent.mkdir(parents=True, exist_ok=True)
    new = _sibling(out, "new")
    try:
        yield new
        if not out.exists():
            new.rename(out)
            return
        aside = _sibling(out, "old") / out.name
        out.rename(aside)
        try:
            new.rename(out)
        except OSError:
            aside.rename(out)
            raise
        for entry in aside.iterdir():  # a run's outputs, a user's files: not the compile's to drop
            if entry.name not in COMPILED:
                entry.rename(out / entry.name)
        shutil.rmtree(aside.parent)
    finally:
        shutil.rmtree(new, ignore_errors=True)  # still there only when the block failed


def _constant(source: str, name: str):
    """The literal value of ``NAME = ...`` in program.py (None when absent)."""
    for line in source.splitlines():
        if line.startswith(f"{name} = "):
            with contextlib.suppress(ValueError, SyntaxError):
                return ast.literal_eval(line.split(" = ", 1)[1].split("  #")[0])
    return None


def check_program_dir(out_dir: Path, plan: Plan) -> None:
    """ValueError (one line, with the fix) unless ``out_dir`` holds program.py and every neighbour file it
    imports, compiled from the same plan as its plan.json."""
    missing = [name for name in ("program.py", *VERBATIM) if not (out_dir / name).is_file()]
    if missing:
        raise ValueError(f"{out_dir}: not a compiled program directory (no {', '.join(missing)}); make one with "
                         "`ultraplan compile SPEC --mesh N -o DIR` and pass DIR")
    source = (out_dir / "program.py").read_text(encoding="utf-8", errors="replace")
    found = {"SPEC_NAME": _constant(source, "SPEC_NAME"), "MESH_SHAPE": _constant(source, "MESH_SHAPE")}
    expected = {"SPEC_NAME": plan.spec_name, "MESH_SHAPE": tuple(plan.mesh)}
    for name, value in found.items():
        if value != expected[name]:
            raise ValueError(f"{out_dir}: program.py has {name} = {value!r} but plan.json says {expected[name]!r}: "
                             "the directory mixes two compiles; recompile it")
