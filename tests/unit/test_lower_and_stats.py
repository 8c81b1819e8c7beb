"""Lowering shapes against real torch runs; stats against sum(numel) and FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode
from ultraplan.compiler.build import build_model
from ultraplan.compiler.lower import lower
from ultraplan.compiler.node_info import info
from ultraplan.compiler.shapes import B, T
from ultraplan.passes.stats import spec_stats

from tests.conftest import MODELS, RUNNABLE_SPECS
from ultraplan import load


class _Recorder(fx.Interpreter):
    """Runs the graph on real tensors and records every node's output shape."""

    def __init__(self, gm):
        super().__init__(gm)
        self.shapes = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n.name] = tuple(out.shape)
        return out


@pytest.mark.parametrize("name", RUNNABLE_SPECS)
@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 5), (3, 16)])
def test_symbolic_shapes_equal_traced_shapes(name, batch, seq):
    spec = load(MODELS / f"{name}.yaml")
    gm = lower(build_model(spec, seed=0))
    tokens = torch.randint(0, spec.vocab_size, (batch, seq + 1))
    rec = _Recorder(gm)
    loss = rec.run(tokens[:, :-1], tokens[:, 1:])
    assert loss.ndim == 0
    checked = 0
    for node in gm.graph.nodes:
        if node.name in rec.shapes:
            symbolic = tuple(int(d.subs({B: batch, T: seq})) for d in info(node).shape)
            assert symbolic == rec.shapes[node.name], node.name
            checked += 1
    assert checked == len(rec.shapes) > 20


@pytest.mark.parametrize("name", RUNNABLE_SPECS)
def test_lowered_graph_computes_the_eager_loss(name):
    spec = load(MODELS / f"{name}.yaml")
    model = build_model(spec, seed=1)
    gm = lower(model)
    tokens = torch.randint(0, spec.vocab_size, (2, spec.seq_len + 1))
    logits, aux_losses = model.forward_with_aux(tokens[:, :-1])
    eager = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    for aux in aux_losses:  # in the training graph's order: (loss + a1) + a2, not loss + (0 + a1 + a2)
        eager = eager + aux
    assert torch.equal(gm(tokens[:, :-1], tokens[:, 1:]), eager)


def test_every_op_is_its_own_node():
    gm = lower(build_model(load(MODELS / "dense-tiny.yaml"), device="meta"))
    ops = [info(n).op for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count("causal_attention") == 2 and ops.count("rope") == 4 and ops.count("linear") == 2 * 7 + 1
    names = [n.name for n in gm.graph.nodes]
    assert "layers_1_attention_q" in names and "layers_0_ffn_w_gate" in names and "logits" in names


@pytest.mark.parametrize("name", RUNNABLE_SPECS)
def test_param_count_equals_eager(name):
    spec = load(MODELS / f"{name}.yaml")
    model = build_model(spec, seed=0)
    stats = spec_stats(spec)
    assert stats.params == sum(p.numel() for p in model.parameters())
    if name.startswith("dense"):
        assert stats.active_params == stats.params
    else:
        assert stats.active_params < stats.params


@pytest.mark.parametrize("name", RUNNABLE_SPECS)
@pytest.mark.parametrize("batch,seq", [(1, 7), (2, 16)])
def test_flops_equal_flop_counter_mode(name, batch, seq):
    spec = load(MODELS / f"{name}.yaml")
    model = build_model(spec, seed=0)
    tokens = torch.randint(0, spec.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(tokens)
    per_token = spec_stats(spec).flops_per_token.subs(T, seq)
    assert per_token * batch * seq == counter.get_total_flops()


def test_tied_embedding_counted_once():
    spec = load(MODELS / "dense-gqa-tied.yaml")
    stats = spec_stats(spec)
    d, v = spec.hidden_size, spec.vocab_size
    per_layer = (64 * 64 + 16 * 64 * 2 + 64 * 64) + (2 * 128 * 64) + 4 * 64  # attn, ffn, 2 layer norms
    assert stats.params == v * d + 3 * per_layer + 2 * d


def test_tensor_args_keep_repeated_inputs():
    """fx's all_input_nodes de-duplicates; an op fed one value twice must keep both arguments."""
    from ultraplan.compiler import ops
    from ultraplan.compiler.lower import tensor_args

    class Double(torch.nn.Module):
        def forward(self, x):
            return ops.add(x, x)

    graph = fx.Tracer(autowrap_modules=(ops,)).trace(Double())
    node = next(n for n in graph.nodes if n.op == "call_function")
    assert len(node.all_input_nodes) == 1
    assert [a.name for a in tensor_args(node)] == ["x", "x"]
