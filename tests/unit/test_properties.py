"""Property tests (hypothesis): any valid small spec loads, lowers, and counts its parameters exactly;
the boxing table's wire bytes never exceed what the ring formulas allow."""

from __future__ import annotations

import sympy
from hypothesis import given, settings
from hypothesis import strategies as st
from ultraplan.compiler.build import build_model
from ultraplan.compiler.validate import load_model_spec
from ultraplan.passes.sbp import Broadcast, PartialSum, Split, box
from ultraplan.passes.stats import spec_stats

SPEC = """\
model:
  name: prop
  vocab_size: {vocab}
  hidden_size: {hidden}
  seq_len: 8
  tie_embeddings: {tie}
  norm: {norm}
  blocks:
    b:
      - attention: {{heads: {heads}, kv_heads: {kv}, rotary: {rotary}}}
      - ffn: {{hidden: {ffn}, activation: {act}}}
  layers:
    - {{block: b, repeat: {layers}}}
"""


@st.composite
def specs(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    return SPEC.format(
        vocab=draw(st.integers(2, 50)), hidden=heads * head_dim, tie=draw(st.booleans()),
        norm=draw(st.sampled_from(["rms", "layer", "none"])), heads=heads,
        kv=draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0])), rotary=draw(st.booleans()),
        ffn=draw(st.integers(1, 40)), act=draw(st.sampled_from(["swiglu", "gelu"])), layers=draw(st.integers(1, 3)))


@settings(max_examples=25, deadline=None)
@given(specs())
def test_valid_specs_load_and_count_exactly(text):
    spec = load_model_spec("prop.yaml", text=text)
    model = build_model(spec, seed=0)
    assert spec_stats(spec).params == sum(p.numel() for p in model.parameters())


@given(st.sampled_from([PartialSum(), Broadcast(), Split(0), Split(1)]), st.sampled_from([Broadcast(), Split(0)]),
       st.integers(1, 64), st.integers(1, 10**9))
def test_boxing_never_sends_more_than_an_all_reduce(src, dst, n, nbytes):
    step = box(src, dst, axis=0, nbytes=sympy.Integer(nbytes), n=sympy.Integer(n))
    if step is None:
        assert src == dst
        return
    wire = float(step.wire)
    assert 0 <= wire <= 2 * (n - 1) / n * nbytes + 1e-6
    if n == 1:
        assert wire == 0
