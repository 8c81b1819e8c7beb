"""Token files (backends/train_data.py), `ultraplan data prepare`, the metrics log and `ultraplan report`.

The readers are checked against numpy reading the bytes by hand (np.fromfile), the llm.c header
against its published layout (karpathy/llm.c dev/data/data_common.py write_datafile: 256 int32,
magic, version, token count), and the peak FLOP/s a program uses for MFU against the hardware spec.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from ultraplan.backends import progress, train_data
from ultraplan.backends.emit_train import peak_flops

from tests.conftest import HARDWARE
from ultraplan import api, cli
from ultraplan.data import DataFlags, prepare
from ultraplan.report import report

FULL = ((0, 6), (0, 10))  # the whole (6, 10) batch


@pytest.fixture(scope="module")
def h200_plan():
    return api.plan("dense-tiny", "2x2", hardware="h200-8", strategy="dp,tp")


def llmc_file(path, ids, magic, dtype):
    """An llm.c token file written by hand from the published layout."""
    header = struct.pack("<3i", magic, {20240520: 1, 20240801: 7}[magic], len(ids)) + b"\0" * (253 * 4)
    path.write_bytes(header + np.asarray(ids, dtype=dtype).tobytes())
    return path


def naive_windows(ids, starts, seq):
    return np.stack([ids[s:s + seq + 1] for s in starts]).astype(np.int64)


@pytest.mark.parametrize("kind", ["nanogpt-uint16", "raw-uint32", "llmc-uint16", "llmc-uint32"])
def test_reader_equals_numpy(tmp_path, kind):
    rng = np.random.default_rng(0)
    dtype = np.uint32 if kind.endswith("uint32") else np.uint16
    ids = rng.integers(0, 100_000 if dtype == np.uint32 else 65_536, size=777).astype(dtype)
    path = tmp_path / "tokens.bin"
    if kind.startswith("llmc"):
        llmc_file(path, ids, 20240801 if dtype == np.uint32 else 20240520, dtype)
        flag = None
    else:
        ids.tofile(path)  # nanoGPT's prepare.py: arr.tofile(...)
        flag = "uint32" if dtype == np.uint32 else None  # uint16 is the default
    tokens = train_data.TokenFile(path, flag)
    assert tokens.kind == ("llm.c" if kind.startswith("llmc") else "raw") and len(tokens) == len(ids)
    on_disk = np.fromfile(path, dtype=dtype, offset=1024 if kind.startswith("llmc") else 0)
    for step in (0, 1, 9):
        starts = tokens.offsets(5, step, 6, 10)
        assert all(0 <= s <= len(ids) - 11 for s in starts)
        assert np.array_equal(tokens.window(5, step, 6, 10, FULL).numpy(), naive_windows(on_disk, starts, 10))
    assert tokens.max_token() == int(ids.max())


def test_text_is_bytes_and_prepare_round_trips(tmp_path):
    text = "héllo, wörld\n" * 40
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    tokens = train_data.TokenFile(tmp_path / "a.txt")
    assert tokens.kind == "text" and bytes(np.asarray(tokens.tokens)) == text.encode()
    written = prepare([tmp_path / "a.txt", tmp_path / "a.txt"], tmp_path / "t.bin", val_fraction=0.25)
    raw = text.encode() * 2
    head = np.fromfile(tmp_path / "t.bin", dtype="<i4", count=256)
    assert list(head[:3]) == [20240520, 1, written[str(tmp_path / "t.bin")]] and not head[3:].any()
    train = np.fromfile(tmp_path / "t.bin", dtype="<u2", offset=1024)
    val = np.fromfile(tmp_path / "t.val.bin", dtype="<u2", offset=1024)
    assert bytes(np.concatenate([train, val]).astype(np.uint8)) == raw and len(val) == int(len(raw) * 0.25)
    again = train_data.TokenFile(tmp_path / "t.bin")
    assert again.kind == "llm.c" and np.array_equal(np.asarray(again.tokens), train)


def test_batches_depend_on_seed_and_step_only(tmp_path):
    np.arange(5000, dtype=np.uint16).tofile(tmp_path / "x.bin")
    a, b = train_data.TokenFile(tmp_path / "x.bin"), train_data.TokenFile(tmp_path / "x.bin")
    b.window(1, 3, 6, 10, FULL)  # b has read other batches first: no state carries over
    assert a.window(1, 7, 6, 10, FULL).equal(b.window(1, 7, 6, 10, FULL))
    assert not a.window(1, 7, 6, 10, FULL).equal(a.window(1, 8, 6, 10, FULL))
    assert not a.window(1, 7, 6, 10, FULL).equal(a.window(2, 7, 6, 10, FULL))
    assert not a.window(1, 0, 6, 10, FULL).equal(a.window(1, 0, 6, 10, FULL, stream="val"))
    # a part is the whole batch's slice, and only the part is read
    before = a.elements_read
    part = a.window(1, 7, 6, 10, ((2, 4), (5, 10)))
    assert a.elements_read - before == 2 * 6 and part.equal(a.window(1, 7, 6, 10, FULL)[2:4, 5:11])


def test_bad_files_are_one_line_errors(tmp_path):
    ids = np.array([1, 2, 300, 4] * 20, dtype=np.uint16)
    ids.tofile(tmp_path / "big.bin")
    with pytest.raises(train_data.DataError, match="token id 300 does not fit the model's vocab_size 256"):
        train_data.TokenFile(tmp_path / "big.bin").check(256, 8)
    train_data.TokenFile(tmp_path / "big.bin").check(301, 8)
    (tmp_path / "t.txt").write_text("x" * 100)
    with pytest.raises(train_data.DataError, match=r"vocabulary 256.*vocab_size is 128"):
        train_data.TokenFile(tmp_path / "t.txt").check(128, 8)
    with pytest.raises(train_data.DataError, match="fewer than one window"):
        train_data.TokenFile(tmp_path / "t.txt").check(256, 100)
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(train_data.DataError, match="not a whole number of uint16"):
        train_data.TokenFile(tmp_path / "odd.bin")
    llmc_file(tmp_path / "cut.bin", [1, 2, 3], 20240520, np.uint16)
    (tmp_path / "cut.bin").write_bytes((tmp_path / "cut.bin").read_bytes()[:-2])
    with pytest.raises(train_data.DataError, match=r"counts 3 tokens.*truncated"):
        train_data.TokenFile(tmp_path / "cut.bin")
    with pytest.raises(train_data.DataError, match="no such data file"):
        train_data.TokenFile(tmp_path / "missing.bin")


def test_peak_flops_is_the_hardware_specs(h200_plan):
    """The MFU denominator the program is given equals the hardware spec's peak at the plan's precision."""
    h200 = yaml.safe_load((HARDWARE / "h200-8.yaml").read_text())["hardware"]["peak_flops"]
    assert peak_flops(h200_plan) == pytest.approx(h200["fp32"], rel=1e-12)


def test_metrics_lines_and_resume(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    meter = progress.Meter(str(path), 0, 3, 100, 1e9, 1e12, 2, quiet=True)
    for step, loss in enumerate([3.0, 2.5, 2.0]):
        meter.log(step, loss, 0.5, val_loss=1.5 if step == 2 else None)
    meter.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["loss"] for r in lines] == [3.0, 2.5, 2.0] and [r["tokens"] for r in lines] == [100, 200, 300]
    assert lines[0]["tokens_per_s"] == 200.0 and "val_loss" not in lines[1] and lines[2]["val_loss"] == 1.5
    resumed = progress.Meter(str(path), 0, 3, 100, 1e9, 1e12, 2, quiet=True, start_step=2)  # keeps steps 0, 1
    resumed.log(2, 1.0, 0.5)
    resumed.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["loss"] for r in lines] == [3.0, 2.5, 1.0] and lines[-1]["tokens"] == 300


def test_report_draws_a_png(tmp_path, capsys, h200_plan):
    pytest.importorskip("matplotlib")
    plan = h200_plan
    (tmp_path / "plan.json").write_text(plan.to_json())
    records = [{"step": i, "loss": 5.0 - i, "tokens": 256 * (i + 1), "step_s": s, "tokens_per_s": 256 / s}
               for i, s in enumerate([0.9, 0.2, 0.4, 0.3])]
    records[3]["val_loss"] = 2.5
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    facts = report(tmp_path)
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert facts["step_time_measured_s"] == 0.3 and facts["final_val_loss"] == 2.5  # median of steps 1..3
    assert facts["step_time_predicted_s"] == plan.total("step_time").value
    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "metrics.jsonl:1: not a metrics line" in capsys.readouterr().err


def test_run_flags_reach_the_program(tmp_path, capsys):
    """`ultraplan run`'s data flags are ones the program's own parser takes, paths made absolute;
    `ultraplan data prepare` on the command line writes the file."""
    import argparse

    (tmp_path / "a.txt").write_text("abc" * 50)
    assert cli.main(["data", "prepare", str(tmp_path / "a.txt"), "-o", str(tmp_path / "t.bin")]) == 0
    assert "150 byte-level tokens" in capsys.readouterr().out
    flags = DataFlags(data="t.bin", data_dtype="uint32", val_data="v.bin", val_every=4, val_batches=3, metrics="m.jsonl")
    parser = argparse.ArgumentParser()
    train_data.add_arguments(parser)
    progress.add_arguments(parser)
    args = parser.parse_args(flags.program_args())
    assert (args.data_dtype, args.val_every, args.val_batches) == ("uint32", 4, 3)
    assert all(Path(p).is_absolute() for p in (args.data, args.val_data, args.metrics))
    assert DataFlags().program_args() == []


def test_run_refuses_a_bad_data_file_before_launching(tmp_path, capsys, h200_plan):
    from ultraplan.backends.program import write_program

    write_program(h200_plan, tmp_path)  # a whole directory (run checks it first), never launched here
    (tmp_path / "plan.json").write_text(h200_plan.to_json())
    (tmp_path / "t.txt").write_text("text" * 100)
    assert cli.main(["run", str(tmp_path), "--data", str(tmp_path / "t.txt")]) == 2
    assert "vocab_size is 128; compile a spec with vocab_size >= 256" in capsys.readouterr().err
    assert cli.main(["run", str(tmp_path), "--val-data", str(tmp_path / "none.bin")]) == 2
    assert "none.bin: no such data file" in capsys.readouterr().err
