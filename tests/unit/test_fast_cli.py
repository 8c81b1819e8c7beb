"""`ultraplan --help`, `ultraplan fields` and a spec's mistakes answer without importing torch, and the
torch-free copies of torch facts (the reserved sublayer names, the pass names) match torch."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

PROBE = """
import sys
from ultraplan.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "sympy", "ultraplan.api", "ultraplan.passes.pipeline") if m in sys.modules)
print("HEAVY", heavy, file=sys.stderr)
sys.exit(code)
"""


def run_probe(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=ROOT, timeout=60)


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["fields"], 0), (["fields", "moe"], 0),
                                        (["stats", "BAD"], 2), (["plan", "BAD", "--mesh", "2"], 2)])
def test_light_commands_do_not_import_torch(argv, code, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  vocab_size: 8\n  hidden_siz: 4\n")
    done = run_probe(*[str(bad) if a == "BAD" else a for a in argv])
    assert done.returncode == code, done.stderr
    assert "HEAVY []" in done.stderr
    if code == 2:
        assert "bad.yaml:3:3: model.hidden_siz: unknown field" in done.stderr


def test_a_spec_error_answers_well_under_a_second(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  vocab_size: 8\n  hidden_siz: 4\n")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ultraplan", "stats", str(bad)], capture_output=True, cwd=ROOT)
    assert done.returncode == 2 and time.perf_counter() - start < 1.0


def test_reserved_sublayer_names_cover_torch_module_dict():
    from torch import nn
    from ultraplan.compiler.fields import RESERVED_SUBLAYER_NAMES

    public = {name for name in dir(nn.ModuleDict) if not name.startswith("_")}
    assert public <= RESERVED_SUBLAYER_NAMES, sorted(public - RESERVED_SUBLAYER_NAMES)


def test_cli_stage_names_are_the_pipeline():
    from ultraplan.passes.pipeline import PIPELINE

    from ultraplan.cli_args import STAGES

    assert STAGES == tuple(name for name, _ in PIPELINE)
