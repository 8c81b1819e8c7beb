"""``memory_to_ffn`` with ``ffn: {hidden: auto}``: the loader's pairing rules, and the widths
passes/size_ffn.py picks, checked against torch's FlopCounterMode on the eager sized model."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from ultraplan.compiler.build import build_model
from ultraplan.compiler.errors import SpecError
from ultraplan.compiler.schema import MEMORY_KINDS
from ultraplan.compiler.validate import load_model_spec
from ultraplan.passes.pipeline import prepare_spec
from ultraplan.passes.size_ffn import MAX_WIDTH
from ultraplan.passes.stats import spec_stats

from tests.conftest import MODELS
from ultraplan import load

SPEC = textwrap.dedent("""\
    model:
      name: sized
      vocab_size: 40
      hidden_size: 16
      seq_len: 8
      blocks:
        dense:
          - attention: {heads: 2}
          - {ffn}
          - {memory}
        plain:
          - attention: {heads: 2}
          - ffn: {hidden: 24}
      layers:
        - {layers}
    """)

V2 = "ultramem_v2: {num_keys: 6, topk: 4, key_dim: 8, value_dim: 12, pre_value_dim: 4, parallel: true, " \
     "memory_to_ffn: 0.3}"
CASES = {
    "ultramem_v2": ("ffn: {hidden: auto}", V2, "{block: dense, repeat: 2}"),
    "ultramem_v2 ratio overridden per group": (
        "ffn: {hidden: auto}", V2,
        "{block: dense}\n    - {block: dense, override: {ultramem_v2.memory_to_ffn: 1.5}}"),
    "pkm, gelu ffn, multiple_of 8": (
        "ffn: {hidden: auto, activation: gelu, multiple_of: 8}",
        "pkm: {num_keys: 8, topk: 4, key_dim: 8, heads: 2, memory_to_ffn: 0.25}", "{block: dense, repeat: 2}"),
    "peer": ("ffn: {hidden: auto}", "peer: {num_keys: 8, topk: 4, key_dim: 8, heads: 2, memory_to_ffn: 1.0}",
             "{block: dense, repeat: 2}"),
    "two memories and a fixed ffn in the block": (
        "ffn: {hidden: auto, multiple_of: 2}",
        V2 + "\n      - ffn: {hidden: 6, name: small}\n      - pkm: {num_keys: 4, topk: 2, key_dim: 8, parallel: true}",
        "{block: dense, repeat: 2}"),
    "ultramem skip-layer": (
        "ffn: {hidden: auto, multiple_of: 4}",
        "ultramem: {num_keys: 4, topk: 4, key_dim: 8, value_dim: 8, expansion: 4, parallel: true, deliver_after: 1, "
        "memory_to_ffn: 0.1}",
        "{pattern: [dense, plain], repeat: 2}"),
}


def spec_text(ffn: str, memory: str, layers: str) -> str:
    return SPEC.replace("{ffn}", ffn).replace("{memory}", memory).replace("{layers}", layers)


def flop_counts(spec, tokens: int = 2 * 8) -> dict[str, float]:
    """FLOPs per token of each module, by torch's counter on the eager model."""
    model = build_model(spec, seed=0)
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, spec.vocab_size, (2, 8)))
    return {name.removeprefix("DecoderModel."): sum(c.values()) / tokens
            for name, c in counter.get_flop_counts().items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_width_is_the_nearest_multiple_to_the_ratio(write_spec, case):
    """Per block: (memory sublayers' FLOPs) = r (FFNs' FLOPs), solved for the auto FFN's width, which
    must be the multiple nearest that real-valued solution, all measured by FlopCounterMode."""
    path = write_spec(spec_text(*CASES[case]))
    raw, sized = load_model_spec(path), load(path)
    counts = flop_counts(sized)
    checked = 0
    for before, after in zip(raw.layers, sized.layers):
        for sub, done in zip(before.sublayers, after.sublayers):
            if not sub.auto_ffn:
                assert done == sub  # nothing else changes
                continue
            flops = {s.name: counts.get(f"layers.{before.index}.{s.name}", 0.0) for s in before.sublayers}
            memory = sum(flops[s.name] for s in before.sublayers if s.kind in MEMORY_KINDS)
            fixed = sum(flops[s.name] for s in before.sublayers if s.kind == "ffn" and s is not sub)
            ratio = next(s.config.memory_to_ffn for s in before.sublayers if s.sizes_ffn)
            step, width = sub.config.multiple_of, done.config.hidden
            ideal = (memory / ratio - fixed) / (flops[sub.name] / width)  # the real width the ratio asks for
            assert width % step == 0 and abs(ideal - width) <= step / 2 + 1e-9, (ideal, width)
            assert ideal > 2 * step  # the cases are sized well away from the one-multiple floor
            checked += 1
    assert checked == sum(s.auto_ffn for layer in raw.layers for s in layer.sublayers) >= 2


def test_report_and_stats_agree_with_the_counter(write_spec):
    path = write_spec(spec_text(*CASES["ultramem_v2 ratio overridden per group"]))
    sized, reports = prepare_spec(load_model_spec(path))
    counts = flop_counts(sized)
    (report,) = reports
    for i in (0, 1):
        achieved = report.costs[f"layers.{i}.ffn.memory_to_ffn"]
        assert float(achieved) == pytest.approx(counts[f"layers.{i}.ultramem_v2"] / counts[f"layers.{i}.ffn"],
                                                rel=1e-12)
    widths = [layer.sublayers[1].config.hidden for layer in sized.layers]
    assert widths[0] > widths[1]  # 5x the ratio, about a fifth of the width
    memory = sum(counts[f"layers.{i}.ultramem_v2"] for i in (0, 1))
    ffn = sum(counts[f"layers.{i}.ffn"] for i in (0, 1))
    assert spec_stats(sized).memory_to_ffn == pytest.approx(memory / ffn, rel=1e-12)
    assert prepare_spec(sized)[0] == sized  # sizing a sized spec changes nothing


def test_bundled_ultramem_v2_tiny_is_sized():
    raw, sized = load_model_spec(MODELS / "ultramem-v2-tiny.yaml"), load("ultramem-v2-tiny")
    assert raw.layers[0].sublayers[1].config.hidden == "auto"
    assert {layer.sublayers[1].config.hidden for layer in sized.layers} == {72}


def test_an_unsized_spec_does_not_build():
    with pytest.raises(ValueError, match=r"ultraplan\.load"):
        build_model(load_model_spec(MODELS / "ultramem-v2-tiny.yaml"), device="meta")


def error_of(write_spec, text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        load(write_spec(text))
    return info.value


TWO = "{block: dense, repeat: 2}"


def test_pairing_errors_name_the_field(write_spec):
    err = error_of(write_spec, spec_text("ffn: {hidden: auto}", V2.replace(", memory_to_ffn: 0.3", ""), TWO))
    assert err.path[-1] == "hidden" and "needs a memory sublayer" in err.message and "memory_to_ffn" in err.hint
    err = error_of(write_spec, spec_text("ffn: {hidden: 32}", V2, TWO))
    assert err.path[-1] == "memory_to_ffn" and "fixed width (32)" in err.message and "hidden: auto" in err.hint
    assert (err.line, err.column) == (10, 121) and err.message.startswith("layer 0 (block 'dense')")
    err = error_of(write_spec, spec_text("attention: {heads: 2}", V2, TWO).replace(
        "- attention: {heads: 2}\n      - attention", "- attention: {heads: 2, name: a}\n      - attention"))
    assert "the block has no ffn" in err.message
    err = error_of(write_spec, spec_text("ffn: {hidden: 32, multiple_of: 8}", "ffn: {hidden: 8, name: f2}", TWO))
    assert err.path[-1] == "multiple_of" and "fixed at 32" in err.message
    err = error_of(write_spec, spec_text("ffn: {hidden: atuo}", V2, TWO))
    assert err.path[-1] == "hidden" and "expected an integer or 'auto'" in err.message and "'auto'" in err.hint
    err = error_of(write_spec, spec_text("ffn: {hidden: auto}", V2.replace("0.3", "0"), TWO))
    assert err.path[-1] == "memory_to_ffn" and "greater than 0" in err.message
    pkm = "pkm: {num_keys: 4, topk: 2, key_dim: 8, memory_to_ffn: 0.5}"
    err = error_of(write_spec, spec_text("ffn: {hidden: auto}", V2, TWO).replace(V2, V2 + "\n      - " + pkm))
    assert err.path[-1] == "memory_to_ffn" and "ultramem_v2 already sets" in err.message
    err = error_of(write_spec, spec_text("ffn: {hidden: auto}", "ffn: {hidden: auto, name: f2}", TWO))
    assert err.path[-2:] == ("ffn", "hidden") and "two ffns have hidden: auto (ffn, f2)" in err.message


OVERRIDDEN = "{block: dense}\n    - {block: dense, override: {OVERRIDE}}"


@pytest.mark.parametrize(("ffn", "memory", "override", "message"), [
    ("ffn: {hidden: auto}", V2, "ffn.hidden: 64", "has a fixed width (64)"),
    ("ffn: {hidden: 64}", V2.replace(", memory_to_ffn: 0.3", ""), "ultramem_v2.memory_to_ffn: 0.3",
     "has a fixed width (64)"),
    ("ffn: {hidden: auto, multiple_of: 8}", V2, "ffn.hidden: 64", "fixed at 64"),
    ("ffn: {hidden: auto}", V2, "ultramem_v2.memory_to_ffn: null", "hidden: auto needs a memory sublayer"),
])
def test_an_override_is_blamed_where_it_is_written(write_spec, ffn, memory, override, message):
    """The block is fine in its first group; the second group's override breaks the pair, so the
    error points at that override (line 16) and names layer 1."""
    err = error_of(write_spec, spec_text(ffn, memory, OVERRIDDEN.replace("OVERRIDE", override)))
    assert err.path[:2] == ("model", "layers") and "override" in err.path and err.line == 16, err
    assert message in err.message and err.message.startswith("layer 1 (block 'dense')")


@pytest.mark.parametrize(("ratio", "multiple", "message"), [
    ("1.0e6", 1, "out of reach: ffn's smallest width (multiple_of 1) gives"),
    ("0.5", 1000, "out of reach: ffn's smallest width (multiple_of 1000) gives"),
    ("1.0e-9", 1, "asks for an ffn of width"),
    ("1.0e-320", 1, "asks for an ffn of width inf"),
])
def test_a_ratio_no_width_can_meet_is_an_error_at_the_ratio(write_spec, capsys, ratio, multiple, message):
    path = write_spec(spec_text(f"ffn: {{hidden: auto, multiple_of: {multiple}}}", V2.replace("0.3", ratio), TWO))
    with pytest.raises(SpecError) as info:
        load(path)
    assert info.value.path[-1] == "memory_to_ffn" and info.value.line == 10 and message in info.value.message
    from ultraplan.cli import main

    assert main(["stats", str(path)]) == 2  # in-process: an exception escaping main would fail here
    assert capsys.readouterr().err.startswith(f"error: {path}:10:")
    bound = info.value.hint.split("memory_to_ffn ")[1].split(",")[0]  # '<= 0.1234' or '>= 1.2e-09'
    path.write_text(path.read_text().replace(f"memory_to_ffn: {ratio}", f"memory_to_ffn: {bound.split()[1]}"))
    width = load(path).layers[0].sublayers[1].config.hidden  # the quoted bound itself is reachable
    assert width == multiple if bound.startswith("<=") else MAX_WIDTH * 0.999 < width <= MAX_WIDTH


def test_a_fixed_ffn_bigger_than_the_ratio_allows_is_out_of_reach(write_spec):
    memory = V2 + "\n      - ffn: {hidden: 4000, name: wide}"
    err = error_of(write_spec, spec_text("ffn: {hidden: auto}", memory, TWO))
    assert err.path[-1] == "memory_to_ffn" and "out of reach" in err.message


def test_stats_cli_prints_the_sizing(capsys):
    from ultraplan.cli import main

    assert main(["stats", "ultramem-v2-tiny", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["ffn_sizing"]) == 4 and all("hidden auto -> 72" in line for line in out["ffn_sizing"])
    counts = flop_counts(load("ultramem-v2-tiny"))
    assert out["memory_to_ffn"] == pytest.approx(counts["layers.0.ultramem_v2"] / counts["layers.0.ffn"], rel=1e-12)
    assert main(["stats", "ultramem-v2-tiny"]) == 0
    text = capsys.readouterr().out
    share = out["memory_to_ffn"] / (1 + out["memory_to_ffn"])
    assert "sized layers.3.ffn: hidden auto -> 72" in text and f"memory share of the two: {share:.1%}" in text


TWO_FFNS = "ffn: {hidden: 64, name: f1}\n      - ffn: {hidden: auto, name: f2}"


@pytest.mark.parametrize(("block_ffn", "override", "message"), [
    (TWO_FFNS, "pkm.memory_to_ffn: 0.2", "ultramem_v2 already sets memory_to_ffn"),
    (TWO_FFNS, "f1.hidden: auto", "two ffns have hidden: auto (f1, f2)"),
    (TWO_FFNS, "f2.hidden: 32", "f2 has a fixed width (32)"),
    (TWO_FFNS, "f1.hidden: 400000", "out of reach"),
    ("ffn: {hidden: auto}", "ffn.multiple_of: 100000", "out of reach"),
])
def test_the_override_that_breaks_the_pair_is_blamed(write_spec, block_ffn, override, message):
    memory = V2 + "\n      - pkm: {num_keys: 4, topk: 2, key_dim: 8, parallel: true}"
    text = spec_text(block_ffn, memory, OVERRIDDEN.replace("OVERRIDE", override))
    err = error_of(write_spec, text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "override" in row)
    assert err.line == line and "override" in err.path and override.split(":")[0] in err.path, err
    assert message in err.message and err.message.startswith("layer 1 (block 'dense')"), err


def test_origins_do_not_change_what_a_spec_is(write_spec):
    import pickle

    path = write_spec(spec_text(*CASES["ultramem_v2"]))
    one, two = load_model_spec(path), load_model_spec(path)
    assert one == two and hash(one) == hash(two) and one.layers[0].sublayers[2].origin("memory_to_ffn").line == 10
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        again = pickle.loads(pickle.dumps(one, protocol))
        assert again == one and again.layers[0].sublayers[2].origins == one.layers[0].sublayers[2].origins
    err = error_of(write_spec, spec_text("ffn: {hidden: AUTO}", V2, TWO))
    assert err.hint == "did you mean 'auto'?"


def test_explain_lists_the_sizing_before_the_graph_passes(capsys):
    from ultraplan.cli import main

    assert main(["explain", "ultramem-v2-tiny", "--stage", "shape_prop"]) == 0
    text = capsys.readouterr().out
    assert text.index("hidden auto -> 72") < text.index("# Constructed by shape_prop") and "annotate_cost" not in text
