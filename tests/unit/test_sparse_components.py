"""MoE, PKM and PEER against naive implementations: loops over tokens and heads, and full scoring
of every one of the n^2 slots instead of product-key top-k (the two must select the same slots)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ultraplan.compiler.build import build_model
from ultraplan.compiler.node_info import info

from tests.conftest import MODELS
from ultraplan import load

torch.manual_seed(0)
TOL = dict(rtol=1e-5, atol=1e-7)  # fp32: only the order of the sums differs (outputs ~1e-4 and up)


def sublayer(spec_name: str, kind: str):
    spec = load(MODELS / f"{spec_name}.yaml")
    model = build_model(spec, seed=3)
    for block in model.layers:
        if kind in block:
            return block[kind]
    raise AssertionError(f"no {kind} in {spec_name}")


def routed(moe, h: torch.Tensor) -> torch.Tensor:
    """The MoE's output without its balance loss."""
    out = moe.body(h)
    return out[0] if isinstance(out, tuple) else out


def naive_retrieval(module, x: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Score all n^2 slots of one head for one token vector x; return (top-k scores, slots)."""
    s = module.spec
    q = (module.w_query @ x).view(s.heads, 2, s.key_dim // 2)[head]
    row = module.keys[head, 0] @ q[0]  # (n,)
    col = module.keys[head, 1] @ q[1]
    full = (row[:, None] + col[None, :]).flatten()  # slot i*n + j
    scores, slots = torch.topk(full, s.topk)
    return scores, slots


def test_pkm_equals_naive_full_scoring():
    pkm = sublayer("pkm-tiny", "pkm")
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = pkm.body(h)
        for b in range(2):
            for t in range(5):
                expected = torch.zeros(32)
                for head in range(pkm.spec.heads):
                    scores, slots = naive_retrieval(pkm, h[b, t], head)
                    weights = torch.softmax(scores, dim=0)
                    for w, slot in zip(weights, slots):
                        expected += w * pkm.values[slot]
                torch.testing.assert_close(out[b, t], expected, **TOL)


def test_peer_equals_naive_experts():
    peer = sublayer("peer-tiny", "peer")
    h = torch.randn(2, 4, 32)
    with torch.no_grad():
        out = peer.body(h)
        for b in range(2):
            for t in range(4):
                x = h[b, t]
                expected = torch.zeros(32)
                for head in range(peer.spec.heads):
                    scores, slots = naive_retrieval(peer, x, head)
                    gates = torch.softmax(scores, dim=0)
                    for g, slot in zip(gates, slots):
                        expected += g * F.gelu(peer.down[slot] @ x, approximate="tanh") * peer.up[slot]
                torch.testing.assert_close(out[b, t], expected, **TOL)


def test_moe_equals_naive_per_token_loop():
    moe = sublayer("moe-tiny", "moe")
    s = moe.spec
    h = torch.randn(3, 4, 32)
    with torch.no_grad():
        out = routed(moe, h)
        for b in range(3):
            for t in range(4):
                x = h[b, t]
                probs = torch.softmax(moe.w_router @ x, dim=0)
                gates, experts = torch.topk(probs, s.topk)
                expected = torch.zeros(32)
                for g, e in zip(gates, experts):
                    hidden = F.silu(moe.w_gate[e] @ x) * (moe.w_up[e] @ x)
                    expected += g * (moe.w_down[e] @ hidden)
                shared = F.silu(moe.w_shared_gate @ x) * (moe.w_shared_up @ x)
                expected += moe.w_shared_down @ shared
                torch.testing.assert_close(out[b, t], expected, **TOL)


def test_moe_is_dropless_and_batch_independent():
    """A token's output is the same alone or in any batch (no capacity, no dropping)."""
    moe = sublayer("moe-tiny", "moe")
    h = torch.randn(4, 6, 32)
    with torch.no_grad():
        together = routed(moe, h)
        for b in range(4):
            torch.testing.assert_close(routed(moe, h[b:b + 1])[0], together[b], **TOL)


def test_gradients_reach_only_the_selected_rows():
    for spec_name, kind, tables in (("pkm-tiny", "pkm", ("values",)), ("peer-tiny", "peer", ("down", "up"))):
        module = sublayer(spec_name, kind)
        h = torch.randn(2, 3, 32)
        _, slots = module.retrieve(h)
        module.body(h).square().sum().backward()
        selected = torch.zeros(module.spec.num_keys ** 2, dtype=torch.bool)
        selected[slots.flatten()] = True
        for table in tables:
            grad = getattr(module, table).grad
            touched = grad.abs().sum(dim=1) > 0
            assert torch.equal(touched, selected), (kind, table)
            assert 0 < int(selected.sum()) < selected.numel()


def test_moe_gradients_reach_only_chosen_experts():
    moe = sublayer("moe-tiny", "moe")
    h = torch.randn(1, 2, 32)  # 2 tokens x 4 of 16 experts: most experts unused
    chosen = torch.topk(torch.softmax(h @ moe.w_router.T, dim=-1), moe.spec.topk).indices.unique()
    routed(moe, h).sum().backward()
    used = moe.w_up.grad.flatten(1).abs().sum(dim=1) > 0
    assert sorted(torch.nonzero(used).flatten().tolist()) == sorted(chosen.tolist())


def test_balance_loss_equals_the_switch_definition():
    """alpha * E * sum_i f_i P_i with f_i = (assignments to i) / (tokens * k), P_i = mean prob of i."""
    moe = sublayer("moe-tiny", "moe")
    s = moe.spec
    h = torch.randn(3, 5, 32)
    _, aux = moe.body(h)
    probs = torch.softmax(h @ moe.w_router.T, dim=-1).reshape(-1, s.experts)
    chosen = torch.topk(probs, s.topk).indices
    tokens = probs.shape[0]
    expected = 0.0
    for i in range(s.experts):
        f_i = float((chosen == i).sum()) / (tokens * s.topk)
        expected += f_i * probs[:, i].mean()
    torch.testing.assert_close(aux, s.aux_loss_weight * s.experts * expected, rtol=1e-5, atol=1e-8)


def test_balance_loss_trains_the_router_and_is_in_the_graph():
    moe = sublayer("moe-tiny", "moe")
    _, aux = moe.body(torch.randn(2, 4, 32))
    aux.backward()
    assert moe.w_router.grad.abs().sum() > 0 and moe.w_up.grad is None  # only the router shapes the balance
    from ultraplan.passes.pipeline import lower_spec

    gm = lower_spec(load(MODELS / "moe-tiny.yaml"))
    ops_seen = [info(n).op for n in gm.graph.nodes]
    assert ops_seen.count("balance_loss") == 2 and ops_seen.count("expert_counts") == 2
    assert [n.name for n in gm.graph.nodes if info(n).op == "add"][-1] == "loss_with_aux_1"


def test_memory_plus_layers_share_one_table_and_gate_their_output():
    spec = load(MODELS / "memory-plus-tiny.yaml")
    model = build_model(spec, seed=7)
    first, second = model.layers[1]["pkm"], model.layers[3]["pkm"]
    table = model.memory_tables["pkm_shared"].values
    assert first._table[0].values is table and second._table[0].values is table
    assert not hasattr(first, "values") and tuple(table.shape) == (256, 32)
    h = torch.randn(2, 3, 32)
    with torch.no_grad():
        out = second.body(h)
        for b in range(2):
            for t in range(3):
                pooled = torch.zeros(32)
                q = (second.w_query @ h[b, t]).view(2, 2, 8)
                q = F.layer_norm(q, (8,), second.query_norm_weight, second.query_norm_bias, 1e-5)
                for head in range(2):
                    full = (second.keys[head, 0] @ q[head, 0])[:, None] + (second.keys[head, 1] @ q[head, 1])[None, :]
                    scores, slots = torch.topk(full.flatten(), 8)
                    for w, slot in zip(torch.softmax(scores, dim=0), slots):
                        pooled += w * table[slot]
                gate = F.silu(second.w_gate @ h[b, t])
                torch.testing.assert_close(out[b, t], second.w_out @ (pooled * gate), **TOL)
