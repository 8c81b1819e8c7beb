"""Checkpoints on gloo ranks (backends/checkpoint.py, docs/training.md "Checkpoints").

- Kill and resume: a real 2-rank dense-tiny run (float64) is SIGKILLed, the whole torchrun group,
  once its checkpoint at step EVERY is complete and long before its last step; ``ultraplan run
  --resume`` (runner.run) continues it from the latest complete checkpoint, passing over a folder
  with no COMPLETE and one whose COMPLETE is torn, and every loss it reports, by step number,
  equals bitwise the same step of an uninterrupted run.
- Resharding: a checkpoint of dp on 2 ranks resumes under fsdp on 2, one of dp on 4 under fsdp,tp
  on 2x2 (saved asynchronously there), with every later loss and the final parameters within 1e-10
  of the uninterrupted dp run; a resume that lost AdamW's state would be ~1e-2 off.
- The same plan in float32 resumes bitwise too (the same ops in the same order).
- ``ultraplan export`` of the 2x2 run's final checkpoint gives one safetensors file that the eager
  model loads (strict), equal to the program's final parameters, with the same forward, and
  within 1e-10 of the eager reference trained as long.
One torchrun per rank count runs the cases in one process group (tests/dist/driver.py), the killed
run last in the 2-rank one; the resume after the kill is one more 2-rank launch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ultraplan.compiler import seeded
from ultraplan.compiler.build import build_model
from ultraplan.compiler.validate import load_model_spec
from ultraplan.passes.pipeline import prepare_spec

from tests.conftest import MODELS, ROOT
from tests.dist.test_multirank import torchrun
from ultraplan import api, cli
from ultraplan.reference import relative_differences, train_reference
from ultraplan.runner import run

pytestmark = pytest.mark.slow

SAVED, STEPS = 3, 8  # the resharding cases save after SAVED steps and run to STEPS
KILL_STEPS, EVERY = 24, 3  # the killed run: a checkpoint every EVERY steps of KILL_STEPS
RESHARD_TOLERANCE = 1e-10


def case(name: str, out: Path, steps: int, dtype: str, *args: str) -> dict:
    return {"name": name, "dir": str(out), "steps": steps, "dtype": dtype, "dump": str(out / f"{name}.json"),
            "args": list(args)}


def driver_cmd(nproc: int, root: Path, cases: list[dict]) -> list[str]:
    """torchrun of tests/dist/driver.py running ``cases`` in one process group."""
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps(cases))
    return [str(ROOT / "tests" / "dist" / "driver.py"), str(manifest)]


def dumps_of(cases: list[dict]) -> dict[str, dict]:
    return {c["name"]: json.loads(Path(c["dump"]).read_text()) for c in cases if Path(c["dump"]).exists()}


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun starts each rank in a session of its own)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL a torchrun job: every rank's process group, then torchrun's; wait until the ranks are gone."""
    ranks = children(proc.pid)
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):  # a rank that has just ended
            os.killpg(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text() for pid in ranks):
        assert time.monotonic() < deadline, "a killed rank is still running"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-rank driver job: the resharding and float32 cases, then a run killed once its
    checkpoint at step EVERY is complete (the job's last case, so the others' results are written)."""
    root = tmp_path_factory.mktemp("ckpt2")
    dp, fsdp = root / "dp", root / "fsdp"
    api.compile(MODELS / "dense-tiny.yaml", "2", dp, strategy="dp")
    api.compile(MODELS / "dense-tiny.yaml", "2", fsdp, strategy="fsdp")
    saved64, saved32, killed = root / "saved64", root / "saved32", root / "killed"
    cases = [
        case("full64", dp, STEPS, "float64"),
        case("long64", dp, KILL_STEPS, "float64"),
        case("save64", dp, SAVED, "float64", "--checkpoint-dir", str(saved64)),
        case("fsdp64", fsdp, STEPS, "float64", "--checkpoint-dir", str(saved64), "--resume"),
        case("full32", dp, STEPS, "float32"),
        case("save32", dp, SAVED, "float32", "--checkpoint-dir", str(saved32)),
        case("resume32", dp, STEPS, "float32", "--checkpoint-dir", str(saved32), "--resume"),
        case("killed", dp, KILL_STEPS, "float64", "--checkpoint-dir", str(killed), "--checkpoint-every", str(EVERY)),
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *driver_cmd(2, root, cases)]
    log = (root / "job.log").open("w")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=log)
    deadline = time.monotonic() + 600
    while not (killed / f"step-{EVERY:08d}" / "COMPLETE").exists():
        assert proc.poll() is None, "ended before its checkpoint: " + (root / "job.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    kill_job(proc)
    return root, dp, killed, dumps_of(cases)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt4")
    dp, fsdp_tp = root / "dp", root / "fsdp_tp"
    api.compile(MODELS / "dense-tiny.yaml", "4", dp, strategy="dp")
    api.compile(MODELS / "dense-tiny.yaml", "2x2", fsdp_tp, strategy="fsdp,tp")
    saved = root / "saved"
    cases = [
        case("full", dp, STEPS, "float64"),
        case("save", dp, SAVED, "float64", "--checkpoint-dir", str(saved)),
        case("resumed", fsdp_tp, STEPS, "float64", "--checkpoint-dir", str(saved), "--resume", "--checkpoint-every",
             "2", "--checkpoint-async"),
    ]
    result = torchrun(4, *driver_cmd(4, root, cases))
    assert result.returncode == 0, result.stderr[-4000:]
    return root, fsdp_tp, saved, dumps_of(cases)


def assert_resumed(full: dict, resumed: dict, tolerance: float) -> None:
    assert resumed["first_step"] == SAVED and len(resumed["losses"]) == STEPS - SAVED
    diffs = relative_differences(resumed["losses"], full["losses"][SAVED:STEPS], torch.load(resumed["params"]),
                                 torch.load(full["params"]))
    assert diffs["loss"] <= tolerance and diffs["params"] <= tolerance, diffs


def test_dp_checkpoint_resumes_under_fsdp(two_ranks):
    *_, dumps = two_ranks
    assert_resumed(dumps["full64"], dumps["fsdp64"], RESHARD_TOLERANCE)


def test_dp_checkpoint_resumes_under_fsdp_tp(four_ranks):
    _, _, _, dumps = four_ranks
    assert_resumed(dumps["full"], dumps["resumed"], RESHARD_TOLERANCE)


def test_float32_resume_is_bitwise(two_ranks):
    *_, dumps = two_ranks
    assert dumps["resume32"]["losses"] == dumps["full32"]["losses"][SAVED:]
    assert_resumed(dumps["full32"], dumps["resume32"], 0.0)


def complete_steps(directory: Path) -> list[int]:
    """Steps of the folders whose COMPLETE parses (read here, independently of checkpoint.latest)."""
    steps = []
    for folder in directory.glob("step-*"):
        try:
            steps.append(json.loads((folder / "COMPLETE").read_text())["step"])
        except (OSError, ValueError):
            pass
    return sorted(steps)


def test_killed_run_resumes_bitwise(two_ranks):
    _, dp, killed, dumps = two_ranks
    assert "killed" not in dumps, "the run finished before it was killed"
    complete = complete_steps(killed)
    assert complete and complete[-1] < KILL_STEPS
    # what a crash during a save leaves: a later folder without COMPLETE, and one whose COMPLETE is torn
    shutil.copytree(killed / f"step-{EVERY:08d}", killed / f"step-{KILL_STEPS - 1:08d}")
    (killed / f"step-{KILL_STEPS - 1:08d}" / "COMPLETE").unlink()
    shutil.copytree(killed / f"step-{EVERY:08d}", killed / f"step-{KILL_STEPS - 2:08d}")
    (killed / f"step-{KILL_STEPS - 2:08d}" / "COMPLETE").write_text('{"step": ')
    report = run(dp, nproc=None, steps=KILL_STEPS, seed=None, check=False, quiet=True, dtype="float64",
                 checkpoint_dir=killed, checkpoint_every=EVERY, resume=True)
    assert report["ok"], report
    assert report["loss_steps"] == list(range(complete[-1], KILL_STEPS))
    assert report["losses"] == dumps["long64"]["losses"][complete[-1]:]  # bitwise
    assert complete_steps(killed)[-1] == KILL_STEPS


def test_export_loads_into_the_eager_model(four_ranks, tmp_path):
    _, fsdp_tp, saved, dumps = four_ranks
    out = tmp_path / "model.safetensors"
    assert cli.main(["export", str(saved), "-o", str(out)]) == 0
    safetensors = pytest.importorskip("safetensors.torch")
    exported = safetensors.load_file(str(out))
    final = torch.load(dumps["resumed"]["params"])  # the program's final parameters, gathered
    assert set(final) == set(exported) and all(torch.equal(final[k], exported[k]) for k in final)
    plan = api.read_plan(fsdp_tp)
    spec, _ = prepare_spec(load_model_spec(plan.spec_source, text=plan.spec_text))
    model, other = build_model(spec).double(), build_model(spec).double()
    model.load_state_dict(exported, strict=True)
    other.load_state_dict(final, strict=True)
    batch = seeded.permutation_walk_batch(plan.training.seed, STEPS, plan.batch, plan.seq, dict(plan.model)["vocab_size"])
    with torch.no_grad():
        assert torch.equal(model(batch[:, :-1]), other(batch[:, :-1]))
    _, ref_params = train_reference(plan, STEPS, plan.training.seed, torch.float64)
    worst = max(((exported[k] - p).norm() / p.norm()).item() for k, p in ref_params.items())
    assert worst <= RESHARD_TOLERANCE, worst
