"""The attention, FFN and position options public models need (qk_norm, bias, learned positions),
checked by counting two public checkpoints exactly and by the options' shapes, plans and warnings.

The closed forms below are written from HF transformers' model definitions, tensor by tensor:

- GPT-2 small (modeling_gpt2.py, GPT2Model with the `gpt2` config): wte (V, d), wpe (n_positions, d),
  per block ln_1 and ln_2 (weight and bias), c_attn (d, 3d) + bias 3d, attn c_proj (d, d) + bias d,
  c_fc (d, 4d) + bias 4d, mlp c_proj (4d, d) + bias d; ln_f (weight and bias); the LM head tied to wte.
  Its checkpoint has 124,439,808 parameters (the figure the HF `gpt2` model reports, wpe included).
- OLMoE-1B-7B (modeling_olmoe.py, OlmoeForCausalLM with allenai/OLMoE-1B-7B-0924's config.json):
  embed_tokens (V, d), per layer q/k/v/o_proj (no bias), q_norm (d) and k_norm (head_dim * kv_heads)
  RMSNorm weights, input_layernorm and post_attention_layernorm (d each), the router gate (E, d), E
  experts of gate/up/down (inner x d, twice, and d x inner); the final norm (d); an untied lm_head.
  The paper's (arXiv 2409.02060) "6.9B total, 1.3B active" are these counts rounded.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from ultraplan.compiler import ops
from ultraplan.compiler.build import build_model
from ultraplan.compiler.errors import SpecError
from ultraplan.compiler.validate import load_model_spec
from ultraplan.passes.stats import spec_stats

from tests.conftest import MODELS, ROOT
from ultraplan import api

GPT2_SMALL_HF = 124_439_808  # the `gpt2` checkpoint's parameter count


def gpt2_params(vocab: int = 50257, positions: int = 1024, d: int = 768, layers: int = 12) -> int:
    """GPT2Model's parameters from its shapes (LM head tied: no extra tensor)."""
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return vocab * d + positions * d + layers * block + 2 * d


def olmoe_params(active: bool, vocab: int = 50304, d: int = 2048, layers: int = 16, heads: int = 16,
                 kv_heads: int = 16, experts: int = 64, topk: int = 8, inner: int = 1024) -> int:
    """OlmoeForCausalLM's parameters (``active``: k of E experts) from its shapes."""
    head_dim = d // heads
    attention = d * d + 2 * d * head_dim * kv_heads + d * d + d + head_dim * kv_heads  # q,k,v,o + q/k_norm
    moe = experts * d + (topk if active else experts) * 3 * d * inner
    return vocab * d + layers * (attention + moe + 2 * d) + d + vocab * d


def test_gpt2_small_counts_as_the_hf_checkpoint():
    assert gpt2_params() == GPT2_SMALL_HF
    stats = spec_stats(load_model_spec(MODELS / "gpt2-small.yaml"))
    assert stats.params == stats.active_params == GPT2_SMALL_HF
    # non-embedding (Kaplan et al.): without wte and wpe
    assert stats.params_non_embedding == GPT2_SMALL_HF - 50257 * 768 - 1024 * 768


def test_olmoe_1b_7b_counts_as_the_hf_checkpoint():
    stats = spec_stats(load_model_spec(MODELS / "paper" / "olmoe-1b-7b.yaml"))
    assert stats.params == olmoe_params(active=False) == 6_919_161_856
    assert stats.active_params == olmoe_params(active=True) == 1_282_017_280
    assert round(stats.params / 1e8) == 69 and round(stats.active_params / 1e8) == 13  # "6.9B", "1.3B"


def test_stats_cli_prints_the_gpt2_count():
    out = subprocess.run([sys.executable, "-m", "ultraplan", "stats", "gpt2-small"], capture_output=True,
                         text=True, cwd=ROOT, check=True)
    assert f"{GPT2_SMALL_HF:,} parameters" in out.stdout
    assert "no position information" not in out.stderr


def test_parameter_shapes_of_every_option():
    model = build_model(load_model_spec(MODELS / "gpt2-tiny.yaml"), device="meta")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["pos_embed.weight"] == (16, 32)
    assert shapes["layers.0.attention.bq"] == (32,) and shapes["layers.0.attention.bo"] == (32,)
    assert shapes["layers.1.attention.bk"] == (16,)  # kv_heads 2 x head_dim 8
    assert shapes["layers.1.attention.q_norm"] == shapes["layers.1.attention.k_norm"] == (8,)  # per head
    assert shapes["layers.0.ffn.b_up"] == (64,) and shapes["layers.0.ffn.b_down"] == (32,)
    assert shapes["layers.1.ffn.b_gate"] == (48,)
    olmoe = build_model(load_model_spec(MODELS / "olmoe-tiny.yaml"), device="meta")
    assert tuple(olmoe.layers[0]["attention"].q_norm.shape) == (32,)  # full width
    assert tuple(olmoe.layers[0]["attention"].k_norm.shape) == (32,)


def test_ops_match_their_definitions():
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    heads = x.view(2, 3, 2, 4)
    expected = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(ops.head_rms_norm(x, w, 2, 1e-6), expected.reshape(2, 3, 8))
    table = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(ops.add_positions(x, table), x + table[:3])
    torch.testing.assert_close(ops.bias_add(x, table[0]), x + table[0])


def test_learned_positions_change_the_output_by_position():
    """Identical tokens: every position attends to identical rows, so only the position table (and
    the qk block's rotary, which rotates identical keys alike) can tell position 0 from position 3."""
    model = build_model(load_model_spec(MODELS / "gpt2-tiny.yaml"), seed=0)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        placed = model(tokens)
        model.pos_embed.weight.zero_()
        unplaced = model(tokens)
    assert not torch.allclose(placed[0, 0], placed[0, 3])
    torch.testing.assert_close(unplaced[0, 0], unplaced[0, 3])


def test_no_position_information_is_warned(write_spec):
    path = write_spec("model: {name: nopos, vocab_size: 16, hidden_size: 8, seq_len: 4, blocks: {b: "
                      "[{attention: {heads: 2, rotary: false}}]}, layers: [{block: b}]}\n")
    spec = load_model_spec(path)
    assert "no position information" in spec.position_warning()
    for command in (["stats", str(path)], ["plan", str(path), "--mesh", "1"]):
        out = subprocess.run([sys.executable, "-m", "ultraplan", *command], capture_output=True, text=True,
                             cwd=ROOT, check=True)
        assert "warning: nopos: the model has no position information" in out.stderr
        assert "no position information" not in out.stdout
    assert load_model_spec(MODELS / "gpt2-small.yaml").position_warning() is None
    assert load_model_spec(MODELS / "dense-tiny.yaml").position_warning() is None


def test_bad_values_are_positioned_errors(write_spec):
    path = write_spec("model:\n  vocab_size: 16\n  hidden_size: 8\n  seq_len: 4\n  position_embedding: absolute\n"
                      "  blocks: {b: [{attention: {heads: 2, qk_norm: per_head}}]}\n  layers: [{block: b}]\n")
    with pytest.raises(SpecError) as exc:
        load_model_spec(path)
    text = str(exc.value)
    assert "spec.yaml:5:23: model.position_embedding" in text
    assert "qk_norm" in text


def test_tp_roles_of_the_new_parameters():
    """Column-parallel biases split with their features; row-parallel biases, the position table and
    the QK-norm scales replicated; a full-width QK-norm reads the whole q (gathered), a per-head one
    runs on the split heads."""
    plan = api.plan(MODELS / "gpt2-tiny.yaml", "2", strategy="tp")
    sbp = {p.name: p.sbp for p in plan.params}
    assert sbp["layers.0.attention.bq"] == sbp["layers.0.attention.bv"] == sbp["layers.1.attention.bk"] == "S(0)"
    assert sbp["layers.0.ffn.b_up"] == sbp["layers.1.ffn.b_gate"] == "S(0)"
    assert sbp["layers.0.attention.bo"] == sbp["layers.0.ffn.b_down"] == sbp["pos_embed.weight"] == "B"
    assert sbp["layers.1.attention.q_norm"] == "B"
    nodes = {n.name: n for n in plan.nodes}
    assert nodes["layers_1_attention_q_normed"].sbp_out == "S(2)"  # per head: heads stay split
    out = nodes["layers_0_attention_out"]  # bo (stored B) is added after the reduction: all-reduce, or
    assert out.op == "bias_add" and out.sbp_in[0] != "P"  # the equal-cost reduce-scatter with bo sliced
    olmoe = {n.name: n for n in api.plan(MODELS / "olmoe-tiny.yaml", "2", strategy="tp").nodes}
    assert olmoe["layers_0_attention_q_normed"].sbp_in[0] != "S(2)"  # full width: never split on the normed dim


def test_moe_biases_count_and_split():
    """olmoe-tiny's second MoE has per-expert biases (k of E counted active) and a biased shared expert;
    tp splits the experts' up/gate biases with their width, ep with the experts, b_down stays B."""
    stats = spec_stats(load_model_spec(MODELS / "olmoe-tiny.yaml"))
    d, f, experts, topk, vocab = 32, 16, 8, 2, 64
    attention = 4 * d * d + 2 * d + d  # q, k, v, o; full-width q_norm, k_norm; pre-norm
    moe = experts * d + experts * 3 * f * d + d  # router, experts, pre-norm
    biases, shared = experts * (2 * f + d), 3 * f * d + 2 * f + d
    total = 2 * vocab * d + d + 2 * (attention + moe) + biases + shared
    assert stats.params == total
    active_moe = experts * d + topk * 3 * f * d + d
    assert stats.active_params == 2 * vocab * d + d + 2 * (attention + active_moe) + topk * (2 * f + d) + shared
    for strategy, split in (("tp", "S(1)"), ("ep", "S(0)")):
        sbp = {p.name: p.sbp for p in api.plan(MODELS / "olmoe-tiny.yaml", "2", strategy=strategy).params}
        assert sbp["layers.1.moe.b_up"] == sbp["layers.1.moe.b_gate"] == split
        assert sbp["layers.1.moe.b_down"] == "B"
