"""``stats --by component`` and ``memory_access_bytes_per_token`` against independent references:
torch's FlopCounterMode per sublayer module, and a sampled decode batch of uniformly routed tokens."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from ultraplan.compiler.build import build_model
from ultraplan.passes.stats import spec_stats

from tests.conftest import RUNNABLE_SPECS
from ultraplan import load


@pytest.mark.parametrize("name", RUNNABLE_SPECS)
def test_flops_by_component_equal_the_counter_per_module(name):
    spec = load(name)
    batch, seq = 2, spec.seq_len
    with FlopCounterMode(display=False) as counter:
        build_model(spec, seed=0)(torch.zeros(batch, seq, dtype=torch.int64))
    counts = {k.removeprefix("DecoderModel."): sum(v.values()) for k, v in counter.get_flop_counts().items()}
    expected: dict[str, float] = defaultdict(float)
    for layer in spec.layers:
        for sub in layer.sublayers:
            expected[sub.kind] += counts.get(f"layers.{layer.index}.{sub.name}", 0)
    head = "embedding" if spec.tie_embeddings else "lm_head"  # a tied head is the embedding's product
    expected[head] = counts["Global"] - sum(expected.values())  # the only product outside the layers
    got = spec_stats(spec).as_dict(by_component=True)["by_component"]
    for kind, flops in expected.items():
        assert got.get(kind, {}).get("flops_per_token", 0) * batch * seq == flops, kind


def sampled_distinct_rows(rows: int, per_token: int, batch: int, trials: int = 4000) -> float:
    """Mean number of distinct rows B tokens read, each choosing ``per_token`` distinct rows uniformly."""
    gen = torch.Generator().manual_seed(0)
    picks = torch.rand(trials, batch, rows, generator=gen).argsort(dim=-1)[..., :per_token]
    seen = torch.zeros(trials, rows, dtype=torch.bool)
    seen.scatter_(1, picks.reshape(trials, -1), True)
    return float(seen.sum(dim=1).double().mean())


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_moe_weight_bytes_equal_a_sampled_decode_batch(batch):
    spec = load("moe-tiny")
    moe_layers = [s.config for layer in spec.layers for s in layer.sublayers if s.kind == "moe"]
    cfg = moe_layers[0]
    per_expert = 3 * spec.hidden_size * cfg.hidden  # swiglu: gate, up, down
    stats = spec_stats(spec)
    dense = stats.params - len(moe_layers) * cfg.experts * per_expert
    distinct = sampled_distinct_rows(cfg.experts, cfg.topk, batch)
    sampled = 4 * (dense + len(moe_layers) * distinct * per_expert) / batch
    planned = stats.as_dict(batch)["memory_access_bytes_per_token"]
    assert planned == pytest.approx(sampled, rel=0.01)
    assert (batch == 1) == math.isclose(planned, 4 * stats.active_params)  # one token reads its active set


@pytest.mark.parametrize("batch", [1, 8])
def test_pkm_weight_bytes_equal_a_sampled_decode_batch(batch):
    spec = load("pkm-tiny")
    pkm = [s.config for layer in spec.layers for s in layer.sublayers if s.kind == "pkm"]
    cfg = pkm[0]
    value_dim = cfg.value_dim or spec.hidden_size
    rows = cfg.num_keys**2
    stats = spec_stats(spec)
    dense = stats.params - len(pkm) * rows * value_dim
    distinct = sampled_distinct_rows(rows, cfg.heads * cfg.topk, batch)
    sampled = 4 * (dense + len(pkm) * distinct * value_dim) / batch
    assert stats.as_dict(batch)["memory_access_bytes_per_token"] == pytest.approx(sampled, rel=0.01)
