"""vocab_parallel.py: cross entropy of logits split over the vocabulary, never gathering them.

Copied verbatim next to every emitted program, beside runtime.py (which re-exports
``vocab_parallel_cross_entropy``, the name a program calls): torch, the standard library and
collectives.py only. The same reduction as Megatron-LM's ``vocab_parallel_cross_entropy``
(megatron/core/tensor_parallel/cross_entropy.py; Shoeybi et al. 2019, section 3).
"""

import torch
import torch.distributed as dist

try:  # inside the ultraplan package, and beside an emitted program (shipped there as plain files)
    from .collectives import all_reduce_raw, count
except ImportError:
    from collectives import all_reduce_raw, count


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross entropy of logits split over the vocabulary, never gathering them.

    Forward, per mesh axis in ``axes`` (one axis per call, so a multi-axis split reduces axis by
    axis): one all_reduce MAX of the per-position max (b*t values, no gradient), then one
    all_reduce SUM of the stacked [sum of exp(z - max); target logit] (2*b*t values; the rank
    owning a position's target column contributes its logit, the others 0). Then
    CE = log(sum exp) + max - target logit, exactly the full-vocabulary value at every position.

    The output is L / n (L the mean CE over this rank's b*t positions, n the product of the axes'
    sizes): a P value over ``axes``, the n ranks' outputs summing to L. Backward is local: the
    gradient g reaching a P value is the same on every rank of the group (B), and the objective
    contains L once (n shares of L/n), so d/dz_local = (softmax_local - onehot_local) * g / (b*t),
    softmax taken over the full vocabulary (exp(z - max) / global sum). No backward collective.
    """

    @staticmethod
    def forward(ctx, logits, targets, mesh, axes, vocab_start):
        z = logits.detach()
        if z.dtype in (torch.bfloat16, torch.float16):  # computes in float32, as ops.cross_entropy
            z = z.float()  # (autograd hands the gradient back in the logits' dtype)
        v_local = z.shape[-1]
        top = z.amax(dim=-1).contiguous()
        for axis in axes:
            count("all_reduce", top)
            all_reduce_raw(top, mesh.group(axis), dist.ReduceOp.MAX)
        exp = torch.exp(z - top.unsqueeze(-1))
        local = targets - vocab_start
        owned = (local >= 0) & (local < v_local)
        column = local.clamp(0, v_local - 1).unsqueeze(-1)
        picked = torch.where(owned, z.gather(-1, column).squeeze(-1), torch.zeros((), dtype=z.dtype, device=z.device))
        sums = torch.stack([exp.sum(dim=-1), picked])  # (2, b, t): one all-reduce for both
        for axis in axes:
            count("all_reduce", sums)
            all_reduce_raw(sums, mesh.group(axis))
        total, target_logit = sums[0], sums[1]
        n = 1
        for a in axes:
            n *= mesh.shape[a]
        loss = (total.log() + top - target_logit).mean() / n
        ctx.save_for_backward(exp, total, owned, column)
        return loss

    @staticmethod
    def backward(ctx, grad):
        exp, total, owned, column = ctx.saved_tensors
        b, t, _ = exp.shape
        grad_logits = exp / total.unsqueeze(-1)
        grad_logits.scatter_add_(-1, column, -owned.to(exp.dtype).unsqueeze(-1))
        return grad_logits * (grad / (b * t)), None, None, None, None


def vocab_parallel_cross_entropy(logits, targets, mesh, axes, vocab_start):
    """Mean cross entropy over this rank's positions of vocab-split logits, as a P share.

    ``logits`` (b, t, V_local) hold vocabulary columns [vocab_start, vocab_start + V_local),
    split over the mesh axes ``axes`` (a tuple, usually one axis); ``targets`` (b, t) int64 full
    ids. Returns (mean CE) / (product of the axes' sizes), P over ``axes``. Collectives: 2 per
    axis in the forward (all_reduce of b*t, then of 2*b*t elements of the logits' dtype), none
    in the backward. See ``_VocabParallelCrossEntropy`` for the derivation.
    """
    return _VocabParallelCrossEntropy.apply(logits, targets, mesh, tuple(axes), int(vocab_start))
