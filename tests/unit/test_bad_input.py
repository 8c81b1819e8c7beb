"""Hostile or broken spec files end in one positioned error (exit 2), never a traceback or a hang:
deep nesting, endless files, tags, base-60 numbers, control characters, huge sizes and repeats."""

from __future__ import annotations

import pytest
from ultraplan.compiler.errors import SpecError, SpecErrors
from ultraplan.compiler.schema import MAX_LAYERS
from ultraplan.compiler.validate import load_model_spec
from ultraplan.compiler.yaml_guard import MAX_DEPTH

from tests.conftest import MODELS
from ultraplan.cli import main

DENSE = (MODELS / "dense-tiny.yaml").read_text()


def spec_error(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_model_spec("x.yaml", text=text)
    return info.value


def test_deep_nesting_is_a_positioned_error():
    err = spec_error("model:\n  blocks: " + "[" * 500 + "]" * 500 + "\n")
    assert f"nested more than {MAX_DEPTH} levels" in err.message and err.line == 2


def test_an_endless_file_is_read_up_to_a_cap(capsys):
    assert main(["stats", "/dev/zero"]) == 2
    assert "/dev/zero:1:1" in capsys.readouterr().err


@pytest.mark.parametrize("tag", ["!!python/object:os.system", "!!set", "!foo", "!!binary", "!!timestamp"])
def test_tags_are_refused_at_their_line(tag):
    err = spec_error(DENSE.replace("name: dense-tiny", f"name: {tag} x"))
    assert "YAML tag" in err.message and err.line == DENSE.splitlines().index("  name: dense-tiny") + 1


def test_base_60_numbers_are_refused():
    err = spec_error(DENSE.replace("seq_len: 32", "seq_len: 1:20"))
    assert "base-60" in err.message and err.path == ("model", "seq_len")
    assert load_model_spec("x.yaml", text=DENSE.replace("name: dense-tiny", 'name: "1:20"')).name == "1:20"


def test_control_characters_are_escaped_in_errors():
    text = DENSE.replace("{block: dense, repeat: 2}", '{block: "a\\e[31m\\u202e", repeat: 2}')
    shown = str(spec_error(text))
    assert "\x1b" not in shown and "\u202e" not in shown and "\\x1b" in shown and "\\u202e" in shown


def test_repeat_is_bounded_at_its_line():
    err = spec_error(DENSE.replace("repeat: 2", "repeat: 1099511627776"))
    assert err.path[-1] == "repeat" and f"{MAX_LAYERS:,}" in err.message


def test_a_thousand_identical_layers_validate_quickly():
    import time

    start = time.perf_counter()
    spec = load_model_spec("x.yaml", text=DENSE.replace("repeat: 2", "repeat: 1000"))
    assert spec.num_layers >= 1000 and time.perf_counter() - start < 2


@pytest.mark.parametrize("edit, field", [
    (("hidden_size: 64", "hidden_size: 1600000000"), "hidden_size"),  # hidden x hidden float64 bytes > 2^63
    (("seq_len: 32", "seq_len: 2000000000"), "heads"),  # B x heads x T x T attention scores
    (("vocab_size: 128", "vocab_size: 100000000000000000"), "vocab_size"),
])
def test_tensor_sizes_count_bytes(edit, field):
    err = spec_error(DENSE.replace(*edit))
    assert err.path[-1] == field and "bytes" in err.message


def test_huge_batch_and_seq_flags_are_clean_errors(capsys):
    assert main(["plan", "dense-tiny", "--batch", str(2**64)]) == 2
    assert "--batch must be at most 2^63 - 1" in capsys.readouterr().err
    assert main(["plan", "dense-tiny", "--seq", str(2**40)]) == 2
    assert "torch cannot size this graph" in capsys.readouterr().err


def test_unused_blocks_are_validated():
    text = DENSE.replace("  layers:", "    spare:\n      - ffn: {hidden: -1}\n  layers:")
    err = spec_error(text)
    assert err.path[:3] == ("model", "blocks", "spare")


def test_every_error_is_reported_in_one_run():
    text = DENSE.replace("vocab_size: 128", "vocab_size: 1").replace("activation: swiglu", "activaton: swiglu") \
        .replace("repeat: 2", "repeat: 0")
    err = spec_error(text)
    assert isinstance(err, SpecErrors) and len(err.errors) == 3
    assert all(f"x.yaml:{e.line}:{e.column}:" in str(err) for e in err.errors)


def test_valid_field_hints_list_every_accepted_field():
    err = spec_error(DENSE.replace("activation: swiglu", "activaton: swiglu"))
    for name in ("hidden", "activation", "multiple_of", "name", "norm", "parallel", "deliver_after"):
        assert name in err.hint


def test_every_graph_value_is_checked_at_the_plans_batch_and_seq():
    """Beyond the spec-level list, planning checks each lowered value's bytes at B and T."""
    from ultraplan.passes.choose_sbp import PlanError
    from ultraplan.passes.context import Mesh, PlanContext
    from ultraplan.passes.pipeline import check_graph_sizes, lower_spec

    from ultraplan import api

    spec = api.load("dense-tiny")
    gm = lower_spec(spec, mode="infer")
    hardware = api.load_hardware()
    check_graph_sizes(gm, PlanContext(spec, hardware, Mesh.parse("1"), 8, 32, "infer", ""))
    with pytest.raises(PlanError, match="torch cannot size this graph at B=4611686018427387904"):
        check_graph_sizes(gm, PlanContext(spec, hardware, Mesh.parse("1"), 2**62, 1, "infer", ""))


def test_stats_at_a_huge_decode_batch_answers(capsys):
    """(1 - r/R)^B at B = 2^62 is evaluated in floating point, not as an exact fraction (which hung)."""
    assert main(["stats", "moe-tiny", "--batch", str(2**62), "--json"]) == 0
    assert '"memory_access_bytes_per_token": ' in capsys.readouterr().out
