"""The emitted program: self-contained, readable, golden, and safe against hostile specs."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from ultraplan.compiler.errors import SpecError

from tests.conftest import MODELS
from tools.regen_golden import CASES, case_dir
from ultraplan import api

ALLOWED_IMPORTS = {"argparse", "torch", "ops", "runtime", "seeded", "hashlib", "json", "os", "socket", "collections",
                   "warnings", "sys", "kernels", "train_data", "progress", "numpy", "time", "tqdm",
                   "checkpoint", "re", "shutil",  # kernels.py, train_data.py, progress.py, checkpoint.py beside it
                   "watchdog", "contextlib", "datetime", "itertools", "math", "signal", "threading",
                   "traceback",  # watchdog.py beside it; and what they import (tqdm: used when installed)
                   "fsdp_groups", "grad_buckets",  # beside it, imported by runtime.py
                   "expert_parallel",  # beside it, imported by runtime.expert_parallel_ffn
                   "ops_fused",  # beside it, imported at ops.py's end
                   "collectives", "vocab_parallel"}  # beside it, imported by runtime.py and its neighbours


def imported_modules(source: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:  # a relative import is the in-package
            found.add((node.module or "").split(".")[0])  # form, whose ImportError falls back to the file beside
    return found


def test_program_dir_is_self_contained(tmp_path):
    api.compile(MODELS / "dense-tiny.yaml", "4", tmp_path)
    for name in ("program.py", "checkpoint.py", "ops.py", "runtime.py", "seeded.py", "train_data.py", "progress.py",
                 "watchdog.py", "expert_parallel.py", "fsdp_groups.py", "grad_buckets.py", "ops_fused.py",
                 "collectives.py", "vocab_parallel.py"):
        source = (tmp_path / name).read_text()
        compile(source, name, "exec")
        assert imported_modules(source) <= ALLOWED_IMPORTS, name
    assert (tmp_path / "plan.svg").read_text().startswith("<?xml")


def test_single_process_run_without_ultraplan(tmp_path):
    """`python program.py` alone (no torchrun, ultraplan not importable) trains and prints losses."""
    api.compile(MODELS / "dense-tiny.yaml", "1", tmp_path)
    blocker = tmp_path / "block"
    (blocker / "ultraplan").mkdir(parents=True)
    (blocker / "ultraplan" / "__init__.py").write_text("raise ImportError('ultraplan must not be imported')\n")
    # PYTHONPATH entries precede site-packages, so the blocker shadows the installed ultraplan
    env = {"PYTHONPATH": str(blocker), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "program.py", "--steps", "3"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("loss") == 3


@pytest.mark.parametrize("spec,mesh,strategy", CASES)
def test_golden_programs_are_byte_identical(tmp_path, spec, mesh, strategy):
    api.compile(MODELS / f"{spec}.yaml", mesh, tmp_path, strategy=strategy)
    golden = case_dir(spec, mesh, strategy)
    for name in ("program.py", "plan.json", "plan.dot"):
        assert (tmp_path / name).read_text() == (golden / name).read_text(), \
            f"{name} of {spec} changed; if intended, run `make golden` and review the diff"


HOSTILE = textwrap.dedent('''\
    # a spec whose free text tries to break out of comments and strings
    model:
      name: "evil'); import os; os.system('touch PWNED') #\\n\\"\\"\\"\\r\\u2028print('injected')"
      vocab_size: 32
      hidden_size: 16
      seq_len: 8
      blocks:
        b:
          - attention: {heads: 2}
          - ffn: {hidden: 16}
      layers:
        - {block: b}
    train: {batch_size: 2, steps: 2}
    ''')


def test_hostile_names_cannot_inject_code(tmp_path):
    spec = tmp_path / "evil.yaml"
    spec.write_text(HOSTILE)
    out = tmp_path / "out"
    api.compile(spec, "1", out)
    source = (out / "program.py").read_text()
    tree = ast.parse(source)
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert not any("system" in c for c in calls)
    for line in source.splitlines():
        if "injected" in line:  # only ever inside a comment or the escaped SPEC_NAME literal
            assert line.lstrip().startswith("#") or line.startswith("SPEC_NAME = "), line
    result = subprocess.run([sys.executable, "program.py", "--steps", "2"], cwd=out, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "injected" not in result.stdout.replace("SPEC_NAME", "")
    assert not (out / "PWNED").exists() and not Path("PWNED").exists()
    assert (out / "plan.svg").exists()  # the name is escaped in the DOT source too


def test_hostile_identifier_is_a_clear_error(tmp_path):
    spec = tmp_path / "evil.yaml"
    spec.write_text(HOSTILE.replace("    b:\n", "    \"b; import os\":\n"))
    with pytest.raises(SpecError, match="plain identifier"):
        api.load(spec)


def test_the_test_driver_reloads_every_shipped_module():
    """tests/dist/driver.py forgets each program's neighbour modules between cases (one process runs
    many programs); a module shipped beside programs but missing there would run stale between cases."""
    from ultraplan.backends.program import VERBATIM

    from tests.dist.driver import NEIGHBOURS

    assert sorted(NEIGHBOURS) == sorted(name.removesuffix(".py") for name in VERBATIM)
