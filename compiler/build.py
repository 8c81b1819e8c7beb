"""Spec -> eager ``nn.Module``: the numerical reference every plan is checked against.

Parameter names here (``layers.0.attention.wq``) are the canonical names used by the plan, the
emitted program and the checks. Init rules follow GPT-2: normal(0, init_std) for matrices, with
residual output projections (``wo``, ``w_down``) scaled by 1/sqrt(2 * num_layers) so the residual
stream does not grow with depth; norm scales one, biases zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import ops, seeded
from .components.attention import Attention
from .components.base import InitRule, Norm, ResidualSublayer, named
from .components.ffn import FFN
from .components.moe import MoE
from .components.product_keys import PEER, PKM
from .components.ultramem import MemoryTable, UltraMem, UltraMemV2
from .components.ultramem_init import paper_init
from .memory_tables import table_shapes, table_slots
from .schema import FFNSpec, LayerSpec, ModelSpec, SublayerSpec

MODULES: dict[str, type[ResidualSublayer]] = {"attention": Attention, "ffn": FFN, "moe": MoE, "pkm": PKM, "peer": PEER,
                                              "ultramem": UltraMem, "ultramem_v2": UltraMemV2}


def build_sublayer(sub: SublayerSpec, dim: int) -> ResidualSublayer:
    return MODULES[sub.kind](sub.config, sub.norm, dim)


class Block(nn.ModuleDict):
    """One layer: its sublayers in order, each a pre-norm residual, some beside the one before."""

    def __init__(self, layer: LayerSpec, dim: int) -> None:
        super().__init__({sub.name: build_sublayer(sub, dim) for sub in layer.sublayers})
        self.layer = layer

    def forward(self, x: torch.Tensor, pending: dict[int, list[torch.Tensor]],
                aux_losses: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``pending`` collects outputs delivered to later layers (layer index -> outputs),
        ``aux_losses`` the auxiliary losses of sublayers that have one."""
        read = normed = None
        for spec, sublayer in zip(self.layer.sublayers, self.values()):
            if spec.parallel:
                shared = normed if spec.norm is None else None
                x, _, delayed, aux = sublayer(x, read=read, normed=shared, deliver_later=bool(spec.deliver_after))
            else:
                read = x
                x, normed, delayed, aux = sublayer(x, deliver_later=bool(spec.deliver_after))
            if delayed is not None:
                pending.setdefault(self.layer.index + spec.deliver_after, []).append(delayed)
            if aux is not None and aux_losses is not None:
                aux_losses.append(aux)
        return x


class DecoderModel(nn.Module):
    """Token embedding, the layer stack, a final norm and the LM head (tied or not)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        d = spec.hidden_size
        self.embed = nn.Module()
        self.embed.weight = nn.Parameter(torch.empty(spec.vocab_size, d))
        if spec.position_embedding == "learned":  # GPT-2's wpe: one row per position up to seq_len
            self.pos_embed = nn.Module()
            self.pos_embed.weight = nn.Parameter(torch.empty(spec.seq_len, d))
        self.layers = nn.ModuleList(Block(layer, d) for layer in spec.layers)
        slots = table_slots(spec)
        self.memory_tables = nn.ModuleDict({name: MemoryTable(*shape) for name, shape in table_shapes(slots).items()})
        for slot in slots:
            layer = self.layers[slot.layer]
            sub = layer[slot.sublayer]
            if isinstance(sub, UltraMemV2) and sub.spec.init == "paper":
                ffn = next((s.config for s in spec.layers[slot.layer].sublayers if isinstance(s.config, FFNSpec)), None)
                if ffn is None:
                    raise ValueError(f"layer {slot.layer}: the paper's UltraMemV2 init needs an ffn in the same block")
                sub.attach(self.memory_tables[slot.table], slot, paper_init(sub.spec, d, ffn.width, spec.num_layers))
            else:
                sub.attach(self.memory_tables[slot.table], slot)
        self.final_norm = Norm(spec.final_norm, d)
        if not spec.tie_embeddings:
            self.lm_head = nn.Module()
            self.lm_head.weight = nn.Parameter(torch.empty(spec.vocab_size, d))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_with_aux(tokens)[0]

    def forward_with_aux(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the auxiliary losses (MoE load balancing) the training loss adds."""
        if self.spec.position_embedding == "learned":
            tokens_x = named("token_x", ops.embedding(tokens, self.embed.weight))
            x = named("x", ops.add_positions(tokens_x, self.pos_embed.weight))
        else:
            x = named("x", ops.embedding(tokens, self.embed.weight))
        pending: dict[int, list[torch.Tensor]] = {}
        aux_losses: list[torch.Tensor] = []
        for index, block in enumerate(self.layers):
            x = block(x, pending, aux_losses)
            for delayed in pending.pop(index, []):
                x = named(f"layers.{index}.delivered", ops.add(x, delayed))
        x = self.final_norm(x)
        head = self.embed.weight if self.spec.tie_embeddings else self.lm_head.weight
        return named("logits", ops.linear(x, head)), aux_losses


class TrainingGraph(nn.Module):
    """The model plus its loss: what a training plan lowers (forward of one step)."""

    def __init__(self, model: DecoderModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, aux_losses = self.model.forward_with_aux(tokens)
        loss = named("loss", ops.cross_entropy(logits, targets))
        for aux in aux_losses:
            loss = named("loss_with_aux", ops.add(loss, aux))
        return loss


def init_rules(model: DecoderModel) -> dict[str, InitRule]:
    """Canonical parameter name -> how to initialise it."""
    spec = model.spec
    std = spec.train.init_std
    out_std = std / math.sqrt(2 * spec.num_layers)
    rules = {"embed.weight": InitRule("normal", std)}
    if spec.position_embedding == "learned":
        rules["pos_embed.weight"] = InitRule("normal", std)
    for i, block in enumerate(model.layers):
        for name, sub in block.items():
            prefix = f"layers.{i}.{name}"
            for local, rule in sub.local_init_rules(std, out_std).items():
                rules[f"{prefix}.{local}"] = rule
            if sub.norm is not None:
                for local, rule in sub.norm.init_rules().items():
                    rules[f"{prefix}.norm.{local}"] = rule
    for table_name, table in model.memory_tables.items():
        for local, rule in table.init_rules(std).items():
            rules[f"memory_tables.{table_name}.{local}"] = rule
    for local, rule in model.final_norm.init_rules().items():
        rules[f"final_norm.{local}"] = rule
    if not spec.tie_embeddings:
        rules["lm_head.weight"] = InitRule("normal", std)
    missing = {n for n, _ in model.named_parameters()} ^ set(rules)
    assert not missing, f"init rules and parameters disagree: {sorted(missing)}"
    return rules


def optimizer_groups(model: nn.Module) -> dict[str, str]:
    """Canonical parameter name -> optimizer group: ``values`` for memory value tables (modules
    list them in ``value_tables``), ``default`` for the rest."""
    groups = {name: "default" for name, _ in model.named_parameters()}
    for prefix, module in model.named_modules():
        for local in getattr(module, "value_tables", ()):
            if hasattr(module, local):
                groups[f"{prefix}.{local}"] = "values"
    return groups


def value_lr_factor(step: int, multiplier: float, decay_steps: int) -> float:
    """The value tables' LR factor at ``step``: ``multiplier``, decaying linearly to 1 over
    ``decay_steps`` (UltraMem's code: 1 + (k0 - 1) max(0, 1 - step / steps)); constant when 0."""
    if decay_steps <= 0:
        return multiplier
    return 1 + (multiplier - 1) * max(0.0, 1 - step / decay_steps)


def make_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], eps: float,
                   weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``model`` with one param group per optimizer group (``default``, ``values``; empty
    ones left out), each named so ``set_group_lrs`` can give the value tables their multiplier.
    The eager reference and the examples train with it; emitted programs write their own."""
    groups = optimizer_groups(model)
    params = {g: [p for n, p in model.named_parameters() if groups[n] == g] for g in ("default", "values")}
    return torch.optim.AdamW([{"params": p, "name": g} for g, p in params.items() if p], lr=lr, betas=betas,
                             eps=eps, weight_decay=weight_decay)


def set_group_lrs(optimizer: torch.optim.Optimizer, step: int, lr: float, multiplier: float, decay_steps: int) -> None:
    """The learning rate of each group at ``step``: ``lr``, times ``value_lr_factor`` for the value tables."""
    for group in optimizer.param_groups:
        group["lr"] = lr * (value_lr_factor(step, multiplier, decay_steps) if group["name"] == "values" else 1)


def initialize(model: DecoderModel, seed: int) -> DecoderModel:
    """Fill every parameter from ``seeded.init_full`` (the same values any rank count uses), the
    fixed permutations likewise, then the state derived from parameters."""
    rules = init_rules(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            rule = rules[name]
            param.copy_(seeded.init_full(name, tuple(param.shape), rule.kind, rule.std, seed))
        for name, rule in state_rules(model).items():
            if rule[0] == "permutation":
                buffer = model.get_buffer(name)
                buffer.copy_(seeded.init_full(name, tuple(buffer.shape), "permutation", 0.0, seed))
            else:
                model.get_buffer(name).zero_()  # derived state starts at zero, as the official code's
    refresh_state(model)
    return model


def state_rules(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Buffer name -> (init, op, source parameter), from each module's ``state_rules``."""
    out: dict[str, tuple[str, ...]] = {}
    for prefix, module in model.named_modules():
        for local, rule in getattr(module, "state_rules", dict)().items():
            if len(rule) == 3:
                rule = (rule[0], rule[1], f"{prefix}.{rule[2]}")
            out[f"{prefix}.{local}"] = rule
    missing = set(dict(model.named_buffers())) ^ set(out)
    assert not missing, f"buffers without a state rule: {sorted(missing)}"
    return out


def refresh_state(model: nn.Module) -> None:
    """Recompute the buffers derived from parameters (UltraMem's rank-1 vectors from the cores), by
    the same ``state_rules`` the plan records and emitted programs follow: ``op(source, previous)``,
    the buffer's previous value passed so a rule can keep continuity (the rank-1 vectors' sign).

    Call after every optimizer step, as the reference training loop and emitted programs do.
    """
    with torch.no_grad():
        for name, rule in state_rules(model).items():
            if rule[0] == "derived":
                _, op, source = rule
                buffer = model.get_buffer(name)  # its previous value: the rule may keep its sign
                buffer.copy_(getattr(ops, op)(model.get_parameter(source).detach(), buffer))


def build_model(spec: ModelSpec, *, seed: int | None = None, device: str | torch.device = "cpu") -> DecoderModel:
    """The eager reference model; with ``seed`` its weights are the deterministic initial ones.

    ``device="meta"`` builds the structure without allocating weights (for large specs).
    """
    with torch.device(device):
        model = DecoderModel(spec)
    if seed is not None:
        initialize(model, seed)
    return model
