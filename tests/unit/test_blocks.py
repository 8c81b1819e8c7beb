"""Distinct blocks (passes/blocks.py) and the program's block classes (backends/emit_model.py).

The grouping is checked against the spec's own structure written out by hand (which layers share
a block, where a memory layer or a pinned SBP splits one off), and the emitted Model against the
eager module: the same state_dict keys, in a fresh process, holding the same initial values.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import MODELS
from ultraplan import api


def _blocks(plan) -> dict[str, tuple[int, ...]]:
    return {b.name: b.layers for b in plan.blocks}


def test_layer_groups_become_blocks_and_one_loop():
    plan = api.plan(MODELS / "dense-deep-groups.yaml", "2")
    # [wide, narrow] x 4, then wide x 2 whose override (wider FFN, no FFN norm) makes another block
    assert _blocks(plan) == {"WideBlock": (0, 2, 4, 6), "NarrowBlock": (1, 3, 5, 7), "WideBlock2": (8, 9)}
    assert [c.block for c in plan.layer_calls] == ["WideBlock", "NarrowBlock"] * 4 + ["WideBlock2"] * 2
    ((run,),) = (plan.layer_runs,)
    assert (run.start, run.stop, run.carry, run.collected) == (0, 10, ((0, 0),), ())
    for block in plan.blocks:
        assert block.inputs == ("x",) and block.output_names == ("x",) and not block.constants


def test_a_pinned_sbp_splits_a_layer_off():
    plan = api.plan(MODELS / "dense-deep-groups.yaml", "2", force=("layers_2_ffn_up=B",))
    assert _blocks(plan) == {"WideBlock": (0, 4, 6), "NarrowBlock": (1, 3, 5, 7), "WideBlock2": (2,),
                             "WideBlock3": (8, 9)}
    assert len(plan.layer_runs) == 1  # the same call signature: still one loop


def test_memory_layers_get_their_own_block():
    plan = api.plan(MODELS / "ultramem-tiny.yaml", "2")
    assert _blocks(plan) == {"DenseBlock": (0, 2, 4, 5), "MemoryBlock": (1, 3)}
    memory = plan.blocks[1]
    assert memory.output_names == ("x", "ultramem_delayed")  # delivered two layers later, by the Model
    # [dense, memory] twice loops by period 2 (the memory layer returns one more value, so a period
    # of one would break at every layer); layer 3's delivery (model-level) ends the loop
    assert [(r.start, r.stop, r.period) for r in plan.layer_runs] == [(0, 4, 2), (4, 6, 1)]
    run = plan.layer_runs[0]
    # an iteration reads x (input 0); the dense layer's x feeds the memory layer, whose x is carried
    assert run.wiring == ((-1, 0), (0, 0)) and run.carry == ((1, 0),)
    assert run.collected == (2,)  # the delayed memory output, delivered by the Model after layer 3 and 5


def test_alternating_kinds_loop_by_period(tmp_path):
    """Memory+ layers reading a shared table every other layer: one loop of period 2, and the
    program spells it as calls of self.layers[i] and self.layers[i + 1] (the value checked against
    eager by tests/dist/test_multirank.py and test_strategies.py)."""
    plan = api.plan(MODELS / "memory-plus-tiny.yaml", "2", strategy="fsdp")
    ((run,),) = (plan.layer_runs,)
    assert (run.start, run.stop, run.period, run.carry, run.collected) == (0, 4, 2, ((1, 0),), ())
    # the dense layer reads x (input 0); the memory layer the dense layer's x and the shared table (input 1)
    assert run.wiring == ((-1, 0), (0, 0), (-1, 1))
    api.compile(MODELS / "memory-plus-tiny.yaml", "2", tmp_path, strategy="fsdp")
    text = (tmp_path / "program.py").read_text()
    assert "for m, block in enumerate((DenseBlock, MemoryBlock))" in text
    assert "        for i in range(0, 4, 2):\n            x = self.layers[i](x, following=self.layers[i + 1])\n" in text
    assert "            x = self.layers[i + 1](x, memory_tables_pkm_shared_values_B, following=" in text


def test_periods_cover_the_most_layers():
    """The period chosen from each layer is the one whose loop covers the most layers (shortest on a
    tie), a naive search over the calls written out by hand."""
    from ultraplan.passes.blocks import _runs
    from ultraplan.passes.plan import LayerCallPlan

    def calls(kinds: str) -> list[LayerCallPlan]:
        out, x = [], "embed"
        for i, kind in enumerate(kinds):  # "d": x -> x; "m": (x, table) -> x
            out.append(LayerCallPlan(i, kind, f"layers.{i}.", (f"n{i}",), (x, "table") if kind == "m" else (x,),
                                     (f"n{i}",)))
            x = f"n{i}"
        return out

    def shape(kinds: str) -> list[tuple[int, int, int]]:
        return [(r.start, r.stop, r.period) for r in _runs(calls(kinds), {})]

    assert shape("dddd") == [(0, 4, 1)]
    assert shape("dmdmdm") == [(0, 6, 2)]
    assert shape("ddddmdddmdddmddd") == [(0, 4, 1), (4, 16, 4)]  # Memory+ 227M's pattern, shortened
    assert shape("ddmddmddm") == [(0, 9, 3)]
    assert shape("dmd") == [(0, 1, 1), (1, 2, 1), (2, 3, 1)]


def test_ring_tables_are_inputs_and_offsets_constants():
    plan = api.plan(MODELS / "ultramem-v2-tiny.yaml", "2")
    ((block,),) = (plan.blocks,)
    assert block.layers == (0, 1, 2, 3)
    assert "memory_tables_ring_values" in block.inputs and "memory_tables_ring_pre_values" in block.inputs
    assert not any(p.startswith("memory_tables") for p in block.params)
    ((node, attr, values),) = block.constants
    assert node == "layers_0_ultramem_v2_rows"
    own = 8 ** 2  # num_keys^2 rows per layer, layer l starting at l n^2 (compiler/memory_tables.py)
    assert attr == "offset" and values == tuple(own * k for k in range(4))


CHECK = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    import program, runtime
    from ultraplan import api
    from ultraplan.compiler.build import build_model
    mesh, owned = runtime.setup(program.MESH_SHAPE)
    model = program.Model(mesh, 0)
    eager = build_model(api.load(sys.argv[2]), seed=0)
    mine, theirs = model.state_dict(), eager.state_dict()
    same = all(torch.equal(mine[k], theirs[k]) for k in theirs if k in mine)
    shared = len(list(model.parameters())) == len(program.PARAMS)
    print(json.dumps([sorted(mine), sorted(theirs), same, shared]))
    runtime.teardown(owned)
    runtime.finish()
""")


def test_state_dict_keys_are_the_eager_modules(tmp_path):
    """The program's state_dict keys are the eager module's, values equal at init (one device), and
    a ring table shared by four layers is one parameter."""
    for spec in ("ultramem-v2-tiny", "moe-tiny"):
        out = tmp_path / spec
        api.compile(MODELS / f"{spec}.yaml", "1", out)
        result = subprocess.run([sys.executable, "-c", CHECK, str(out), str(MODELS / f"{spec}.yaml")],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        mine, theirs, same, shared = json.loads(result.stdout.strip().splitlines()[-1])
        assert mine == theirs and same and shared, spec
