"""PKM and PEER equal the public packages `product-key-memory` and `PEER-pytorch` with weights copied.

Layouts: both packages order query rows (half, head, dim) and keys (head, key, half, dim); ours
are (head, half, dim) and (head, half, key, dim). Package settings that give the textbook forward
(see docs/memory-layers.md): PKM with its per-half query LayerNorm matched by our
``query_norm: true`` (or replaced by Identity for ``query_norm: false``); PEER with
``non_competing_scores=False`` (its default keeps one expert per head with ReLU gates).
"""

from __future__ import annotations

import pytest
import torch
from PEER_pytorch import PEER as PackagePEER
from product_key_memory import PKM as PackagePKM
from torch import nn
from ultraplan.compiler.build import build_model
from ultraplan.compiler.validate import load_model_spec

DIM, HEADS, NUM_KEYS, TOPK, HALF = 32, 2, 8, 4, 16

SPEC = """\
model:
  vocab_size: 16
  hidden_size: 32
  seq_len: 8
  blocks:
    b:
      - {kind}: {{num_keys: 8, topk: 4, key_dim: 32, heads: 2, {extra}}}
  layers:
    - {{block: b}}
"""


def ours(kind: str, extra: str):
    spec = load_model_spec("ref.yaml", text=SPEC.format(kind=kind, extra=extra))
    return build_model(spec, seed=0).layers[0][kind]


def copy_retrieval(module, query_weight: torch.Tensor, keys: torch.Tensor) -> None:
    module.w_query.copy_(query_weight.view(2, HEADS, HALF, DIM).permute(1, 0, 2, 3).reshape(-1, DIM))
    module.keys.copy_(keys.permute(0, 2, 1, 3))


@pytest.mark.parametrize("query_norm", [True, False])
def test_pkm_equals_product_key_memory(query_norm):
    torch.manual_seed(0)
    package = PackagePKM(DIM, heads=HEADS, num_keys=NUM_KEYS, topk=TOPK, dim_head=HALF).eval()
    module = ours("pkm", f"query_norm: {str(query_norm).lower()}")
    with torch.no_grad():
        if query_norm:
            nn.init.normal_(package.norm.weight)
            nn.init.normal_(package.norm.bias)
            module.query_norm_weight.copy_(package.norm.weight)
            module.query_norm_bias.copy_(package.norm.bias)
        else:
            package.norm = nn.Identity()
        copy_retrieval(module, package.to_queries.weight, package.keys)
        module.values.copy_(package.values.weight)
        x = torch.randn(2, 5, DIM)
        torch.testing.assert_close(module.body(x), package(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation,package_activation", [("silu", nn.SiLU), ("relu", nn.ReLU)])
def test_peer_equals_peer_pytorch(activation, package_activation):
    torch.manual_seed(1)
    package = PackagePEER(DIM, heads=HEADS, num_experts=NUM_KEYS**2, num_experts_per_head=TOPK, dim_key=HALF,
                          non_competing_scores=False, activation=package_activation).eval()
    module = ours("peer", f"activation: {activation}")
    with torch.no_grad():
        copy_retrieval(module, package.to_queries[0].weight, package.keys)
        module.down.copy_(package.weight_down_embed.weight)
        module.up.copy_(package.weight_up_embed.weight)
        x = torch.randn(2, 5, DIM)
        torch.testing.assert_close(module.body(x), package(x), rtol=1e-5, atol=1e-5)
