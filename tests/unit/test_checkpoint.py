"""Checkpoint pieces that need no process group: which folder ``--resume`` picks, the placements
of each SBP, the safetensors writer of ``export`` (read back by the safetensors package), and the
one-line errors of the flags. The multi-rank behaviour is tests/dist/test_checkpoint.py's."""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from ultraplan.backends import checkpoint

from ultraplan import cli
from ultraplan.export import write_safetensors
from ultraplan.runner import checkpoint_flags


def folder(root, step, marker):
    path = root / f"step-{step:08d}"
    path.mkdir()
    (path / ".metadata").write_bytes(b"dcp")
    if marker is not None:
        (path / checkpoint.MARKER).write_text(marker)
    return path


def test_resume_picks_the_latest_complete_checkpoint(tmp_path):
    assert checkpoint.latest(str(tmp_path / "absent")) is None
    folder(tmp_path, 2, json.dumps({"step": 2}))
    best = folder(tmp_path, 4, json.dumps({"step": 4, "seed": 0}))
    folder(tmp_path, 6, None)  # killed during its save: no COMPLETE
    folder(tmp_path, 8, '{"step": ')  # a torn COMPLETE (a write without temp + rename)
    folder(tmp_path, 10, json.dumps({"step": 9}))  # COMPLETE of another step: copied by hand
    (tmp_path / "step-12").mkdir()  # not a checkpoint folder name
    path, record = checkpoint.latest(str(tmp_path))
    assert path == str(best) and record == {"step": 4, "seed": 0}


def test_marker_write_is_atomic(tmp_path):
    target = tmp_path / checkpoint.MARKER
    checkpoint.write_atomically(str(target), "{}")
    assert target.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == [checkpoint.MARKER]


def test_placements_follow_the_sbp():
    assert checkpoint.placements(("S(1)", "B")) == [Shard(1), Replicate()]
    with pytest.raises(ValueError, match="cannot be placed 'P'"):
        checkpoint.placements(("P",))
    # a (6, 4) shard split on dim 0 by both axes of a 2x3 mesh and dim 1 by none
    assert checkpoint.full_shape(torch.empty(6, 4), ("S(0)", "S(0)"), (2, 3)) == (36, 4)
    assert checkpoint.full_shape(torch.empty(6, 4), ("B", "S(1)"), (2, 3)) == (6, 12)
    # torch.chunk's uneven shares (225 rows: 113 and 112 on 2) are sized by the parameter's logical shape
    uneven = torch.empty(112, 4)
    uneven.full_shape = (225, 4)
    assert checkpoint.full_shape(uneven, ("S(0)",), (2,)) == (225, 4)


def test_safetensors_writer_is_read_by_the_package(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    gen = torch.Generator().manual_seed(0)
    tensors = {"embed.weight": torch.randn(5, 3, generator=gen, dtype=torch.float64),
               "layers.0.w": torch.randn(2, 7, generator=gen).to(torch.bfloat16),
               "layers.0.shuffle": torch.randperm(9, generator=gen), "flag": torch.tensor([True, False, True]),
               "scalar": torch.tensor(2.5, dtype=torch.float32), "half": torch.randn(3, generator=gen).half()}
    path = tmp_path / "model.safetensors"
    write_safetensors(path, tensors, {"step": "7"})
    loaded = safetensors.load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    assert size % 8 == 0 and json.loads(raw[8:8 + size])["__metadata__"] == {"step": "7"}


def test_flag_mistakes_are_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="need --checkpoint-dir"):
        checkpoint_flags(None, None, True)
    with pytest.raises(ValueError, match="at least 0"):
        checkpoint_flags(tmp_path, -1, False)
    assert checkpoint_flags(tmp_path, 5, True) == ("--checkpoint-dir", str(tmp_path.resolve()),
                                                   "--checkpoint-every", "5", "--resume")
    assert checkpoint_flags(tmp_path, None, False, True) == ("--checkpoint-dir", str(tmp_path.resolve()),
                                                             "--checkpoint-async")
    with pytest.raises(ValueError, match="need --checkpoint-dir"):
        checkpoint_flags(None, None, False, True)
    assert cli.main(["export", str(tmp_path), "-o", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no complete checkpoint" in err


def test_resume_refuses_other_batches(tmp_path, monkeypatch):
    """A checkpoint continues only on the batches it was trained on: same seed, same token file."""
    monkeypatch.chdir(tmp_path)
    record = {"step": 4, "seed": 3, "data": "docs.bin"}
    checkpoint.check_same_batches("ck", record, 3, str(tmp_path / "docs.bin"))  # one file, two spellings
    with pytest.raises(SystemExit, match=r"--seed 3, not 4.*pass --seed 3"):
        checkpoint.check_same_batches("ck", record, 4, "docs.bin")
    with pytest.raises(SystemExit, match=r"reading docs\.bin, not other\.bin.*pass --data docs\.bin"):
        checkpoint.check_same_batches("ck", record, 3, "other.bin")
    with pytest.raises(SystemExit, match=r"reading docs\.bin, not random batches"):
        checkpoint.check_same_batches("ck", record, 3, None)
    with pytest.raises(SystemExit, match="drop --data"):
        checkpoint.check_same_batches("ck", {"seed": 3, "data": None}, 3, "docs.bin")
