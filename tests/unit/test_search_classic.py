"""--strategy auto finds the classic answers where they are right: which batch size flips a choice.

(That a large model on many devices needs sharded parameters to fit at all, and says so, is
tests/unit/test_search.py::test_a_large_model_on_eight_devices_needs_sharded_parameters.)
"""

from __future__ import annotations

from ultraplan.compiler.node_info import info
from ultraplan.compiler.validate import load_model_spec
from ultraplan.passes.context import Mesh
from ultraplan.passes.pipeline import make_context, make_plan
from ultraplan.passes.sbp import Broadcast, Split
from ultraplan.passes.search import build_problem
from ultraplan.passes.search_ilp import solve

from tests.conftest import ROOT
from ultraplan import api

MODELS = ROOT / "specs" / "models"


def test_the_batch_flips_the_embedding_from_vocab_split_to_whole():
    # dense-100m on 8 devices: the embedding table (50k x 768) split by vocabulary rows costs a
    # partial-sum all-reduce of the embedded batch, (B, T, 768), per step; whole, it costs the
    # sync of its 154 MB gradient, whatever the batch. So small batches split it and large ones
    # keep it whole; the flip lies between 32 and 128 sequences of 1024 tokens. Each side is
    # checked against the search forced to the other layout (--force, solved the same way).
    spec = load_model_spec(MODELS / "dense-100m.yaml")
    hw, mesh = api.load_hardware("h200-8"), Mesh.parse("8")
    seen = {}
    for batch in (32, 128):
        _, gm, _ = make_plan(spec, hw, mesh, batch=batch, stop_after="annotate_cost")
        embed = next(n for n in gm.graph.nodes if info(n).op == "param" and info(n).param.name == "embed.weight")
        ctx = make_context(spec, hw, mesh, batch=batch, strategies=("auto",))
        problem, cands, cls, _ = build_problem(gm, ctx, {}, {})
        found = solve(problem)
        stored, used = cands[cls[embed]][found.choice[cls[embed]]].axes[0]
        seen[batch] = (stored, used)
        other = (Broadcast(),) if isinstance(used, Split) else (Split(0),)
        forced, _, _, _ = build_problem(gm, ctx, {}, {embed.name: other})
        assert solve(forced).time > found.time * (1 + 1e-6), (batch, other)
    assert seen == {32: (Split(0), Split(0)), 128: (Broadcast(), Broadcast())}
