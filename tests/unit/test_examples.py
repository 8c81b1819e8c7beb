"""The examples run: the quickstart, and the dense-vs-UltraMemV2 demo at a few steps."""

from __future__ import annotations

import importlib.util
import math

from ultraplan.compiler.validate import load_model_spec
from ultraplan.passes.stats import spec_stats

from tests.conftest import ROOT


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_vs_dense_demo_writes_a_plot(tmp_path):
    demo = load_example("memory_vs_dense")
    active = [spec_stats(load_model_spec(p)).active_params for p in demo.SPECS.values()]
    assert abs(active[0] - active[1]) / active[0] < 0.005  # the same activated size, within 0.5%
    out = tmp_path / "curves.png"
    curves = demo.main(["--steps", "6", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for losses in curves.values():
        assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
        assert losses[-1] < losses[0]


def test_recall_batches_follow_the_dictionary():
    import torch

    demo = load_example("memory_vs_dense")
    dictionary = torch.randint(0, demo.SIDE, (demo.PAIRS,), generator=torch.Generator().manual_seed(0))
    batch = demo.recall_batch(torch.Generator().manual_seed(1), 4, 29, dictionary)
    assert batch.shape == (4, 30)
    a, b, v = batch[:, 0::3], batch[:, 1::3] - demo.SIDE, batch[:, 2::3] - 2 * demo.SIDE
    assert torch.equal(v, dictionary[a * demo.SIDE + b])


def test_quickstart_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it writes out/quickstart relative to the working directory
    load_example("quickstart").main()
    out = capsys.readouterr().out
    assert "h200-8  mesh 8" in out and (tmp_path / "out" / "quickstart" / "program.py").is_file()
