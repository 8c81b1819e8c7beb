"""compile writes its directory whole or not at all, never mixing two compiles; run checks it before launching."""

from __future__ import annotations

import os
import shutil

import pytest
from ultraplan.backends.program import write_program

from tests.conftest import MODELS
from ultraplan import api
from ultraplan.program_dir import check_program_dir, compiled_directory


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled") / "prog"
    api.compile(MODELS / "dense-tiny.yaml", "1", out, fuse=False)  # unfused: a plan without kernels.py
    return out


def test_recompiling_replaces_the_compiles_files_and_keeps_the_rest(tmp_path, compiled):
    out = tmp_path / "prog"
    shutil.copytree(compiled, out)
    (out / "kernels.py").write_text("KERNELS = {}  # of an earlier, fused compile\n")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step-3").write_text("a run's output")
    (out / "notes.txt").write_text("the user's")
    (out / "program.py").write_text("# another spec's program")
    plan = api.read_plan(compiled)
    with compiled_directory(out) as new:  # what api.compile does, without planning again
        write_program(plan, new)
        api.write_plan_files(plan, new)
    assert not (out / "kernels.py").exists()  # this plan has no fused kernels: the old file must not stay
    assert (out / "checkpoints" / "step-3").read_text() == "a run's output"
    assert (out / "notes.txt").read_text() == "the user's"
    assert (out / "program.py").read_text() == (compiled / "program.py").read_text()
    check_program_dir(out, plan)
    assert [p.name for p in tmp_path.iterdir()] == ["prog"]  # no temporary sibling left
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_compile_that_fails_midway_leaves_the_old_directory_whole(tmp_path, compiled):
    out = tmp_path / "prog"
    shutil.copytree(compiled, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OSError, match="No space left"), compiled_directory(out) as new:
        (new / "program.py").write_text("# truncat")
        raise OSError(28, "No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["prog"]


def test_run_refuses_an_incomplete_or_mixed_directory(tmp_path, compiled, monkeypatch):
    out = tmp_path / "prog"
    shutil.copytree(compiled, out)
    plan = api.read_plan(out)
    (out / "watchdog.py").unlink()
    with pytest.raises(ValueError, match=r"not a compiled program directory \(no watchdog.py\)"):
        check_program_dir(out, plan)
    shutil.copy(compiled / "watchdog.py", out)
    source = (out / "program.py").read_text()
    (out / "program.py").write_text(source.replace("MESH_SHAPE = (1,)", "MESH_SHAPE = (2,)"))
    with pytest.raises(ValueError, match=r"program.py has MESH_SHAPE = \(2,\) but plan.json says \(1,\): the "
                                         "directory mixes two compiles"):
        check_program_dir(out, plan)
    monkeypatch.chdir(out)
    with pytest.raises(ValueError, match="holds the current directory"), compiled_directory(out):
        pass
