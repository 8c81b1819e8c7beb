"""The eager single-process reference run that ``ultraplan run --check`` compares a program with.

Same spec, seed, data and optimizer settings as the plan; none of the plan's code: the model is
``compiler.build``'s module, the whole global batch goes through it in one process, and the
gradient is torch's own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ultraplan.compiler import ops, seeded
from ultraplan.compiler.build import build_model, make_optimizer, refresh_state, set_group_lrs
from ultraplan.compiler.validate import load_model_spec
from ultraplan.passes.pipeline import prepare_spec
from ultraplan.passes.plan import Plan


def train_reference(
    plan: Plan, steps: int, seed: int, dtype: torch.dtype = torch.float32,
    batches: Callable[[int, int], torch.Tensor] | None = None,
    after_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses per step and the final parameters (by canonical name) of the eager model.

    The weights are initialised in float32 (as the program does) and then cast to ``dtype``.
    ``batches(seed, step)`` gives each step's (B, T + 1) global batch (default: the permutation
    walk); ``after_step(step, model)`` is called after each optimizer step (e.g. a validation loss).
    """
    spec, _ = prepare_spec(load_model_spec(plan.spec_source, text=plan.spec_text))
    model = build_model(spec, seed=seed).to(dtype)
    t = plan.training
    optimizer = make_optimizer(model, t.lr, (t.beta1, t.beta2), t.eps, t.weight_decay)
    losses = []
    vocab = dict(plan.model)["vocab_size"]
    for step in range(steps):
        if batches is None:
            batch = seeded.permutation_walk_batch(seed, step, plan.batch, plan.seq, vocab)
        else:
            batch = batches(seed, step)
        logits, aux_losses = model.forward_with_aux(batch[:, :-1])
        loss = ops.cross_entropy(logits, batch[:, 1:]) + sum(aux_losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        set_group_lrs(optimizer, step, t.lr, t.value_lr_multiplier, t.value_lr_decay_steps)
        optimizer.step()
        refresh_state(model)
        losses.append(loss.item())
        if after_step is not None:
            after_step(step, model)
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def relative_differences(
    losses: list[float], ref_losses: list[float], params: dict[str, torch.Tensor], ref_params: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Largest relative difference of the losses and of the final parameters.

    Loss: max over steps of |a - b| / |b|. Parameters: max over tensors of ||a - b|| / ||b||
    (Frobenius norms). Why a norm and not elementwise: AdamW divides each gradient element by
    its own running RMS, so an element whose gradient is ~1e-9 (a rarely seen embedding row)
    moves by ~lr in a direction set by rounding noise; a few such elements differ by ~lr between
    runs that sum gradients in another order, while the tensor as a whole agrees to ~1e-7.
    """
    if len(losses) != len(ref_losses):
        raise ValueError(f"the program ran {len(losses)} steps, the reference {len(ref_losses)}")
    if set(params) != set(ref_params):
        raise ValueError(f"parameter names differ: {sorted(set(params) ^ set(ref_params))}")
    loss_rel = max((abs(a - b) / max(abs(b), 1e-30) for a, b in zip(losses, ref_losses)), default=0.0)
    param_rel = 0.0
    for name, ref in ref_params.items():
        scale = ref.norm().item() or 1.0
        param_rel = max(param_rel, (params[name].to(ref.dtype) - ref).norm().item() / scale)
    return {"loss": loss_rel, "params": param_rel}
