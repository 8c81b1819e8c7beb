"""Mixed precision (``train: {precision: bf16}``, passes/precision.py, docs/precision.md): the plan's
dtypes, memory and communication bytes follow the dtypes the program uses.

Independent references: torch's own dtype of every op on meta tensors (shape_prop asserts it on
every plan built here), the bytes autograd really saves in an eager bf16 step
(``saved_tensors_hooks`` via runtime.count_saved, on compiler.build's model, not the emitted
program), and the float32 plan of the same spec (bytes of bfloat16 values are exactly half).
Multi-rank runs (measured collective bytes equal to the plan, losses tracking float32) are in
tests/dist/test_strategies.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ultraplan.backends import runtime
from ultraplan.backends.program import emit_program
from ultraplan.compiler import seeded
from ultraplan.compiler.build import TrainingGraph, build_model
from ultraplan.passes.stats import spec_stats
from ultraplan.passes.symbols import B

from tests.conftest import MODELS
from ultraplan import api
from ultraplan.cli import main

SAVED = ("memory_activations", "memory_gathered_parameters", "memory_param_copies")


def bf16_spec(directory: Path, name: str) -> Path:
    """The bundled spec ``name`` with ``train.precision: bf16`` added (its train: block exists)."""
    text = (MODELS / f"{name}.yaml").read_text()
    assert "\ntrain:\n" in text
    path = directory / f"{name}.yaml"
    path.write_text(text.replace("\ntrain:\n", "\ntrain:\n  precision: bf16\n"))
    return path


def totals(plan) -> dict[str, float]:
    return {k: c.value for k, c in plan.totals}


def test_precision_field_default_and_bad_value(tmp_path, capsys):
    assert api.load("dense-tiny").train.precision == "fp32"
    assert api.load(bf16_spec(tmp_path, "dense-tiny")).train.precision == "bf16"
    text = (MODELS / "dense-tiny.yaml").read_text().replace("\ntrain:\n", "\ntrain:\n  precision: bf17\n")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    line = text.splitlines().index("  precision: bf17") + 1
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"bad.yaml:{line}:" in err and "train.precision" in err and "bf16" in err, err


def test_node_dtypes_follow_the_precision(tmp_path):
    """Weights as read, activations and the fsdp gathers in bfloat16; the losses in float32; the
    master weights (bytes per device) as in float32. shape_prop has checked each against torch."""
    fp32 = api.plan("moe-tiny", "2", strategy="fsdp")
    bf16 = api.plan(bf16_spec(tmp_path, "moe-tiny"), "2", strategy="fsdp")
    assert fp32.precision.compute == "float32" and bf16.precision.compute == "bfloat16"
    assert (bf16.precision.master, bf16.precision.optimizer_state, bf16.precision.loss) == ("float32",) * 3
    assert {n.dtype for n in fp32.nodes} <= {"float32", "int64"}
    dtypes = {n.name: n.dtype for n in bf16.nodes}
    losses = {n.name for n in bf16.nodes if n.op in ("cross_entropy", "balance_loss")}
    assert len(losses) == 3 and all(dtypes[n] == "float32" for n in losses)
    # the losses, their sum and their boxings (a P loss share) are float32
    assert all(dtypes[n] == "float32" for n in dtypes if "loss" in n)
    floats = [n for n in bf16.nodes if n.dtype != "int64" and "loss" not in n.name]
    assert floats and all(n.dtype == "bfloat16" for n in floats), [n.name for n in floats if n.dtype != "bfloat16"]
    assert [p.bytes_per_device for p in bf16.params] == [p.bytes_per_device for p in fp32.params]


@pytest.mark.parametrize(("spec", "strategy"), [("dense-tiny", "dp"), ("dense-tiny", "fsdp"), ("dense-tiny", "tp"),
                                                ("dense-tiny", "sp"), ("moe-tiny", "ep")])
def test_collective_bytes_follow_the_dtypes(tmp_path, spec, strategy):
    """The same collectives as in float32; those on activations and fsdp's gathers (and their
    backward duals) carry half the bytes; gradient all-reduces after backward (of the float32
    master gradients), integer routing data and the float32 loss's collectives carry the same."""
    fp32 = api.plan(spec, "2", strategy=strategy)
    bf16 = api.plan(bf16_spec(tmp_path, spec), "2", strategy=strategy)
    assert [(c.collective, c.phase, c.node) for c in bf16.collectives] == \
           [(c.collective, c.phase, c.node) for c in fp32.collectives]
    halved = 0
    for a, b in zip(fp32.collectives, bf16.collectives):
        if b.dtype == "bfloat16":
            assert b.payload_bytes.value == a.payload_bytes.value / 2 and a.dtype == "float32", b
            halved += 1
        else:
            assert b.payload_bytes.value == a.payload_bytes.value and b.dtype == a.dtype, b
            assert b.phase in ("gradient_sync", "loss_logging") or b.dtype == "int64" or "cross_entropy" in b.reason, b
    assert halved > 0 or strategy == "dp"
    if strategy == "dp":
        assert bf16.step_collectives() == fp32.step_collectives()  # float32 gradients, all-reduced in float32
    # a --dtype float64 run of the bf16 program hands every float in float64, as the float32 plan's
    assert bf16.step_collectives("float64") == fp32.step_collectives("float64")


def measured_saved(spec_path, dtype: torch.dtype) -> int:
    """Bytes autograd saves in one eager training forward on ``dtype`` copies of the weights."""
    plan = api.plan(spec_path, "1")
    model = TrainingGraph(build_model(api.load(spec_path), seed=0))
    batch = seeded.permutation_walk_batch(0, 0, plan.batch, plan.seq, dict(plan.model)["vocab_size"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: OpenMP's threads only wait on each other (index_add: 0.15 s a call)
    try:
        with runtime.count_saved(model):
            loss = runtime.forward_in(dtype, model, batch[:, :-1], batch[:, 1:])
    finally:
        torch.set_num_threads(threads)
    assert loss.dtype == torch.float32  # the loss computes in float32 in both
    return runtime.SAVED_BYTES


@pytest.mark.parametrize("spec", ["dense-tiny", "moe-tiny"])
def test_memory_follows_the_dtypes_and_matches_autograd(tmp_path, spec):
    """Masters, gradients and AdamW state are float32 as before; what the backward keeps is about
    half (bfloat16 activations and weight copies, float32 log-probabilities) and within 10% of the
    bytes autograd saves in an eager bfloat16 step."""
    path = bf16_spec(tmp_path, spec)
    # unfused, as the eager step runs attention (fused: passes/fuse.py, measured in tests/dist/test_saved_bytes.py)
    fp32, bf16 = totals(api.plan(spec, "1", fuse=False)), totals(api.plan(path, "1", fuse=False))
    for term in ("memory_parameters", "memory_gradients", "memory_optimizer"):
        assert bf16[term] == fp32[term]
    assert "memory_param_copies" not in fp32 and bf16["memory_param_copies"] > 0
    terms = [v for k, v in bf16.items() if k.startswith("memory_") and k != "memory_per_device"]
    assert bf16["memory_per_device"] == pytest.approx(sum(terms))
    predicted = sum(bf16.get(k, 0) for k in SAVED)
    measured = measured_saved(path, torch.bfloat16)
    assert abs(predicted - measured) <= 0.1 * measured, (measured, predicted)
    ratio_measured = measured / measured_saved(MODELS / f"{spec}.yaml", torch.float32)
    ratio_predicted = predicted / sum(fp32.get(k, 0) for k in SAVED)
    assert abs(ratio_predicted - ratio_measured) < 0.05, (ratio_predicted, ratio_measured)
    # activations alone about halve (float32 log-probabilities keep them a little above one half)
    assert 0.5 <= bf16["memory_activations"] / fp32["memory_activations"] < 0.6


def test_stats_weight_bytes_in_the_compute_dtype(tmp_path):
    fp32 = spec_stats(api.load("dense-tiny"))
    bf16 = spec_stats(api.load(bf16_spec(tmp_path, "dense-tiny")))
    assert bf16.params == fp32.params
    for batch in (1, 64):
        assert float(bf16.memory_access_bytes_per_token.subs(B, batch)) == \
               float(fp32.memory_access_bytes_per_token.subs(B, batch)) / 2


def test_program_runs_the_forward_on_bf16_copies(tmp_path):
    text = emit_program(api.plan(bf16_spec(tmp_path, "dense-tiny"), "2", strategy="fsdp"))
    assert "COMPUTE_DTYPE = 'bfloat16'" in text
    assert "runtime.forward_in(compute_dtype, model," in text
    assert "PLANNED_PAYLOAD_PER_STEP = {'all_gather': 115520, 'all_reduce': 4, 'reduce_scatter': 231040}" in text


def test_compute_time_at_the_bf16_peak(tmp_path):
    """A bf16 step is priced at the hardware's bf16 FLOP/s (h200-8: 989e12 against 67e12 in fp32)."""
    fp32 = totals(api.plan("dense-tiny", "8", hardware="h200-8"))
    bf16 = totals(api.plan(bf16_spec(tmp_path, "dense-tiny"), "8", hardware="h200-8"))
    assert bf16["compute_time"] == pytest.approx(fp32["compute_time"] * 6.7e13 / 9.89e14, rel=1e-12)
