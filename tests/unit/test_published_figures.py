"""Parameter counts of the paper configurations (specs/models/paper/) against the official code's
shapes and the published figures (building, naming and planning them: test_large_specs.py).

Each paper test does two things:

1. It counts the OFFICIAL implementation's parameters in closed form, tensor by tensor, from the
   shapes in the code the runs used (ByteDance's OLMo fork: olmo/model.py, olmo/ultramem_layer.py,
   olmo/ultramem_layer_v2.py, olmo/memory_plus_layer.py, megablocks' dMoE via
   olmo/config.py:config_to_moe_args), and asserts that ``ultraplan stats`` of our spec equals that
   count exactly, up to the listed tensors our schema cannot express. This pins every
   hyperparameter of the spec, not just a total.
2. It compares with the published numbers (UltraMemV2, arXiv 2508.18756, Appendix C Table 10: "act
   param(M)" and "total param(B)"). Table 10 states no counting rule. Its OLMoE rows are reproduced
   exactly by: total WITHOUT the token embedding / LM head; activated WITHOUT the MoE router, WITH
   the (tied) embedding for the 227M group and WITHOUT the (untied) embeddings for the 1B/7B group.
   Evidence: OLMoE-1B/7B's own paper reports 6.9B / 1.3B with embeddings, Table 10 6.71B / 1070M;
   OLMoE-227M's activated count is 189.8M without the embedding, Table 10 says 227M. The memory
   rows cannot be matched under that rule with the official shapes (227M rows 0.6-5.9% above, the
   1B/7B total 7.2% below; explained per
   test); there the tolerance is the measured gap, stated and justified, and the config is left
   as published rather than fitted.

Accounting of ours (docs/accounting.md): the embedding is counted whole in ``active_params``; top-k
rows of value tables and k of E experts are activated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

from ultraplan.compiler.memory_specs import PKMSpec, UltraMemSpec, UltraMemV2Spec
from ultraplan.compiler.validate import load_model_spec
from ultraplan.passes.stats import spec_stats

from tests.conftest import MODELS

PAPER = MODELS / "paper"
VOCAB = 50304  # embedding rows: vocab 50280 padded to embedding_size 50304 (OLMoE-1B-7B-0906_reproduce.yml)
M, B = 10**6, 10**9


@cache
def spec(path: str):
    return load_model_spec(path)


@cache
def stats(name: str):
    return spec_stats(spec(str(PAPER / f"{name}.yaml")))


def rounds_to(value: float, published: float, unit: float) -> bool:
    """``value`` prints as ``published`` when rounded to ``unit`` (227 at 1e6: [226.5e6, 227.5e6))."""
    return (published - unit / 2) <= value < (published + unit / 2)


def rel_gap(value: float, published: float) -> float:
    return value / published - 1


def memory_layers(s, kind: type) -> list[tuple[int, object]]:
    return [(layer.index, sub) for layer in s.layers for sub in layer.sublayers if isinstance(sub.config, kind)]


@dataclass
class Official:
    """Closed-form parameter count of an official model (no tensor built)."""

    total: int
    active: int  # one token's reads: embedding whole, k experts / h*m value rows, everything else
    embedding: int  # wte, plus the LM head when untied
    router: int = 0
    qk_norm: int = 0  # attention q_norm + k_norm weights (per-head size in ByteDance's fork)

    @property
    def total_non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


def olmo_block(d: int, heads: int, ffn_inner: int = 0) -> tuple[int, int]:
    """(parameters, q/k-norm parameters) of one OLMo block without its MoE/memory: fused qkv and the
    output projection (no biases), attn_norm and ff_norm (RMS, weight only), per-head q/k norms
    (olmo/model.py builds them with size d_model // n_heads), a dense SwiGLU FFN of inner width
    ``ffn_inner`` (ff_proj d -> 2 inner, ff_out inner -> d)."""
    return 4 * d * d + 2 * d + 3 * d * ffn_inner, 2 * (d // heads)


def olmoe(d: int, layers: int, heads: int, experts: int, topk: int, inner: int, tied: bool) -> Official:
    block, qk = olmo_block(d, heads)
    router, expert = experts * d, 3 * d * inner  # megablocks: router d -> E; w1, v1, w2 per expert
    embedding = VOCAB * d * (1 if tied else 2)
    total = layers * (block + qk + router + experts * expert) + d + embedding  # + ln_f
    active = layers * (block + qk + router + topk * expert) + d + embedding
    return Official(total, active, embedding, router=layers * router, qk_norm=layers * qk)


def ultramem_v2(d: int, layers: int, heads: int, ffn: int, n: int, dk: int, dv: int, dp: int, m: int,
                q_per_rank: bool, share_ratio: float, tied: bool, mem_heads: int = 1, rank: int = 2,
                cores: int = 2) -> tuple[Official, int]:
    """Every block has an FFN and a memory layer (mem_insert_way='full'); olmo/ultramem_layer_v2.py.
    Returns the count and n' (keys per half a layer addresses). ``q_per_rank``: the query projection is
    2 rank Dk wide (the official mem_q_for_each_tucker_rank, :119), else 2 Dk."""
    block, qk = olmo_block(d, heads, ffn)
    n_eff = int((n * n * layers * share_ratio) ** 0.5)  # the code's knum = int((all_value_num * share_ratio) ** 0.5)
    dense = (d * 2 * dk * (rank if q_per_rank else 1)  # query_proj
             + mem_heads * 2 * n_eff * dk * rank  # keys [head, 2, key_num, kdim, tucker_rank]
             + cores * mem_heads * rank * rank  # tucker_core
             + 2 * dk  # query_norm, keys_norm (RMS, weight only)
             + d * dp + dv * d)  # pre_values_proj, values_proj
    table = layers * n * n * (dv + dp)  # full_memory_layer: values_for_look_up, pre_values_for_look_up
    embedding = VOCAB * d * (1 if tied else 2)
    total = layers * (block + qk + dense) + table + d + embedding
    active = layers * (block + qk + dense + mem_heads * m * (dv + dp)) + d + embedding
    return Official(total, active, embedding, qk_norm=layers * qk), n_eff


# --- the 227M / 1.2B group (20 layers, hidden 768, 12 heads, tied embeddings) ---------------------

def test_olmoe_227m_matches_table_10_exactly():
    """OLMoE-227M/1.2B: our stats equal the official module but for the attention QK-norm; Table 10's
    227M / 1.18B are reproduced exactly with the router left out of the activated count."""
    s = stats("olmoe-227m-1.2b")
    off = olmoe(d=768, layers=20, heads=12, experts=64, topk=8, inner=384, tied=True)
    assert s.params == off.total - off.qk_norm
    assert s.active_params == off.active - off.qk_norm
    assert s.params_non_embedding == off.total_non_embedding - off.qk_norm
    assert rounds_to(off.total_non_embedding, 1.18 * B, 0.01 * B)  # 1.1807B
    assert rounds_to(off.active - off.router, 227 * M, M)  # 227.41M; with the router 228.39M


def test_ultramem_v2_227m():
    """UltraMemV2-227M/1.2B. Our stats equal the official module up to the QK-norm we lack (-20 * 128);
    the memory's query/key norms are RMSNorms with a weight only, as the official ones. Ring sharing:
    20 layers' 360^2-row shares in one table, each layer addressing share_ratio 0.5 of it, n' = 1138 keys per half.

    Published 225M activated / 1.18B total. Under the OLMoE rows' rule (total without, activated with
    the tied embedding) the official module has 230.4M / 1.1869B: +2.4% / +0.6%. No rule we tried
    closes the activated gap (leaving out keys: 212.9M; leaving out query/pre/out projections:
    218.6M; without the embedding: 191.8M), and every hyperparameter is fixed by the published script,
    so the spec is not adjusted. Tolerances: 2.5% activated, 0.6% total (the measured gaps).
    """
    s = stats("ultramem-v2-227m-1.2b")
    off, n_eff = ultramem_v2(d=768, layers=20, heads=12, ffn=2496, n=360, dk=192, dv=192, dp=192, m=32,
                             q_per_rank=False, share_ratio=0.5, tied=True)
    mems = memory_layers(spec(str(PAPER / "ultramem-v2-227m-1.2b.yaml")), UltraMemV2Spec)
    assert [i for i, _ in mems] == list(range(20)) and all(sub.parallel for _, sub in mems)
    assert {sub.config.effective_keys for _, sub in mems} == {n_eff} == {1138}
    assert s.params == off.total - off.qk_norm
    assert s.active_params == off.active - off.qk_norm
    assert 0 < rel_gap(off.active, 225 * M) <= 0.025
    assert 0 < rel_gap(off.total_non_embedding, 1.18 * B) <= 0.006


def test_ultramem_227m():
    """UltraMem-227M/1.2B: 4 UltraMem layers, mem_insert_way '2:5/6:9/10:13/14:17' (read at block a,
    added after block b). Our stats equal the official module up to the QK-norm (-20 * 128); the
    memory's query/key norms are RMSNorms with a weight only, as the official ones.

    Published 225M / 1.18B; official module 228.7M (with the tied embedding) / 1.1927B (without):
    +1.7% / +1.1%. As for UltraMemV2 the hyperparameters are all from the published script, so the
    measured gaps are the tolerances: 2% activated, 1.2% total.
    """
    s = stats("ultramem-227m-1.2b")
    d, dk, dv, n, m, heads, rank, cores, expand = 768, 192, 384, 808, 80, 2, 2, 2, 4
    block, qk = olmo_block(d, 12, 2752)
    mem_dense = (d * 2 * dk  # query_proj (one query, two heads)
                 + heads * 2 * math.isqrt(expand) * n * dk * rank  # keys [head, 2, 2n, kdim, rank]
                 + cores * heads * rank * rank + 2 * dk  # tucker cores, query/key RMSNorm weights
                 + expand * dv * d)  # values_proj (IVE: E * Dv -> d)
    embedding = VOCAB * d
    total = 20 * (block + qk) + 4 * (mem_dense + n * n * dv) + d + embedding
    active = 20 * (block + qk) + 4 * (mem_dense + heads * m * dv) + d + embedding
    mems = memory_layers(spec(str(PAPER / "ultramem-227m-1.2b.yaml")), UltraMemSpec)
    assert [(i, i + sub.deliver_after) for i, sub in mems] == [(2, 5), (6, 9), (10, 13), (14, 17)]
    assert all(sub.parallel for _, sub in mems)
    assert s.params == total - 20 * qk
    assert s.active_params == active - 20 * qk
    assert 0 < rel_gap(active, 225 * M) <= 0.02
    assert 0 < rel_gap(total - embedding, 1.18 * B) <= 0.012


def test_memory_plus_227m():
    """Memory+-227M/1.2B: the official layer (olmo/memory_plus_layer.py) has query_proj d -> 2 * 2 * 384,
    keys [2, 2, 1138, 384], RMSNorm weights on query and keys (2 * 384), swilu_projection and
    values_proj (768 x 768 each), and one value table of 1138^2 x 768 shared by the 4 layers. Ours
    (pkm with shared_values, gated, query_norm) has every one of those tensors; its query LayerNorm
    (weight + bias over 384) has the two RMSNorms' count. So ours = official up to OLMo's attention
    QK-norm, exactly.

    Published 228M / 1.19B; official module 241.4M (with the tied embedding) / 1.1969B (without):
    +5.9% / +0.6%. The activated gap is the largest of the memory rows and unexplained (Table 10
    also prints Dv = 384 where the code asserts Dv = hidden = 768; with Dv = 384 the activated count
    would fall by 4 * 160 * 384 = 0.25M only). Tolerances: 6% activated, 0.6% total.
    """
    s = stats("memory-plus-227m-1.2b")
    d, kdim, n, m, heads = 768, 384, 1138, 80, 2
    block, qk = olmo_block(d, 12, 3008)
    mem_dense = d * 2 * heads * kdim + heads * 2 * n * kdim + 2 * kdim + 2 * d * d
    embedding = VOCAB * d
    total = 20 * (block + qk) + 4 * mem_dense + n * n * d + d + embedding
    active = 20 * (block + qk) + 4 * (mem_dense + heads * m * d) + d + embedding
    mems = memory_layers(spec(str(PAPER / "memory-plus-227m-1.2b.yaml")), PKMSpec)
    assert [i for i, _ in mems] == [4, 8, 12, 16]  # mem_insert_way '4:4/8:8/12:12/16:16'
    assert all(sub.parallel and not sub.deliver_after for _, sub in mems)
    assert all(sub.config.shared_values and sub.config.gated and sub.config.num_keys == n for _, sub in mems)
    assert s.params == total - 20 * qk
    assert s.active_params == active - 20 * qk
    assert 0 < rel_gap(active, 228 * M) <= 0.06
    assert 0 < rel_gap(total - embedding, 1.19 * B) <= 0.006


# --- the 1B / 7B group (16 layers, hidden 2048, 16 heads, untied embeddings) -----------------------

def test_olmoe_1b_7b_matches_table_10_exactly():
    """OLMoE-1B/7B: our stats equal the official module but for the QK-norm's size: ByteDance's fork
    builds per-head q/k norms (d_model // n_heads), the released OLMoE checkpoint (and our spec,
    qk_norm: true) full-width ones, 2 * 2048 a layer (test_model_features.py counts the release). Table 10's 6.71B is the
    total without the embedding and LM head (6.713B; 6.919B with them, OLMoE's own "6.9B"). Its
    "1070M" activated is read as 1.07B, three significant figures: attention plus 8 experts alone is
    2^30 = 1073.7M, so no count of this shape is in [1069.5M, 1070.5M). With the router left out,
    as for OLMoE-227M, the activated count without embeddings is 1.0738B -> 1.07B (1.0759B with it)."""
    s = stats("olmoe-1b-7b")
    off = olmoe(d=2048, layers=16, heads=16, experts=64, topk=8, inner=1024, tied=False)
    full_qk = 16 * 2 * 2048
    assert s.params == off.total - off.qk_norm + full_qk
    assert s.active_params == off.active - off.qk_norm + full_qk
    assert s.active_params_non_embedding == off.active_non_embedding - off.qk_norm + full_qk
    assert rounds_to(off.total_non_embedding, 6.71 * B, 0.01 * B)
    assert rounds_to(s.params_non_embedding, 6.71 * B, 0.01 * B)
    assert rounds_to(off.active_non_embedding - off.router, 1.07 * B, 0.01 * B)


def test_ultramem_v2_1b_7b():
    """UltraMemV2-1B/7B with Table 10's memory shapes; its FFN width, the official query projection
    (official_query) and ring sharing (share_ratio 0.5, n' = 1493) are not published and are inferred
    (see the spec's header). The FFN width 6656 was chosen so that the activated count without
    embeddings (the 1B group's rule) is Table 10's 1079M; that check passes by construction.

    The published 6.70B total is out of reach for ANY model with Table 10's shapes: every dense
    parameter is activated, so total - activated = value rows not read
    = 16 * 528^2 * (768 + 384) - 16 * 128 * 1152 = 5.136B, while Table 10 has 6.70B - 1.079B = 5.62B
    (5.34B even if the total alone counted the 0.206B of embeddings). Our total without embeddings is
    6.215B, 7.2% below the published figure; the tolerance is 7.5%.
    """
    s = stats("ultramem-v2-1b-7b")
    off, n_eff = ultramem_v2(d=2048, layers=16, heads=16, ffn=6656, n=528, dk=512, dv=768, dp=384, m=128,
                             q_per_rank=True, share_ratio=0.5, tied=False)
    mems = memory_layers(spec(str(PAPER / "ultramem-v2-1b-7b.yaml")), UltraMemV2Spec)
    assert {sub.config.effective_keys for _, sub in mems} == {n_eff} == {1493}
    # official_query: the flag's 4 Dk projection rows, 2 Dk of them never read (ultramem_layer_v2.py:50-55,
    # 119). Without the unread rows no FFN width on OLMo's grid (mlp_hidden_size a multiple of 256, inner
    # width a multiple of 128) reaches Table 10's 1079M: evidence that the published count holds them.
    assert all(sub.config.official_query and not sub.config.query_per_rank for _, sub in mems)
    unread_query = 16 * 2 * 512 * 2048
    without = [s.active_params_non_embedding - unread_query + 16 * 3 * 2048 * (width - 6656)
               for width in range(128, 20000, 128)]
    assert min(abs(a - 1079 * M) for a in without) > 4 * M  # 1083.2M and 1070.6M are the nearest
    assert s.params == off.total - off.qk_norm
    assert s.active_params == off.active - off.qk_norm
    unread = 16 * 528**2 * (768 + 384) - 16 * 128 * (768 + 384)
    assert s.params - s.active_params == unread == off.total - off.active
    assert (6.70 * B - 1079 * M) - unread > 0.45 * B  # Table 10's own figures disagree with its shapes
    assert rounds_to(s.active_params_non_embedding, 1079 * M, M)
    assert -0.075 <= rel_gap(s.params_non_embedding, 6.70 * B) < 0


# --- the proprietary 2.5B / 120B (shape constructed) ------------------------------------------------

def test_ultramem_v2_120b_top256_totals():
    """UltraMemV2-2.5B/120B-top256: the paper publishes only the totals (2.5B activated, 120B, 256
    values per layer, a memory layer in every block, row/column top-m <= 128); the shape is ours."""
    path = str(PAPER / "ultramem-v2-2.5b-120b-top256.yaml")
    s, model = stats("ultramem-v2-2.5b-120b-top256"), spec(path)
    assert 119.5 * B <= s.params <= 120.5 * B
    assert 2.45 * B <= s.active_params <= 2.55 * B
    mems = memory_layers(model, UltraMemV2Spec)
    assert [i for i, _ in mems] == list(range(model.num_layers))  # every block
    for _, sub in mems:
        c = sub.config
        assert c.heads * c.topk == 256 and c.topk <= 128
        assert c.key_dim == model.hidden_size // 2  # D_k = hidden / 2
        assert 3 * c.pre_value_dim == c.value_dim  # D_p : D_v = 1 : 3
        assert c.value_dim + c.pre_value_dim == model.hidden_size // 4  # = 2 * hidden / 8
