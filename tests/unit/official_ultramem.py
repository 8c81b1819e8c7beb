"""A plain-torch re-implementation of the official UltraMem forward passes, written from
ZihaoHuang-notabot/Ultra-Sparse-Memory-Network (olmo/ultramem_layer.py, olmo/ultramem_layer_v2.py)
with the official parameter layout, so ultraplan layers can be checked against it weight for weight.

Followed line by line (the CUDA ``fuse_ops`` lookups are replaced by the official code's own
non-fused branch, ultramem_layer_v2.py:498-518 and ultramem_layer.py:184-197):
- norms: olmo/model.py RMSLayerNorm.forward (x rsqrt(mean x^2 + eps) weight [+ bias], :240-256) or
  LayerNorm.forward (F.layer_norm with weight [and bias], :214-224), the bias present when
  ``bias_for_layer_norm`` is (:150-160), eps ``layer_norm_eps`` = 1e-5 (olmo/config.py:379);
- TDQKR: ultramem_layer_v2.py:356-417 (= ultramem_layer.py:204-244) with ParallelKeyQueryInnerProduct
  (ultramem_layer_v2.py:31-63): head i reads query[:, i // 2], its first half against the row keys
  and its second half against the column keys, for every Tucker rank;
- V2 forward: ultramem_layer_v2.py:299-354, key expansion as the fused lookup does it (E^2 groups
  of slot // value_num, row (slot mod value_num + offset) mod all_value_num: fuse_ops/fused_lookup.cu:
  117-119, 174-178) and then summed (:328-331, value_expand_time 1), the key-balance loss of :380-394
  attached by AuxLossBackwardHook (:16-29, :350-351); V1 forward: ultramem_layer.py:171-202.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-5


@dataclass
class OfficialWeights:
    """The official tensors: query_proj.weight, keys [head, 2, n, kdim, rank], tucker_core (a list
    of [head, rank, rank]), tucker_core_u/v [1, head, 1, rank], shuffle_index, norm weights,
    values (and pre-values, pre_values_proj.weight for V2), values_proj.weight."""

    query_proj: torch.Tensor
    query_norm: torch.Tensor
    keys: torch.Tensor
    keys_norm: torch.Tensor
    tucker_core: list[torch.Tensor]
    tucker_core_u: torch.Tensor
    tucker_core_v: torch.Tensor
    shuffle_index: torch.Tensor
    values: torch.Tensor
    values_proj: torch.Tensor
    pre_values: torch.Tensor | None = None
    pre_values_proj: torch.Tensor | None = None
    query_norm_bias: torch.Tensor | None = None
    keys_norm_bias: torch.Tensor | None = None
    norm_type: str = "rms"  # layer_norm_type: rms (RMSLayerNorm) or default (LayerNorm)


class AuxLossBackwardHook(torch.autograd.Function):
    """ultramem_layer_v2.py:16-29: the output unchanged; the aux loss gets gradient ``scale``."""

    @staticmethod
    def forward(ctx, output, aux_loss, scale):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad_output):
        aux_loss, = ctx.saved_tensors
        return grad_output, torch.ones_like(aux_loss) * ctx.scale, None


def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, norm_type: str = "rms") -> torch.Tensor:
    """LayerNormBase.build (olmo/model.py:168-178): RMSLayerNorm or LayerNorm, bias if built."""
    if norm_type == "default":
        return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, EPS)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return weight * x + bias if bias is not None else weight * x


def key_balance_loss(scores1: torch.Tensor, scores2: torch.Tensor, indices1: torch.Tensor,
                     indices2: torch.Tensor) -> torch.Tensor:
    """ultramem_layer_v2.py:380-394 (bs tokens, head_num heads, key_num keys per half)."""
    bs, head_num, key_num = scores1.shape
    total = 0
    for scores, indices in ((scores1, indices1), (scores2, indices2)):
        p = scores.softmax(dim=-1).view(-1, key_num).sum(dim=0) / (bs * head_num)
        counts = torch.zeros(key_num, dtype=scores.dtype).scatter_add_(
            0, indices.flatten(), torch.ones_like(indices.flatten(), dtype=scores.dtype))
        total = total + key_num * (p * counts / counts.sum()).sum()
    return total


def tdqkr(w: OfficialWeights, query: torch.Tensor, keys: torch.Tensor, knn: int,
          balance: bool = False) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ultramem_layer_v2.py:356-417: -> best_scores [bs, head*knn, cores], best_indices [bs, head*knn]
    (and the key-balance loss of :380-394 with ``balance``)."""
    bs = query.shape[0]
    head_num, _, n_keys, _, tucker_rank = keys.shape
    half = query.shape[-1] // 2
    s1 = torch.stack([torch.stack([query[:, i // 2, :half] @ keys[i, 0, :, :, r].T for i in range(head_num)], 1)
                      for r in range(tucker_rank)], -1)  # [bs, head, n, rank]
    s2 = torch.stack([torch.stack([query[:, i // 2, half:] @ keys[i, 1, :, :, r].T for i in range(head_num)], 1)
                      for r in range(tucker_rank)], -1)
    scores1, scores2 = (s1 * w.tucker_core_u).sum(-1), (s2 * w.tucker_core_v).sum(-1)
    i1 = scores1.topk(knn, dim=2).indices
    i2 = scores2.topk(knn, dim=2).indices
    k1 = s1.gather(2, i1.unsqueeze(-1).expand(-1, -1, -1, tucker_rank))
    k2 = s2.gather(2, i2.unsqueeze(-1).expand(-1, -1, -1, tucker_rank))
    score_list = [(k1 @ core @ k2.transpose(-1, -2)).view(bs, head_num, -1) for core in w.tucker_core]
    all_scores = torch.stack(score_list, -1).sum(-1)
    all_indices = (i1.view(bs, head_num, knn, 1) * n_keys + i2.view(bs, head_num, 1, knn)).view(bs, head_num, -1)
    best = torch.topk(all_scores, k=knn, dim=2).indices
    best_scores = torch.stack([s.gather(2, best) for s in score_list], -1).view(bs, -1, len(w.tucker_core))
    if balance:
        return best_scores, all_indices.gather(2, best).view(bs, -1), key_balance_loss(scores1, scores2, i1, i2)
    return best_scores, all_indices.gather(2, best).view(bs, -1)


def ultramem_v2(w: OfficialWeights, x: torch.Tensor, kdim: int, knn: int, offset: int, all_value_num: int,
                value_num: int, use_glu_act: bool = False,
                key_balance_reg_coef: float = 0.0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """ultramem_layer_v2.py:299-354, value_expand_time 1, mem_q_for_each_tucker_rank (qtr = 2: the only
    setting whose shapes agree in :50-55). The key expansion E is the keys' key_num / sqrt(value_num)
    (:120-131); the lookup sums E^2 groups as the fused path does (FusedLookup, then :328-331)."""
    bs = x.shape[0]
    qtr = w.query_proj.shape[0] // (2 * kdim)
    query = norm((x @ w.query_proj.T).view(bs, 2, qtr, kdim), w.query_norm, w.query_norm_bias,
                 w.norm_type).view(bs, 2, qtr * kdim)
    keys = norm(w.keys.transpose(3, 4), w.keys_norm, w.keys_norm_bias, w.norm_type).transpose(3, 4)
    retrieved = tdqkr(w, query, keys, knn, balance=key_balance_reg_coef > 0)
    best_scores, best = retrieved[:2]
    best = w.shuffle_index[best]
    expand = w.keys.shape[2] ** 2 // value_num  # fake_value_expand_time = key_expand_time^2 (:121)
    group = best // value_num  # the fused lookup's group_id (fused_lookup.cu:117)
    real = ((best % value_num) + offset) % all_value_num  # its row (:118)
    weights = best_scores.unsqueeze(-1)
    if w.pre_values is not None:
        pre_scores = torch.einsum("bd,bkd->bk", x @ w.pre_values_proj.T, w.pre_values[real])
        if use_glu_act:  # mem_use_glu_act, applied in the fused branch (:490-491)
            pre_scores = torch.nn.functional.gelu(pre_scores)
        weights = weights * pre_scores[..., None, None]
    values = (w.values[real].view(bs, best.shape[1], len(w.tucker_core), -1) * weights).view(bs, best.shape[1], -1)
    grouped = values.new_zeros(bs, expand, values.shape[-1])  # FusedLookup output [bs, group_size, vdim]
    grouped = grouped.scatter_add(1, group.unsqueeze(-1).expand(-1, -1, values.shape[-1]), values)
    output = grouped.sum(dim=1) @ w.values_proj.T  # :328-331 then :333
    if key_balance_reg_coef > 0:  # :350-351; the loss is returned too, to compare its value
        return AuxLossBackwardHook.apply(output, retrieved[2], key_balance_reg_coef), retrieved[2]
    return output


def ultramem_v1(w: OfficialWeights, x: torch.Tensor, kdim: int, knn: int, expansion: int) -> torch.Tensor:
    """ultramem_layer.py:171-202 with the non-fused IVE (:184-197): ScatterAdd into E blocks."""
    bs = x.shape[0]
    query = norm((x @ w.query_proj.T).view(bs, 1, 2, kdim), w.query_norm, w.query_norm_bias,
                 w.norm_type).view(bs, 1, 2 * kdim)
    keys = norm(w.keys.transpose(-1, -2), w.keys_norm, w.keys_norm_bias, w.norm_type).transpose(-1, -2)
    best_scores, best = tdqkr(w, query, keys, knn)
    shuffled = w.shuffle_index[best]
    value_num = w.values.shape[0]
    real, group = shuffled % value_num, shuffled // value_num
    values = (w.values[real].view(bs, best.shape[1], len(w.tucker_core), -1) * best_scores.unsqueeze(-1))
    values = values.view(bs, best.shape[1], -1)
    out = values.new_zeros(bs, expansion, values.shape[-1])
    out = out.scatter_add(1, group.unsqueeze(-1).expand(-1, -1, values.shape[-1]), values)
    return out.view(bs, -1) @ w.values_proj.T
