"""``stats --by component`` and ``memory_access_bytes_per_token`` against independent references:
torch's FlopCounterMode per sublayer module, and a sampled decode batch of uniformly routed tokens
(and uniformly drawn token ids: a decode step gathers the embedding rows of its tokens)."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import sympy
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


def embedding_bytes(spec, batch: int) -> float:
    """A decode step gathers one embedding row per token (distinct rows of a uniform draw); a tied
    embedding is also the LM head's matrix, read whole."""
    if spec.tie_embeddings:
        return 4 * spec.vocab_size * spec.hidden_size
    return 4 * spec.hidden_size * sampled_distinct_rows(spec.vocab_size, 1, batch)


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_moe_weight_bytes_equal_a_sampled_decode_batch(batch):
    spec = load("moe-tiny")
    moe_layers = [s.config for layer in spec.layers for s in layer.sublayers if s.kind == "moe"]
    cfg = moe_layers[0]
    per_expert = 3 * spec.hidden_size * cfg.hidden  # swiglu: gate, up, down
    stats = spec_stats(spec)
    table = spec.vocab_size * spec.hidden_size
    dense = stats.params - len(moe_layers) * cfg.experts * per_expert - table
    distinct = sampled_distinct_rows(cfg.experts, cfg.topk, batch)
    sampled = (4 * (dense + len(moe_layers) * distinct * per_expert) + embedding_bytes(spec, batch)) / batch
    planned = stats.as_dict(batch)["memory_access_bytes_per_token"]
    assert planned == pytest.approx(sampled, rel=0.01)
    gathered = 0 if spec.tie_embeddings else table - spec.hidden_size  # one token reads one embedding row
    assert (batch == 1) == math.isclose(planned, 4 * (stats.active_params - gathered))  # its active set


@pytest.mark.parametrize("batch", [1, 8])
def test_pkm_weight_bytes_equal_a_sampled_decode_batch(batch):
    spec = load("pkm-tiny")
    pkm = [s.config for layer in spec.layers for s in layer.sublayers if s.kind == "pkm"]
    cfg = pkm[0]
    value_dim = cfg.value_dim or spec.hidden_size
    rows = cfg.num_keys**2
    stats = spec_stats(spec)
    dense = stats.params - len(pkm) * rows * value_dim - spec.vocab_size * spec.hidden_size
    distinct = sampled_distinct_rows(rows, cfg.heads * cfg.topk, batch)
    sampled = (4 * (dense + len(pkm) * distinct * value_dim) + embedding_bytes(spec, batch)) / batch
    assert stats.as_dict(batch)["memory_access_bytes_per_token"] == pytest.approx(sampled, rel=0.01)


@pytest.mark.parametrize("name", ["dense-tiny", "dense-gqa-tied"])
def test_decode_reads_embedding_rows_not_the_table(name):
    """Untied: one row per token at B = 1; tied: the LM head reads the whole matrix anyway."""
    spec = load(name)
    stats = spec_stats(spec)
    table = spec.vocab_size * spec.hidden_size
    expected = stats.params - (0 if spec.tie_embeddings else table - spec.hidden_size)
    assert stats.as_dict(1)["memory_access_bytes_per_token"] == 4 * expected


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def test_repeated_blocks_are_lowered_once_with_the_same_counts():
    """stats lowers one layer per distinct block and weighs it: the same numbers as the whole graph."""
    from ultraplan.passes.annotate_cost import annotate_cost
    from ultraplan.passes.pipeline import lower_spec
    from ultraplan.passes.stats import distinct_layers, model_stats

    for name in ("dense-deep-groups", "moe-tiny", "pkm-tiny", "peer-tiny"):
        spec = load(name)
        gm = lower_spec(spec, mode="infer")
        annotate_cost(gm, None)
        whole = model_stats(gm, spec.seq_len).as_dict(4, by_component=True)
        fast = spec_stats(spec).as_dict(4, by_component=True)
        for key in [k for k in whole if k.endswith("_expr")]:
            assert sympy.simplify(sympy.sympify(fast.pop(key)) - sympy.sympify(whole.pop(key))) == 0, (name, key)
        assert flat(fast).keys() == flat(whole).keys(), name
        for key, value in flat(whole).items():
            assert flat(fast)[key] == (value if value is None else pytest.approx(value, rel=1e-12)), (name, key)
    assert distinct_layers(load("dense-deep-groups")) is not None
