"""UltraMemV2 against a naive per-token, per-head loop implementation of TDQKR, shuffling,
pre-value gates and multi-core pooling; the rank-1 state; and the block structures it needs."""

from __future__ import annotations

import math
import textwrap

import torch
import torch.nn.functional as F
from ultraplan.compiler import ops
from ultraplan.compiler.build import build_model, refresh_state

from tests.conftest import MODELS
from ultraplan import load

TOL = dict(rtol=1e-5, atol=1e-7)  # fp32; the naive loops sum in another order (outputs are ~1e-5..1e-3)


def naive_norm(mem, which: str, x: torch.Tensor) -> torch.Tensor:
    """The query or key norm over the last dim: LayerNorm with bias or RMSNorm with a weight only."""
    weight = getattr(mem, f"{which}_norm_weight")
    if mem.norm_kinds[which] == "layer":
        return F.layer_norm(x, (x.shape[-1],), weight, getattr(mem, f"{which}_norm_bias"), 1e-5)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight


def naive_retrieval(mem, x: torch.Tensor) -> list[list[tuple[int, list[float]]]]:
    """One token, per head: the m best (slot, per-core scores), by loops over ranks and the grid."""
    s = mem.spec
    n, dk = s.effective_keys, s.key_dim
    q = (mem.w_query @ x).view(mem.query_heads, 2, mem.query_ranks, dk)
    q = naive_norm(mem, "query", q)
    keys = naive_norm(mem, "key", mem.keys)
    per_head = []
    for h in range(s.heads):
        qh = q[h * mem.query_heads // s.heads]  # heads h share query h // (heads / query heads)
        scores = torch.zeros(2, s.rank, n)
        for half in range(2):
            for r in range(s.rank):
                scores[half, r] = keys[h, half, r] @ qh[half, r if mem.query_ranks > 1 else 0]
        u, t = mem.rank_one[0, h], mem.rank_one[1, h]
        rows_best = torch.topk(u @ scores[0], s.topk).indices
        cols_best = torch.topk(t @ scores[1], s.topk).indices
        candidates = []
        for i in rows_best.tolist():
            for j in cols_best.tolist():
                per_core = [float(scores[0, :, i] @ mem.cores[h, c] @ scores[1, :, j]) for c in range(s.cores)]
                candidates.append((sum(per_core), i * n + j, per_core))
        candidates.sort(key=lambda c: -c[0])
        per_head.append([(slot, per_core) for _, slot, per_core in candidates[: s.topk]])
    return per_head


def naive_ultramem_v2(mem, x: torch.Tensor) -> torch.Tensor:
    """One token: shuffled rows of the (shared) table, pre-value gates, multi-core pooling."""
    s = mem.spec
    table = mem._table[0]
    pre = mem.w_pre @ x if s.pre_value_dim else None
    chunk = s.value_dim // s.cores
    pooled = torch.zeros(s.value_dim)
    for selected in naive_retrieval(mem, x):
        for slot, per_core in selected:
            row = (int(mem.shuffle[slot]) + mem.offset) % mem.table_rows
            gate = float(table.pre_values[row] @ pre) if pre is not None else 1.0
            for c in range(s.cores):
                pooled[c * chunk:(c + 1) * chunk] += per_core[c] * gate * table.values[row, c * chunk:(c + 1) * chunk]
    return mem.w_out @ pooled


def naive_ultramem(mem, x: torch.Tensor) -> torch.Tensor:
    """One token: implicit value expansion (virtual row -> block, physical row) and MCS pooling."""
    s = mem.spec
    rows = s.num_keys**2
    chunk = s.value_dim // s.cores
    pooled = torch.zeros(s.expansion, s.value_dim)
    for selected in naive_retrieval(mem, x):
        for slot, per_core in selected:
            virtual = int(mem.shuffle[slot])
            block, row = virtual // rows, virtual % rows
            for c in range(s.cores):
                pooled[block, c * chunk:(c + 1) * chunk] += per_core[c] * mem.values[row, c * chunk:(c + 1) * chunk]
    return mem.w_out @ pooled.flatten()


def test_ultramem_equals_naive_loops():
    model = build_model(load(MODELS / "ultramem-tiny.yaml"), seed=4)
    mem = model.layers[1]["ultramem"]
    assert mem.query_heads == 1 and mem.spec.effective_keys == 24 and mem.shuffle.numel() == 4 * 144
    h = torch.randn(2, 3, 32)
    with torch.no_grad():
        out = mem.body(h)
        for b in range(2):
            for t in range(3):
                torch.testing.assert_close(out[b, t], naive_ultramem(mem, h[b, t]), **TOL)


def test_ultramem_v2_equals_naive_loops():
    model = build_model(load(MODELS / "ultramem-v2-tiny.yaml"), seed=5)
    h = torch.randn(2, 3, 32)
    with torch.no_grad():
        for layer in (0, 3):  # the ring wraps around for the last layer
            mem = model.layers[layer]["ultramem_v2"]
            out = mem.body(h)
            for b in range(2):
                for t in range(3):
                    torch.testing.assert_close(out[b, t], naive_ultramem_v2(mem, h[b, t]), **TOL)


def test_query_per_rank_and_heads_equal_naive(write_spec):
    text = (MODELS / "ultramem-v2-tiny.yaml").read_text().replace(
        "share: ring, share_layers: 2,", "heads: 2, query_per_rank: true, share: block, share_layers: 2,")
    model = build_model(load(write_spec(text)), seed=6)
    mem = model.layers[1]["ultramem_v2"]
    h = torch.randn(1, 2, 32)
    with torch.no_grad():
        out = mem.body(h)
        for t in range(2):
            torch.testing.assert_close(out[0, t], naive_ultramem_v2(mem, h[0, t]), **TOL)


def test_ring_and_block_tables():
    model = build_model(load(MODELS / "ultramem-v2-tiny.yaml"), device="meta")
    assert list(model.memory_tables) == ["ring"] and tuple(model.memory_tables.ring.values.shape) == (4 * 64, 24)
    offsets = [model.layers[i]["ultramem_v2"].offset for i in range(4)]
    assert offsets == [0, 64, 128, 192] and model.layers[0]["ultramem_v2"].spec.effective_keys == 11


def test_rank_one_vectors_are_the_leading_singular_pair():
    cores = torch.rand(3, 2, 4, 4)
    u, t = ops.rank_one_vectors(cores, torch.zeros(2, 3, 4))  # no previous sign: largest |u_i| positive
    summed = cores.sum(dim=1)
    for h in range(3):
        sigma = torch.linalg.svdvals(summed[h])[0]
        torch.testing.assert_close(summed[h] @ t[h], sigma * u[h], rtol=1e-5, atol=1e-5)
        assert abs(float(u[h].norm()) - 1) < 1e-6 and u[h][u[h].abs().argmax()] > 0


def test_refresh_state_follows_the_cores():
    model = build_model(load(MODELS / "ultramem-v2-tiny.yaml"), seed=0)
    mem = model.layers[0]["ultramem_v2"]
    with torch.no_grad():
        mem.cores.mul_(torch.rand_like(mem.cores))
    stale = mem.rank_one.clone()
    refresh_state(model)
    assert not torch.equal(stale, mem.rank_one)
    torch.testing.assert_close(mem.rank_one, ops.rank_one_vectors(mem.cores, stale))


def test_rank_one_sign_follows_the_previous_step():
    """Two entries of u nearly equal in size: the largest-entry rule would flip u between steps as
    they trade places; keeping the previous step's sign (the official code's rule) does not."""
    core = torch.tensor([[[[1.0, 0.0], [0.0, 0.2]]]]).expand(1, 2, 2, 2).clone()
    angles = (-0.7853, -0.7855)  # u = (cos, sin): |u_0| > |u_1| first, then |u_1| > |u_0|
    rotate = [torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) for a in angles]
    state = ops.rank_one_vectors(rotate[0] @ core @ rotate[0].T, torch.zeros(2, 1, 2))
    following = ops.rank_one_vectors(rotate[1] @ core @ rotate[1].T, state)
    assert (following[0] * state[0]).sum() > 0.99  # continuous: u moved by a hair, not negated
    torch.testing.assert_close(ops.rank_one_vectors(rotate[1] @ core @ rotate[1].T, -state), -following)


STRUCTURE = textwrap.dedent("""\
    model:
      vocab_size: 16
      hidden_size: 8
      seq_len: 4
      blocks:
        b:
          - ffn: {hidden: 8, name: first}
          - ffn: {hidden: 8, name: beside, parallel: true}
          - ffn: {hidden: 8, name: later, deliver_after: 1}
      layers:
        - {block: b}
        - {block: b, override: {later.deliver_after: 0}}
    """)


def test_parallel_and_delivered_sublayers(write_spec):
    model = build_model(load(write_spec(STRUCTURE)), seed=2)
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        def run(layer, x):
            blk = model.layers[layer]
            normed = blk["first"].norm(x)
            x = x + blk["first"].body(normed) + blk["beside"].body(normed)  # beside shares the normed input
            return x, blk["later"].body(blk["later"].norm(x))
        x0, delayed0 = run(0, x)
        x1, now1 = run(1, x0)
        expected = x1 + now1 + delayed0  # layer 0's "later" arrives after layer 1
        got = model.layers[1](model.layers[0](x, pending := {}), pending)
        torch.testing.assert_close(got + pending.pop(1)[0], expected)


def paper_config(**changes):
    import dataclasses

    spec = load(MODELS / "ultramem-v2-tiny.yaml")
    return dataclasses.replace(spec.layers[0].sublayers[2].config, init="paper", **changes)


def test_paper_gain_makes_the_mean_selected_score_one():
    """Independent simulations (other seeds) at the chosen gain average to 1 within 10%."""
    from ultraplan.compiler.components.ultramem_init import paper_init, simulate_scores

    config = paper_config()
    init = paper_init(config, hidden=32, ffn_inner=64, num_layers=4)
    means = [simulate_scores(config, gain=init.norm_gain, seed=seed)[0] for seed in (1, 2, 3)]
    assert abs(sum(means) / 3 - 1) < 0.1, means


def test_paper_value_std_solves_eq_22_equal_to_the_ffn_variance():
    """sigma_V is the fourth root: eq. 22 with it equals the FFN's 0.064 k_inner / (2 L) exactly
    (with the printed eq. 26 taken as sigma_V^2 it would not)."""
    from ultraplan.compiler.components.ultramem_init import paper_init

    config = paper_config()
    hidden, inner, layers = 32, 64, 4
    init = paper_init(config, hidden=hidden, ffn_inner=inner, num_layers=layers)
    sigma_mem2 = (0.16 * (1 + init.score_variance) * init.value_std**4 * config.pre_value_dim * config.topk
                  * config.heads * config.value_dim / hidden)
    target = 0.064 * (inner / hidden) / (2 * layers)
    assert abs(sigma_mem2 / target - 1) < 1e-12
    printed = init.value_std**4  # what eq. 26 prints as sigma_V^2
    assert abs(0.16 * (1 + init.score_variance) * printed**2 * config.pre_value_dim * config.topk
               * config.heads * config.value_dim / hidden / target - 1) > 0.5


def test_paper_init_is_applied(write_spec):
    text = (MODELS / "ultramem-v2-tiny.yaml").read_text().replace("share: ring,", "init: paper, share: ring,")
    model = build_model(load(write_spec(text)), seed=0).requires_grad_(False)
    mem = model.layers[0]["ultramem_v2"]
    table = model.memory_tables.ring
    assert abs(float(table.values.std()) / mem.paper.value_std - 1) < 0.05
    assert abs(float(table.pre_values.std()) / mem.paper.value_std - 1) < 0.1
    assert torch.all(mem.query_norm_weight == mem.paper.norm_gain) and torch.all(mem.key_norm_weight == mem.paper.norm_gain)
    assert abs(float(mem.w_query.std()) / (2 / (5 * 32)) ** 0.5 - 1) < 0.05


def test_paper_init_needs_pre_values(write_spec):
    from ultraplan.compiler.errors import SpecError

    text = (MODELS / "ultramem-v2-tiny.yaml").read_text().replace("pre_value_dim: 8,", "init: paper,")
    try:
        load(write_spec(text))
    except SpecError as err:
        assert err.path[-1] == "init" and "pre_value_dim > 0" in err.message
    else:
        raise AssertionError("expected a SpecError")


def test_gradients_reach_only_the_selected_rows():
    """Through top-m, the shuffle and the gather, a value (and pre-value) row gets a gradient iff the
    naive retrieval selected it for some token (rows mapped as the naive implementations map them)."""
    h = torch.randn(2, 3, 32)
    tokens = [h[b, t] for b in range(2) for t in range(3)]
    v2 = build_model(load(MODELS / "ultramem-v2-tiny.yaml"), seed=7).layers[3]["ultramem_v2"]
    v1 = build_model(load(MODELS / "ultramem-tiny.yaml"), seed=7).layers[1]["ultramem"]
    v1_rows = v1.spec.num_keys**2
    cases = ((v2, [v2._table[0].values, v2._table[0].pre_values],
              lambda slot: (int(v2.shuffle[slot]) + v2.offset) % v2.table_rows),
             (v1, [v1.values], lambda slot: int(v1.shuffle[slot]) % v1_rows))
    for mem, tables, row_of in cases:
        with torch.no_grad():
            chosen = {row_of(slot) for x in tokens for head in naive_retrieval(mem, x) for slot, _ in head}
        mem.body(h).square().sum().backward()
        for table in tables:
            touched = {int(i) for i in torch.nonzero(table.grad.abs().sum(dim=1)).flatten()}
            assert touched == chosen, type(mem).__name__
            assert 0 < len(chosen) < table.shape[0]


OFFICIAL_OPTIONS = ("key_expand: 2, key_balance_weight: 0.01, official_query: true, query_norm: rms, key_norm: rms, "
                    "query_norm_bias: true, key_norm_bias: false, ")


def test_official_options_count_lower_and_cost_as_torch_does(write_spec):
    """Key expansion, the key-balance loss, the official query projection and a biased RMS query norm:
    the parameter count against a closed form (E n' keys per half, 2 rank D_k query rows), FLOPs
    against FlopCounterMode, the lowered graph's loss against eager (cross entropy + the balance losses)."""
    from torch.utils.flop_counter import FlopCounterMode
    from ultraplan.compiler.lower import lower
    from ultraplan.compiler.shapes import T
    from ultraplan.passes.stats import spec_stats

    text = (MODELS / "ultramem-v2-tiny.yaml").read_text().replace("share: ring,", OFFICIAL_OPTIONS + "share: ring,")
    spec = load(write_spec(text))
    model = build_model(spec, seed=4)
    mem = model.layers[0]["ultramem_v2"]
    s, d = mem.spec, spec.hidden_size
    n_keys = 2 * math.isqrt(2 * 8**2)  # E floor(sqrt(g) n) = 2 * 11
    assert s.effective_keys == n_keys and mem.shuffle.numel() == n_keys**2
    dense = (2 * 2 * 16 * d + 2 * 2 * n_keys * 16 + 2 * 2 * 2 + 16 + 16 + 16  # query rows, keys, cores, norms
             + 8 * d + d * 24)  # W_pre, W_out (D_v wide: the E^2 virtual slots are summed)
    assert mem.norm is None and sum(p.numel() for p in mem.parameters()) == dense  # parallel: the block's norm
    stats = spec_stats(spec)
    assert stats.params == sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, spec.vocab_size, (2, 9))
    with FlopCounterMode(display=False) as counter:
        model(tokens[:, :-1])
    assert stats.flops_per_token.subs(T, 8) * 16 == counter.get_total_flops()
    logits, aux = model.forward_with_aux(tokens[:, :-1])
    assert len(aux) == 4 and all(float(a.detach()) > 0 for a in aux)
    eager = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    for a in aux:
        eager = eager + a
    assert torch.equal(lower(model)(tokens[:, :-1], tokens[:, 1:]), eager)


def test_official_query_and_new_fields_are_checked(write_spec):
    """official_query only where the official layout runs; key_expand and the bias fields typed."""
    import pytest
    from ultraplan.compiler.errors import SpecError
    from ultraplan.compiler.validate import load_model_spec

    base = (MODELS / "ultramem-v2-tiny.yaml").read_text().replace("rank: 2,", "")
    huge_query = ("key_dim: 16,", "key_dim: 1000000000000,"), ("hidden_size: 32", "hidden_size: 4000000")
    for fields, words, edits in (("official_query: true, query_per_rank: true, ", "exclude each other", ()),
                                 ("official_query: true, rank: 3, ", "needs rank 2", ()),
                                 ("official_query: true, heads: 3, ", "1, 2 or 4 heads", ()),
                                 ("key_expand: 0, ", "key_expand", ()),
                                 ("key_balance_weight: -1, ", "key_balance_weight", ()),
                                 ("query_norm_bias: maybe, ", "query_norm_bias", ()),
                                 ("key_expand: 3000000000, ", "slot shuffle", ()),  # (E n')^2 past 2^63 bytes
                                 ("official_query: true, ", "query projection", huge_query)):
        text = base.replace("share: ring,", fields + "share: ring,")
        for old, new in edits:
            text = text.replace(old, new)
        with pytest.raises(SpecError) as info:
            load_model_spec(write_spec(text))
        assert words in str(info.value), (fields, str(info.value))
    load_model_spec(write_spec(base.replace("share: ring,", "official_query: true, heads: 4, share: ring,")))
