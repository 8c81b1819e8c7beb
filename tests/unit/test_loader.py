"""Spec loading and validation: every error class names file, line, column and field path."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from ultraplan.compiler.errors import SpecError
from ultraplan.compiler.validate import load_hardware_spec, load_model_spec

from tests.conftest import HARDWARE, MODELS, RUNNABLE_SPECS

GOOD = textwrap.dedent("""\
    model:
      name: t
      vocab_size: 32
      hidden_size: 16
      seq_len: 8
      blocks:
        dense:
          - attention: {heads: 4}
          - ffn: {hidden: 32}
      layers:
        - {block: dense, repeat: 2}
    """)


def error_of(write_spec, text: str) -> SpecError:
    path = write_spec(text)
    with pytest.raises(SpecError) as info:
        load_model_spec(path)
    assert info.value.file == str(path)
    return info.value


@pytest.mark.parametrize("name", RUNNABLE_SPECS)
def test_bundled_specs_load(name):
    spec = load_model_spec(MODELS / f"{name}.yaml")
    assert spec.num_layers >= 2


def test_bundled_hardware_loads():
    cpu = load_hardware_spec(HARDWARE / "cpu.yaml")
    h200 = load_hardware_spec(HARDWARE / "h200-8.yaml")
    assert h200.devices_per_node == 8 and h200.memory_bytes == 141e9 and cpu.peak_flops["fp32"] > 0


def test_good_spec_defaults(write_spec):
    spec = load_model_spec(write_spec(GOOD))
    attn = spec.layers[0].sublayers[0].config
    assert (attn.heads, attn.kv_heads, attn.head_dim) == (4, 4, 4)
    assert spec.layers[1].sublayers[1].config.activation == "swiglu"
    assert spec.train.batch_size == 8


def test_typo_in_field_suggests_nearest(write_spec):
    err = error_of(write_spec, GOOD.replace("ffn: {hidden: 32}", "ffn: {hiden: 32}"))
    assert (err.line, err.column) == (9, 15)
    assert err.path == ("model", "blocks", "dense", 1, "ffn", "hiden")
    assert "unknown field 'hiden'" in err.message and "did you mean 'hidden'" in err.hint
    assert str(err).startswith(f"{err.file}:9:15: model.blocks.dense[1].ffn.hiden: unknown field")


def test_wrong_type(write_spec):
    err = error_of(write_spec, GOOD.replace("hidden_size: 16", "hidden_size: sixteen"))
    assert (err.line, err.column) == (4, 16) and "expected an integer" in err.message


def test_missing_required(write_spec):
    err = error_of(write_spec, GOOD.replace("  vocab_size: 32\n", ""))
    assert err.path == ("model",) and "missing required field 'vocab_size'" in err.message


def test_bad_literal_choice_suggests(write_spec):
    err = error_of(write_spec, GOOD.replace("ffn: {hidden: 32}", "ffn: {hidden: 32, activation: swigl}"))
    assert err.path[-1] == "activation" and (err.line, err.column) == (9, 39) and "'swiglu'" in err.hint


def test_duplicate_key(write_spec):
    err = error_of(write_spec, GOOD.replace("  seq_len: 8\n", "  seq_len: 8\n  seq_len: 9\n"))
    assert (err.line, err.column) == (6, 3) and "duplicate key 'seq_len'" in err.message


def test_invalid_yaml(write_spec):
    err = error_of(write_spec, "model:\n  name: [unclosed\n")
    assert err.line == 3 and "invalid YAML" in err.message


def test_hidden_not_divisible_by_heads(write_spec):
    err = error_of(write_spec, GOOD.replace("attention: {heads: 4}", "attention: {heads: 3}"))
    assert err.path[-1] == "heads" and (err.line, err.column) == (8, 28)
    assert "not divisible by heads 3" in err.message


def test_kv_heads_must_divide_heads(write_spec):
    err = error_of(write_spec, GOOD.replace("attention: {heads: 4}", "attention: {heads: 4, kv_heads: 3}"))
    assert err.path[-1] == "kv_heads" and "must divide heads 4" in err.message and "[1, 2, 4]" in err.hint


def test_rotary_needs_even_head_dim(write_spec):
    err = error_of(write_spec, GOOD.replace("attention: {heads: 4}", "attention: {heads: 4, head_dim: 5}"))
    assert err.path[-1] == "head_dim" and "even head_dim" in err.message


def test_unknown_block_reference(write_spec):
    err = error_of(write_spec, GOOD.replace("{block: dense, repeat: 2}", "{block: dens, repeat: 2}"))
    assert (err.line, err.column) == (11, 15) and "did you mean 'dense'" in err.hint


def test_override_of_missing_sublayer(write_spec):
    err = error_of(write_spec, GOOD.replace("repeat: 2}", "repeat: 2, override: {fn.hidden: 8}}"))
    assert err.path[-1] == "fn.hidden" and "did you mean 'ffn'" in err.hint


def test_override_value_is_blamed_at_the_override(write_spec):
    err = error_of(write_spec, GOOD.replace("repeat: 2}", "repeat: 2, override: {ffn.hidden: -1}}"))
    assert err.path == ("model", "layers", 0, "override", "ffn.hidden") and err.line == 11
    assert "at least 1" in err.message


def test_unknown_sublayer_kind(write_spec):
    err = error_of(write_spec, GOOD.replace("- ffn: {hidden: 32}", "- fnn: {hidden: 32}"))
    assert "unknown sublayer kind 'fnn'" in err.message and "did you mean 'ffn'" in err.hint


def test_sublayer_name_must_be_identifier(write_spec):
    err = error_of(write_spec, GOOD.replace("ffn: {hidden: 32}", "ffn: {hidden: 32, name: \"x; import os\"}"))
    assert "plain identifier" in err.message


def test_unknown_top_level_key(write_spec):
    err = error_of(write_spec, GOOD + "trian: {lr: 0.1}\n")
    assert (err.line, err.column) == (12, 1) and "did you mean 'train'" in err.hint


def test_python_tags_are_refused(write_spec):
    err = error_of(write_spec, GOOD.replace("name: t", "name: !!python/object/apply:os.system ['echo hi']"))
    assert err.line == 2


def test_groups_override_and_pattern(write_spec):
    spec = load_model_spec(MODELS / "dense-deep-groups.yaml")
    blocks = [layer.block for layer in spec.layers]
    assert blocks == ["wide", "narrow"] * 4 + ["wide", "wide"]
    assert spec.layers[1].sublayers[0].config.kv_heads == 1
    last_ffn = spec.layers[-1].sublayers[1]
    assert last_ffn.config.hidden == 128 and last_ffn.norm is None
    assert spec.layers[0].sublayers[1].config.hidden == 96 and spec.layers[0].sublayers[1].norm is not None


def test_cli_reports_error_without_traceback(write_spec):
    """Through the real command (a subprocess), so that a traceback would show in its stderr."""
    path = write_spec(GOOD.replace("ffn: {hidden: 32}", "ffn: {hiden: 32}"))
    result = subprocess.run([sys.executable, "-m", "ultraplan", "stats", str(path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    err = result.stderr
    assert err.startswith(f"error: {path}:9:15: model.blocks.dense[1].ffn.hiden") and "Traceback" not in err


def test_hardware_errors(write_spec):
    path = write_spec("hardware:\n  name: x\n  devices_per_node: 0\n")
    with pytest.raises(SpecError) as info:
        load_hardware_spec(path)
    assert (info.value.line, info.value.column) == (3, 21) and "at least 1" in info.value.message


SPARSE = GOOD.replace("      - ffn: {hidden: 32}", "      - ffn: {hidden: 32}\n      - {kind}")


def sparse_error(write_spec, sublayer: str) -> SpecError:
    return error_of(write_spec, SPARSE.replace("{kind}", sublayer))


def test_sparse_sublayer_errors(write_spec):
    err = sparse_error(write_spec, "moe: {experts: 4, topk: 5, hidden: 8}")
    assert err.path[-1] == "topk" and "exceeds experts 4" in err.message
    err = sparse_error(write_spec, "pkm: {num_keys: 4, topk: 2, key_dim: 7}")
    assert err.path[-1] == "key_dim" and "even" in err.message
    err = sparse_error(write_spec, "ultramem: {num_keys: 4, topk: 2, key_dim: 8, value_dim: 8, expansion: 2}")
    assert err.path[-1] == "expansion" and "perfect square" in err.message
    err = sparse_error(write_spec, "ultramem_v2: {num_keys: 4, topk: 2, key_dim: 8, value_dim: 9}")
    assert err.path[-1] == "value_dim" and "2 equal chunks" in err.message
    err = sparse_error(write_spec, "ultramem_v2: {num_keys: 2, topk: 3, key_dim: 8, value_dim: 8}")
    assert err.path[-1] == "topk" and "exceeds keys addressed per half 2" in err.message
    err = sparse_error(write_spec, "ultramem_v2: {num_keys: 4, topk: 2, key_dim: 8, value_dim: 8, share: rnig}")
    assert err.path[-1] == "share" and "'ring'" in err.hint


def test_structure_errors(write_spec):
    err = error_of(write_spec, GOOD.replace("- attention: {heads: 4}", "- attention: {heads: 4, parallel: true}"))
    assert "first sublayer of a block cannot be parallel" in err.message
    err = error_of(write_spec, GOOD.replace("ffn: {hidden: 32}", "ffn: {hidden: 32, deliver_after: 2}"))
    assert "past the last layer (1)" in err.message
    shared = SPARSE.replace("{kind}", "pkm: {num_keys: 4, topk: 2, key_dim: 8, shared_values: true}")
    shared = shared.replace("{block: dense, repeat: 2}", "{block: dense}\n    - {block: dense, override: {pkm.num_keys: 5}}")
    err = error_of(write_spec, shared)
    assert "share the 'pkm_shared' value table but disagree" in err.message
    assert err.path[-2:] == ("override", "pkm.num_keys")  # the override that broke it, not the block


def test_integers_beyond_int64_are_refused(write_spec):
    for text in ("100000000000000000000000", "1.0e+23"):
        err = error_of(write_spec, GOOD.replace("ffn: {hidden: 32}", f"ffn: {{hidden: {text}}}"))
        assert err.path[-1] == "hidden" and "too large" in err.message and (err.line, err.column) == (9, 23)


@pytest.mark.parametrize(("old", "new", "message", "line"), [
    ("ffn: {hidden: 32}", "ffn: {hidden: 32, name: keys}", "taken by the block's own attributes", 9),
    ("ffn: {hidden: 32}", "ffn: {hidden: 32, name: layer}", "taken by the block's own attributes", 9),
    ("{block: dense, repeat: 2}", "{block: [dense]}", "a block name must be a plain identifier", 11),
    ("{block: dense, repeat: 2}", "{pattern: [dense, {x: 1}]}", "a block name must be a plain identifier", 11),
    ("ffn: {hidden: 32}", "ffn: {hidden: 32, deliver_after: 2}", "past the last layer (1)", 9),
])
def test_names_and_references_that_would_crash_the_build(write_spec, old, new, message, line):
    err = error_of(write_spec, GOOD.replace(old, new))
    assert message in err.message and err.line == line, err


def test_override_names_are_checked_like_sublayer_names(write_spec):
    text = GOOD.replace("ffn: {hidden: 32}", "ffn: {hidden: 32, name: [x]}").replace(
        "{block: dense, repeat: 2}", "{block: dense, override: {ffn.hidden: 64}}")
    assert "a sublayer name must be a plain identifier" in error_of(write_spec, text).message


def test_aliases_of_collections_are_refused(write_spec):
    text = GOOD.replace("  name: t\n", "  name: t\n  extra: &m {a: 1}\n  again: *m\n")
    err = error_of(write_spec, text)
    assert "anchors and aliases" in err.message and err.line == 4
    recursive = "model: &m {vocab_size: 32, loop: *m}\n"
    assert "anchors and aliases" in error_of(write_spec, recursive).message


def test_final_norm_cannot_be_none(write_spec):
    err = error_of(write_spec, GOOD.replace("  seq_len: 8\n", "  seq_len: 8\n  final_norm: none\n"))
    assert err.path == ("model", "final_norm") and "cannot be none" in err.message
    spec = load_model_spec(write_spec(GOOD.replace("  seq_len: 8\n", "  seq_len: 8\n  norm: none\n")))
    assert spec.final_norm.kind == "rms" and spec.layers[0].sublayers[0].norm is None


def test_sharers_of_a_table_initialise_it_one_way(write_spec):
    v2 = "ultramem_v2: {num_keys: 4, topk: 2, key_dim: 8, value_dim: 8, pre_value_dim: 4, share: ring, init: paper}"
    text = SPARSE.replace("{kind}", v2).replace(
        "{block: dense, repeat: 2}", "{block: dense}\n    - {block: dense, override: {ultramem_v2.topk: 3}}")
    err = error_of(write_spec, text)
    assert "would initialise it differently" in err.message and err.path[-2:] == ("override", "ultramem_v2.topk")
    mixed = text.replace("ultramem_v2.topk: 3", "ultramem_v2.init: code")
    assert "init paper vs code" in error_of(write_spec, mixed).message


@pytest.mark.parametrize(("old", "new", "field"), [
    ("  vocab_size: 32\n", "  vocab_size: 4611686018427387904\n", "vocab_size"),
    ("ffn: {hidden: 32}", "ffn: {hidden: 9000000000000000000}", "hidden"),
    ("ffn: {hidden: 32}", "pkm: {num_keys: 4000000000, topk: 2, key_dim: 8}", "num_keys"),
    ("ffn: {hidden: 32}", "moe: {experts: 9000000000, topk: 2, hidden: 9000000000}", "hidden"),
])
def test_a_tensor_too_large_for_torch_is_an_error_at_its_field(write_spec, old, new, field):
    err = error_of(write_spec, GOOD.replace(old, new))
    assert err.path[-1] == field and "2^63 - 1" in err.message, err
