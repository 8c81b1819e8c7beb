"""UltraMemV2's principled initialisation (Huang et al. 2025, Appendix A), with eq. 26 corrected.

- Every linear: N(0, 2 / (5 h)) (Nguyen & Salazar 2019; h = 768 gives the scripts' 0.02282).
- Query and key LayerNorm gains g: chosen so the mean selected (top-m) score is 1. A selected
  score is a sum over cores of row^T C col, with row and column scores each a query-key product,
  so it scales as g^4: simulate TDQKR once at g = 1 (``simulate_scores``), then g = mean^(-1/4),
  and the score variance at that gain is sigma_s^2 = var / mean^2.
- Values and pre-values: N(0, sigma_V^2) with the memory's output variance (eq. 22)
      sigma_mem^2 = 0.16 (1 + sigma_s^2) sigma_V^4 D_p m h_heads D_v / h
  set equal to the FFN's sigma_ffn^2 = 0.064 k_inner / (2 L), k_inner = FFN inner / h:
      sigma_V^4 = 0.2 k_inner h / (m h_heads (1 + sigma_s^2) D_p D_v L).
  The paper prints this right-hand side as sigma_V^2 (eq. 26); substituting eq. 22 into eq. 25
  gives sigma_V^4, so we take its fourth root.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from ..memory_specs import UltraMemV2Spec

# values and pre-values under init: code (and UltraMem's values): a fixed 0.02, not init_std
# (Ultra-Sparse-Memory-Network olmo/ultramem_layer_v2.py:203, olmo/ultramem_layer.py:122)
OFFICIAL_VALUE_STD = 0.02

SIMULATION_TOKENS = 128
SIMULATION_SEED = 20250826  # fixed: the same spec always gets the same gains
DRAWS = 64  # independent (keys, cores) draws averaged over ...
SIMULATION_ELEMENTS = 20_000_000  # ... fewer when the key tables are large (memory bound)


@dataclass(frozen=True)
class PaperInit:
    linear_std: float
    norm_gain: float
    value_std: float
    score_variance: float  # sigma_s^2 at the chosen gain


@functools.cache  # a spec is a frozen value: every layer of a model asks the same question
def simulate_scores(spec: UltraMemV2Spec, gain: float = 1.0, tokens: int = SIMULATION_TOKENS,
                    seed: int = SIMULATION_SEED) -> tuple[float, float]:
    """Mean and variance of the selected TDQKR scores for unit-normal queries and keys after
    LayerNorm with gain ``gain``, and cores U(0, 1) as initialised. The scale of the selected
    scores depends strongly on the random cores, so the simulation draws many independent
    (keys, cores) sets, as extra heads, and averages over them: the gain is right in
    expectation over initialisations, not for one lucky draw. Runs on the CPU in float64 (also
    while a model is being built on the meta device)."""
    gen = torch.Generator().manual_seed(seed)
    query_ranks = spec.rank if spec.query_per_rank else 1
    per_head = 2 * spec.rank * spec.effective_keys * spec.key_dim
    heads = spec.heads * max(1, min(DRAWS, SIMULATION_ELEMENTS // (per_head * spec.heads)))
    shape = dict(generator=gen, dtype=torch.float64, device="cpu")
    q = F.layer_norm(torch.randn(tokens, heads * 2 * query_ranks, spec.key_dim, **shape), (spec.key_dim,)) * gain
    keys = torch.randn(heads, 2, spec.rank, spec.effective_keys, spec.key_dim, **shape)
    keys = F.layer_norm(keys, (spec.key_dim,)) * gain
    cores = torch.rand(heads, spec.cores, spec.rank, spec.rank, **shape)
    scores = ops.tucker_scores(q.reshape(1, tokens, -1), keys, query_ranks)
    rank_one = ops.rank_one_vectors(cores, cores.new_zeros(2, heads, spec.rank))  # no previous step
    half_best = ops.topk_indices(ops.rank_one_scores(scores, rank_one), spec.topk)
    total = ops.sum_cores(ops.tucker_grid(ops.take_ranked(scores, half_best), cores))
    selected = ops.take(total, ops.topk_indices(total, spec.topk))
    return float(selected.mean()), float(selected.var())


def paper_init(spec: UltraMemV2Spec, hidden: int, ffn_inner: int, num_layers: int) -> PaperInit:
    mean, var = simulate_scores(spec)
    if mean <= 0:
        raise ValueError("simulated TDQKR scores have a non-positive mean; the paper's gain rule does not apply")
    gain = mean ** -0.25
    score_variance = var / mean**2
    k_inner = ffn_inner / hidden
    value_std = (0.2 * k_inner * hidden / (spec.topk * spec.heads * (1 + score_variance) * spec.pre_value_dim
                                           * spec.value_dim * num_layers)) ** 0.25
    return PaperInit(math.sqrt(2 / (5 * hidden)), gain, value_std, score_variance)
