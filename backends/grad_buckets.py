"""grad_buckets.py: gradient synchronisation in flat buckets launched during the backward (``GradBuckets``).

Copied verbatim next to every emitted program, beside runtime.py (which re-exports ``GradBuckets``, the
name a program calls): torch, the standard library and collectives.py only.
"""

import torch
import torch.distributed as dist

try:  # inside the ultraplan package, and beside an emitted program (shipped there as plain files)
    from . import collectives
except ImportError:
    import collectives


class GradBuckets:
    """Gradient synchronisation in flat buckets launched during the backward, as torch DDP's Reducer
    does (torch/csrc/distributed/c10d/reducer.cpp; Li et al., VLDB 2020, section 3.2). Which
    gradients share a bucket, in what order, is the plan's decision; this class only runs it.

    ``buckets``, in launch order: (parameters, steps), the parameters whose gradients share one
    flat buffer (in buffer order) and the collectives it needs, e.g. (("all_reduce", 0),): a sum
    over mesh axis 0 (several steps run one after the other). A hook on each parameter
    (``register_post_accumulate_grad_hook``) fires once its gradient is accumulated. When every
    gradient of the next bucket is in, it is copied into the buffer and its first collective
    launched asynchronously while the backward carries on. Buckets launch strictly in order (one
    ready early waits for those before it), so every rank issues the same calls in the same order.

    ``finish()``, after the backward: launches the buckets still waiting (a parameter no gradient
    reached on this rank sends zeros: DDP's find_unused_parameters case), runs the remaining steps,
    waits for all and points each ``.grad`` at its slice of the buffer. A parameter no gradient
    reached on this rank takes the others' sum; when that is zero too, no rank reached it and its
    ``.grad`` stays None, as a single-process run leaves it (the optimizer skips it). A program
    whose backward also runs collectives on a bucket's axis must reach every parameter on every
    rank, or a held-back bucket meets another collective; every op of ops.py and this file does
    (``expert_parallel_ffn`` runs every local expert, on zero rows if need be).
    Each call counts as its kind ("all_reduce") with the bytes of the buffer.
    """

    def __init__(self, mesh, buckets):
        self.mesh = mesh
        self.buckets = [(list(params), tuple((kind, int(axis)) for kind, axis in steps)) for params, steps in buckets]
        self.bucket_of = {}
        for index, (params, steps) in enumerate(self.buckets):
            if any(kind != "all_reduce" for kind, _ in steps):
                raise ValueError(f"gradient bucket {index}: only all_reduce steps are bucketed, got {steps}")
            for p in params:  # keyed by id: a tensor's == is elementwise
                if id(p) in self.bucket_of:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} is in two gradient buckets")
                self.bucket_of[id(p)] = index
                p.register_post_accumulate_grad_hook(self._ready)
        self.buffers = [None] * len(self.buckets)
        self._reset()

    def _reset(self):
        self.waiting = [len(params) for params, _ in self.buckets]  # gradients not yet in, per bucket
        self.reached = set()  # ids of the parameters a gradient reached in this backward
        self.launched = 0  # buckets launched so far (always a prefix, in order)
        self.works = [None] * len(self.buckets)
        self.steps_run = [0] * len(self.buckets)

    def _ready(self, param):
        self.reached.add(id(param))
        self.waiting[self.bucket_of[id(param)]] -= 1
        while self.launched < len(self.buckets) and self.waiting[self.launched] == 0:
            self._launch(self.launched)

    def _launch(self, index):
        params, _ = self.buckets[index]
        grads = [p.grad for p in params]
        like = next((g for g in grads if g is not None), params[0])
        total = sum(p.numel() for p in params)
        buffer = self.buffers[index]
        if buffer is None or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self.buffers[index] = torch.empty(total, dtype=like.dtype, device=like.device)
        offset = 0
        for p, g in zip(params, grads):
            part = buffer[offset:offset + p.numel()]
            if g is None:
                part.zero_()
            else:
                part.copy_(g.reshape(-1))
            offset += p.numel()
        self.launched += 1
        self._next_step(index)

    def _next_step(self, index):
        kind, axis = self.buckets[index][1][self.steps_run[index]]
        collectives.count(kind, self.buffers[index])
        self.works[index] = dist.all_reduce(self.buffers[index], op=dist.ReduceOp.SUM, group=self.mesh.group(axis),
                                            async_op=True)
        self.steps_run[index] += 1

    def finish(self):
        """After the backward: launch what is left, run every bucket's remaining steps, wait for all,
        and set each parameter's ``.grad`` to its slice of the reduced buffer."""
        while self.launched < len(self.buckets):
            self._launch(self.launched)
        while any(run < len(steps) for run, (_, steps) in zip(self.steps_run, self.buckets)):
            for index, (_, steps) in enumerate(self.buckets):
                if self.steps_run[index] < len(steps):
                    self.works[index].wait()
                    self._next_step(index)
        for index, (params, _) in enumerate(self.buckets):
            self.works[index].wait()
            offset = 0
            for p in params:
                part = self.buffers[index][offset:offset + p.numel()].view(p.shape)
                offset += p.numel()
                p.grad = part if id(p) in self.reached or bool(part.any()) else None
        self._reset()
