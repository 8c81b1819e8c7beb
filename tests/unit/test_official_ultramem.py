"""ultraplan's UltraMem and UltraMemV2 layers, built from specs, against a plain-torch
re-implementation of the official code's forward (tests/unit/official_ultramem.py) with the weights
copied across: outputs and every gradient in float64; and ``init: code`` against the official
``reset_parameters`` (Ultra-Sparse-Memory-Network olmo/ultramem_layer_v2.py:200-253,
olmo/ultramem_layer.py:111-127), tensor by tensor."""

from __future__ import annotations

import math

import pytest
import torch
from ultraplan.compiler.build import build_model

from tests.conftest import MODELS
from tests.unit import official_ultramem as official
from ultraplan import load

F64 = dict(rtol=1e-10, atol=1e-12)


def official_weights(mem, dead_query_rows: int = 0) -> official.OfficialWeights:
    """Our tensors in the official layout, as fresh leaves. V2's official query projection (with
    mem_q_for_each_tucker_rank, rank 2) is 4 D_k wide; head 0 reads its first 2 D_k rows only
    (ultramem_layer_v2.py:50-51), so the rest are dead rows here, left at random values."""
    leaf = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
    w_query = mem.w_query.detach()
    if dead_query_rows:
        w_query = torch.cat([w_query, torch.randn(dead_query_rows, w_query.shape[1], dtype=w_query.dtype)])
    table = mem._table[0] if hasattr(mem, "_table") else mem
    heads, rank = mem.cores.shape[0], mem.cores.shape[-1]
    pre = getattr(table, "pre_values", None)
    kinds = set(mem.norm_kinds.values())
    assert len(kinds) == 1  # the official code builds both norms from one config
    bias = lambda name: leaf(getattr(mem, name)) if hasattr(mem, name) else None  # noqa: E731
    return official.OfficialWeights(
        query_norm_bias=bias("query_norm_bias"), keys_norm_bias=bias("key_norm_bias"),
        norm_type="rms" if kinds == {"rms"} else "default",
        query_proj=leaf(w_query), query_norm=leaf(mem.query_norm_weight),
        keys=leaf(mem.keys.permute(0, 1, 3, 4, 2)), keys_norm=leaf(mem.key_norm_weight),
        tucker_core=[leaf(mem.cores[:, k]) for k in range(mem.cores.shape[1])],
        tucker_core_u=mem.rank_one[0].view(1, heads, 1, rank), tucker_core_v=mem.rank_one[1].view(1, heads, 1, rank),
        shuffle_index=mem.shuffle, values=leaf(table.values), values_proj=leaf(mem.w_out),
        pre_values=leaf(pre) if pre is not None else None,
        pre_values_proj=leaf(mem.w_pre) if hasattr(mem, "w_pre") else None)


def compare(mem, ours_out, theirs_out, w: official.OfficialWeights, x: torch.Tensor, x_ref: torch.Tensor,
            ours_aux: torch.Tensor | None = None) -> float:
    """Backpropagate one random cotangent through both (ours plus its auxiliary loss, which the
    training loss adds; theirs carries it in AuxLossBackwardHook); assert outputs and gradients agree."""
    cotangent = torch.randn_like(ours_out)
    torch.testing.assert_close(ours_out, theirs_out, **F64)
    ((ours_out * cotangent).sum() + (ours_aux if ours_aux is not None else 0)).backward()
    (theirs_out * cotangent).sum().backward()
    table = mem._table[0] if hasattr(mem, "_table") else mem
    pairs = [(x.grad, x_ref.grad), (mem.w_query.grad, w.query_proj.grad[: mem.w_query.shape[0]]),
             (mem.query_norm_weight.grad, w.query_norm.grad), (mem.key_norm_weight.grad, w.keys_norm.grad),
             (mem.keys.grad, w.keys.grad.permute(0, 1, 4, 2, 3)),
             (mem.cores.grad, torch.stack([c.grad for c in w.tucker_core], 1)),
             (table.values.grad, w.values.grad), (mem.w_out.grad, w.values_proj.grad)]
    if w.pre_values is not None:
        pairs += [(table.pre_values.grad, w.pre_values.grad), (mem.w_pre.grad, w.pre_values_proj.grad)]
        assert not w.query_proj.grad[mem.query_read:].any()  # the official dead query rows
        assert mem.query_rows == mem.query_read or not mem.w_query.grad[mem.query_read:].any()
    for which, official_name in (("query", "query_norm_bias"), ("key", "keys_norm_bias")):
        if hasattr(mem, f"{which}_norm_bias"):
            pairs.append((getattr(mem, f"{which}_norm_bias").grad, getattr(w, official_name).grad))
        else:
            assert getattr(w, official_name) is None
    for ours, theirs in pairs:
        torch.testing.assert_close(ours, theirs, **F64)
    return float((ours_out - theirs_out).detach().abs().max())


V2_CASES = {  # extra fields of the tiny spec's memory layer, and the layer to compare (3 wraps around the ring)
    "plain-layer0": ("", 0),
    "plain-wraps": ("", 3),
    "gelu": ("pre_value_gelu: true, ", 3),  # the official mem_use_glu_act
    "expand-balance-official-query": ("key_expand: 2, key_balance_weight: 0.05, official_query: true, ", 3),
    "rms-with-bias-expand-3": ("query_norm_bias: true, key_norm_bias: true, key_expand: 3, ", 1),
    "layer-without-bias-2-heads": ("query_norm: layer, key_norm: layer, query_norm_bias: false, key_norm_bias: false, "
                                   "heads: 2, official_query: true, key_balance_weight: 0.5, ", 3),
    "official-query-4-heads": ("heads: 4, official_query: true, ", 3),  # heads 2, 3 read query group 1
}


@pytest.mark.parametrize("case", sorted(V2_CASES))
def test_ultramem_v2_equals_the_official_forward_and_gradients(write_spec, case):
    fields, layer = V2_CASES[case]
    text = (MODELS / "ultramem-v2-tiny.yaml").read_text().replace("share: ring,", fields + "share: ring,")
    model = build_model(load(write_spec(text)), seed=11).double()
    mem = model.layers[layer]["ultramem_v2"]
    s = mem.spec
    assert s.pre_value_gelu == ("gelu" in fields)
    assert s.key_expand == (3 if "key_expand: 3" in fields else 2 if "key_expand" in fields else 1)
    assert (s.key_balance_weight > 0) == ("balance" in fields)
    assert layer in (0, 1) or mem.offset + s.addressed_keys**2 > mem.table_rows  # it does wrap
    if s.official_query:  # our projection is the official 2 rank D_k rows; head h reads group h // 2
        assert mem.query_rows == 2 * s.rank * s.key_dim and mem.query_read == 2 * s.key_dim * (1 + (s.heads > 2))
        w = official_weights(mem)
    else:  # ours holds the rows that are read; the official 2 D_k more stay dead
        w = official_weights(mem, dead_query_rows=2 * s.key_dim)
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    ours = mem.body(x)
    ours, ours_aux = ours if isinstance(ours, tuple) else (ours, None)
    theirs = official.ultramem_v2(w, x_ref.view(10, 32), s.key_dim, s.topk, mem.offset, mem.table_rows,
                                  s.addressed_keys**2, s.pre_value_gelu, s.key_balance_weight)
    if s.key_balance_weight:
        theirs, their_loss = theirs
        torch.testing.assert_close(ours_aux, s.key_balance_weight * their_loss, **F64)
        assert float(their_loss.detach()) > 1.5  # two halves of about 1 or more each: a real loss, not zero
    else:
        assert ours_aux is None
    assert compare(mem, ours, theirs.view(2, 5, 32), w, x, x_ref, ours_aux) < 1e-12


@pytest.mark.parametrize("fields", ["", "query_norm: layer, key_norm: layer, query_norm_bias: false, "
                                    "key_norm_bias: false, ", "query_norm_bias: true, key_norm_bias: true, ",
                                    "query_norm: layer, key_norm: layer, "])  # auto: LayerNorm with its bias
def test_ultramem_equals_the_official_forward_and_gradients(write_spec, fields):
    text = (MODELS / "ultramem-tiny.yaml").read_text().replace("ultramem: {", "ultramem: {" + fields)
    model = build_model(load(write_spec(text)), seed=12).double()
    mem = model.layers[1]["ultramem"]
    assert hasattr(mem, "query_norm_bias") == ("bias: true" in fields or fields.endswith("key_norm: layer, "))
    assert mem.norm_kinds["key"] == ("layer" if "layer" in fields else "rms")
    assert mem.query_heads == 1 and mem.spec.heads == 2  # two heads read one query, as the official i // 2
    w = official_weights(mem)
    x = torch.randn(3, 4, 32, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    ours = mem.body(x)
    theirs = official.ultramem_v1(w, x_ref.view(12, 32), mem.spec.key_dim, mem.spec.topk,
                                  mem.spec.expansion).view(3, 4, 32)
    assert compare(mem, ours, theirs, w, x, x_ref) < 1e-12


CODE_INIT = """\
model:
  name: init-check
  vocab_size: 64
  hidden_size: 256
  seq_len: 8
  blocks:
    block:
      - attention: {heads: 4}
      - ffn: {hidden: 512}
      - MEMORY
  layers:
    - {block: block, repeat: 2}
train:
  batch_size: 2
  init_std: 0.05
"""


def _check_std(tensor: torch.Tensor, expected: float, name: str) -> None:
    measured = float(tensor.detach().double().std())
    assert abs(measured / expected - 1) < 0.05, f"{name}: std {measured:.5g}, official {expected:.5g}"


def test_ultramem_v2_code_init_is_the_official_reset_parameters(write_spec):
    memory = ("ultramem_v2: {num_keys: 24, topk: 8, key_dim: 128, value_dim: 96, pre_value_dim: 64, "
              "share: ring, share_layers: 2, parallel: true}")
    model = build_model(load(write_spec(CODE_INIT.replace("MEMORY", memory))), seed=3)
    mem, table = model.layers[1]["ultramem_v2"], model.memory_tables.ring
    dk, dv, hidden = 128, 96, 256
    _check_std(mem.w_query, 1 / math.sqrt(dk), "query_proj")  # ultramem_layer_v2.py:243
    _check_std(mem.keys, 1 / math.sqrt(dk), "keys")  # :246
    _check_std(mem.w_out, 1 / math.sqrt(dv * 1), "values_proj")  # :244, v_proj_in_dim = vdim * value_expand_time
    _check_std(mem.w_pre, 1 / math.sqrt(hidden), "pre_values_proj")  # :248
    _check_std(table.values, 0.02, "values")  # :203-220, std_value1 = 0.02 (not init_std 0.05)
    _check_std(table.pre_values, 0.02, "pre_values")  # :221-238
    for weight in (mem.query_norm_weight, mem.key_norm_weight):  # :240-241
        torch.testing.assert_close(weight, torch.full_like(weight, dk**-0.4))
    assert 0 <= float(mem.cores.detach().min()) and float(mem.cores.detach().max()) <= 1  # :252-253 U(0, 1)


def test_ultramem_code_init_is_the_official_reset_parameters(write_spec):
    memory = "ultramem: {num_keys: 16, topk: 8, key_dim: 128, value_dim: 96, heads: 2, expansion: 4, parallel: true}"
    model = build_model(load(write_spec(CODE_INIT.replace("MEMORY", memory))), seed=3)
    mem, dk = model.layers[0]["ultramem"], 128
    _check_std(mem.w_query, 1 / math.sqrt(dk), "query_proj")  # ultramem_layer.py:115
    _check_std(mem.keys, 1 / math.sqrt(dk), "keys")  # :119
    _check_std(mem.w_out, 1 / math.sqrt(4 * 96), "values_proj")  # :116, v_proj_in_dim = vdim * value_expand_time
    _check_std(mem.values, 0.02, "values")  # :122-123
    for weight in (mem.query_norm_weight, mem.key_norm_weight):  # :112-113
        torch.testing.assert_close(weight, torch.full_like(weight, dk**-0.33))
