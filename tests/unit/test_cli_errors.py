"""Mistakes with the commands' paths and flags are one-line messages with exit code 2, never tracebacks."""

from __future__ import annotations

import json
import shutil

import pytest
from ultraplan.passes.plan import PLAN_VERSION

from tests.conftest import MODELS
from ultraplan import api
from ultraplan.cli import main


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("prog")
    api.compile(MODELS / "dense-tiny.yaml", "1", out)
    return out


def error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    return capsys.readouterr().err


def test_a_folder_named_like_a_bundled_spec_does_not_shadow_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dense-tiny").mkdir()  # e.g. `ultraplan compile dense-tiny -o dense-tiny`
    assert main(["stats", "dense-tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] > 0


def test_unwritable_outputs(tmp_path, compiled, capsys):
    missing = tmp_path / "no" / "such"
    assert f"error: {missing / 'plan.json'}: No such file or directory" in error(
        capsys, "plan", "dense-tiny", "-o", str(missing / "plan.json"))
    assert "Is a directory" in error(capsys, "plan", "dense-tiny", "-o", str(tmp_path))
    if shutil.which("dot"):
        err = error(capsys, "viz", str(compiled), "-o", str(tmp_path / "plan.xyz"))
        assert f"{tmp_path / 'plan.xyz'}: graphviz dot could not write it" in err


def test_run_needs_a_compiled_directory(tmp_path, compiled, capsys):
    assert "not a compiled program directory" in error(capsys, "run", str(compiled / "plan.json"))
    (tmp_path / "plan.json").write_text((compiled / "plan.json").read_text())
    assert "no program.py" in error(capsys, "run", str(tmp_path))


def test_run_flags_that_would_check_nothing(compiled, capsys):
    assert "--steps must be at least 1" in error(capsys, "run", str(compiled), "--steps", "0", "--check")
    assert "--steps must be at least 1, got -1" in error(capsys, "run", str(compiled), "--steps", "-1")
    assert "not 0" in error(capsys, "run", str(compiled), "--nproc", "0")


def test_a_plan_of_another_version_names_its_file(tmp_path, compiled, capsys):
    plan = json.loads((compiled / "plan.json").read_text())
    (tmp_path / "old.json").write_text(json.dumps(plan | {"version": 1}))
    assert f"{tmp_path / 'old.json'}: plan version 1 is not {PLAN_VERSION}" in error(
        capsys, "viz", str(tmp_path / "old.json"), "-o", str(tmp_path / "x.svg"))


def test_sizes_torch_cannot_hold_are_a_plan_error(capsys):
    assert "torch cannot size this graph at B=8, T=4000000000" in error(capsys, "plan", "dense-tiny", "--seq",
                                                                          "4000000000")


def test_an_inference_plan_is_not_compiled_into_a_training_program(tmp_path):
    with pytest.raises(ValueError, match="writes training programs"):
        api.compile(MODELS / "dense-tiny.yaml", "1", tmp_path / "infer", mode="infer")


def test_an_inference_plan_moves_nothing_for_values_nothing_reads():
    """moe-tiny's balance loss only exists for training: inference keeps neither it nor its all-reduce."""
    infer = api.plan(MODELS / "moe-tiny.yaml", "2", mode="infer")
    train = api.plan(MODELS / "moe-tiny.yaml", "2")
    assert not any(n.op == "balance_loss" for n in infer.nodes) and any(n.op == "balance_loss" for n in train.nodes)
    assert infer.total("comm_wire_bytes").value == 0


def test_a_mesh_larger_than_the_hardware_is_refused(capsys):
    err = error(capsys, "plan", "dense-tiny", "--mesh", "16", "--hardware", "h200-8")
    assert "mesh 16 needs 16 devices, but hardware" in err and "has 8 (1 node(s) x 8)" in err
