"""collectives.py: the collectives an emitted program runs, counted and differentiable.

Copied verbatim next to every emitted program, beside runtime.py (which re-exports every public name
here, the names a program calls on ``runtime``): torch and the standard library only.

- Each collective is a ``torch.autograd.Function`` whose backward runs the dual collective
  (all_gather <-> reduce_scatter, all_reduce and all_to_all their own), and counts what it is
  handed: every call, forward or backward, adds the bytes of the local tensor given to the
  collective to ``COMM_BYTES[kind]`` and 1 to ``COMM_CALLS[kind]``, so a run can be compared with
  the plan's predicted payload. Kinds: "all_reduce", "all_gather", "reduce_scatter", "all_to_all".
- ``mesh`` arguments are runtime.Mesh objects (``group(axis)``, ``shape``, ``coords``); when several
  axes split one dim, axis 0 is the outer split, as in runtime.py.
- ``comm_debug`` counts the collectives torch's dispatcher runs (as CommDebugMode does), a check on ours
  that does not depend on our own counting.
"""

from collections import Counter

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

COMM_BYTES: Counter = Counter()  # collective kind -> payload bytes handed to it on this rank
COMM_CALLS: Counter = Counter()  # collective kind -> calls on this rank (forward and backward)

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")

# ---- collectives: raw (uncounted) ---------------------------------------------------------------
# These do the communication and nothing else. The public, counted, differentiable functions below
# call them; so does ``gather_full``, whose collectives are checks, not part of a step, and so are
# deliberately not counted.


# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single (same arguments)
# and warns on the old names; older torch has only the old ones.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_reduce_raw(t, group, op=None):
    """Reduce the contiguous tensor ``t`` over ``group`` in place (sum unless ``op``)."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return t


def all_gather_raw(x, group, n, dim):
    """Concatenate the group's ``x`` along ``dim`` in coordinate (group rank) order."""
    x = x.contiguous()
    out = torch.empty((n * x.shape[0], *x.shape[1:]) if x.dim() else (n,), dtype=x.dtype, device=x.device)
    all_gather_single(out, x.reshape(x.shape if x.dim() else (1,)), group=group)
    if x.dim() == 0 or dim == 0:
        return out
    # out is the shards stacked on a new leading axis: move that axis next to dim and merge them
    return out.view(n, *x.shape).movedim(0, dim).reshape(*x.shape[:dim], n * x.shape[dim], *x.shape[dim + 1:])


def reduce_scatter_raw(x, group, n, dim):
    """Sum ``x`` over the group; return chunk (group rank) of ``dim`` of the sum."""
    if x.shape[dim] % n:
        raise ValueError(f"reduce_scatter: dim {dim} of size {x.shape[dim]} does not split over {n} devices")
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // n, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter_single(out, moved, op=dist.ReduceOp.SUM, group=group)
    return out.movedim(0, dim).contiguous()


def all_to_all_raw(x, group, n, src_dim, dst_dim):
    """Split ``dst_dim`` in n chunks, chunk j to group rank j; concatenate what arrives along src_dim."""
    if x.shape[dst_dim] % n:
        raise ValueError(f"all_to_all: dim {dst_dim} of size {x.shape[dst_dim]} does not split over {n} devices")
    send = torch.stack(x.chunk(n, dim=dst_dim)).contiguous()  # (n, *chunk shape): row j goes to rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    shape = recv.shape[1:]
    # recv[j] came from rank j: concatenate along src_dim (the stacked axis merges into src_dim, outer)
    return recv.movedim(0, src_dim).reshape(*shape[:src_dim], n * shape[src_dim], *shape[src_dim + 1:])


def all_to_all_rows_raw(x, group, send_counts, recv_counts):
    """Variable all-to-all of dim-0 rows: send_counts[j] rows (in order) to group rank j, receive
    recv_counts[j] rows from rank j, concatenated in rank order."""
    x = x.contiguous()
    out = torch.empty((sum(recv_counts), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x, output_split_sizes=list(recv_counts), input_split_sizes=list(send_counts),
                           group=group)
    return out


def count(kind, tensor):
    COMM_BYTES[kind] += tensor.numel() * tensor.element_size()
    COMM_CALLS[kind] += 1


# ---- collectives: counted and differentiable ----------------------------------------------------
# Integer tensors (indices) go through the same functions; autograd gives them no backward.


class _AllReduce(torch.autograd.Function):
    """P -> B (sum). Backward: all-reduce of the gradient (every rank's loss used the sum)."""

    @staticmethod
    def forward(ctx, x, mesh, axis):
        ctx.mesh, ctx.axis = mesh, axis
        out = x.detach().clone(memory_format=torch.contiguous_format)
        count("all_reduce", out)
        return all_reduce_raw(out, mesh.group(axis))

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        count("all_reduce", grad)
        return all_reduce_raw(grad, ctx.mesh.group(ctx.axis)), None, None


class _AllGather(torch.autograd.Function):
    """S(dim) -> B. Backward: reduce-scatter of the gradient along dim (each rank's gradient is a
    partial sum of the whole gradient; this rank keeps the sum of its own chunk)."""

    @staticmethod
    def forward(ctx, x, mesh, axis, dim):
        ctx.mesh, ctx.axis, ctx.dim = mesh, axis, dim
        count("all_gather", x)
        return all_gather_raw(x, mesh.group(axis), mesh.shape[axis], dim)

    @staticmethod
    def backward(ctx, grad):
        count("reduce_scatter", grad)
        n = ctx.mesh.shape[ctx.axis]
        return reduce_scatter_raw(grad, ctx.mesh.group(ctx.axis), n, ctx.dim), None, None, None


class _ReduceScatter(torch.autograd.Function):
    """P -> S(dim). Backward: all-gather of the gradient along dim (the gradient of a sum reaches
    every summand whole)."""

    @staticmethod
    def forward(ctx, x, mesh, axis, dim):
        ctx.mesh, ctx.axis, ctx.dim = mesh, axis, dim
        count("reduce_scatter", x)
        return reduce_scatter_raw(x, mesh.group(axis), mesh.shape[axis], dim)

    @staticmethod
    def backward(ctx, grad):
        count("all_gather", grad)
        n = ctx.mesh.shape[ctx.axis]
        return all_gather_raw(grad, ctx.mesh.group(ctx.axis), n, ctx.dim), None, None, None


class _AllToAll(torch.autograd.Function):
    """S(src_dim) -> S(dst_dim). Backward: the inverse all-to-all, S(dst_dim) -> S(src_dim)."""

    @staticmethod
    def forward(ctx, x, mesh, axis, src_dim, dst_dim):
        ctx.mesh, ctx.axis, ctx.src_dim, ctx.dst_dim = mesh, axis, src_dim, dst_dim
        count("all_to_all", x)
        return all_to_all_raw(x, mesh.group(axis), mesh.shape[axis], src_dim, dst_dim)

    @staticmethod
    def backward(ctx, grad):
        count("all_to_all", grad)
        n = ctx.mesh.shape[ctx.axis]
        return all_to_all_raw(grad, ctx.mesh.group(ctx.axis), n, ctx.dst_dim, ctx.src_dim), None, None, None, None


class AllToAllRows(torch.autograd.Function):
    """Variable all-to-all of rows (expert dispatch). Backward: the same exchange reversed (the
    gradient of each received row goes back to the rank and position it came from)."""

    @staticmethod
    def forward(ctx, x, group, send_counts, recv_counts):
        ctx.group, ctx.send_counts, ctx.recv_counts = group, send_counts, recv_counts
        count("all_to_all", x)
        return all_to_all_rows_raw(x, group, send_counts, recv_counts)

    @staticmethod
    def backward(ctx, grad):
        count("all_to_all", grad)
        return all_to_all_rows_raw(grad, ctx.group, ctx.recv_counts, ctx.send_counts), None, None, None


def all_reduce(x, mesh, axis):
    """P -> B on mesh axis ``axis``: the sum over the axis, as a new tensor (x is not modified).
    Counts the bytes of x. Backward: all-reduce (sum) of the gradient, counted the same way."""
    return _AllReduce.apply(x, mesh, axis)


def all_gather(x, mesh, axis, dim):
    """S(dim) -> B on ``axis``: the axis's shards concatenated along ``dim`` in coordinate order.
    Counts the bytes of the local shard x. Backward: reduce_scatter of the gradient along dim
    (counted as reduce_scatter, the bytes of the whole local gradient)."""
    return _AllGather.apply(x, mesh, axis, dim)


def reduce_scatter(x, mesh, axis, dim):
    """P -> S(dim) on ``axis``: the sum over the axis; this rank keeps chunk coords[axis] of dim.
    Counts the bytes of the whole local input x. Backward: all_gather of the gradient along dim
    (counted as all_gather, the bytes of the local gradient chunk)."""
    return _ReduceScatter.apply(x, mesh, axis, dim)


def all_to_all(x, mesh, axis, src_dim, dst_dim):
    """S(src_dim) -> S(dst_dim) on ``axis``: split the local dst_dim in n chunks, send chunk j to
    coordinate j, concatenate what arrives along src_dim in coordinate order. Counts the bytes of
    the whole local x (the chunk that stays included). Backward: the inverse all_to_all."""
    if src_dim == dst_dim:
        raise ValueError(f"all_to_all from S({src_dim}) to S({dst_dim}) moves nothing")
    return _AllToAll.apply(x, mesh, axis, src_dim, dst_dim)


def slice_local(x, mesh, axis, dim):
    """B -> S(dim) on ``axis``: chunk coords[axis] of dim, no communication. Its gradient is zero
    outside the slice: a P gradient on that axis, which is what the dual of B -> S is."""
    n = mesh.shape[axis]
    if x.shape[dim] % n:
        raise ValueError(f"slice_local: dim {dim} of size {x.shape[dim]} does not split over {n} devices")
    return x.chunk(n, dim=dim)[mesh.coords[axis]]


def to_partial(x, mesh, axis):
    """B -> P on ``axis``: each device holds x / n, so the shares sum to x. No communication."""
    return x / mesh.shape[axis]


def all_reduce_(t, mesh, axis):
    """Sum ``t`` in place over mesh axis ``axis`` and return it: gradient synchronisation after
    backward and loss logging, outside autograd. Counted as "all_reduce" (the bytes of t)."""
    if not t.is_contiguous():
        raise ValueError("all_reduce_ needs a contiguous tensor (it reduces in place)")
    count("all_reduce", t)
    return all_reduce_raw(t, mesh.group(axis))


# c10d op names (and functional-collective names) -> our kinds, for ``comm_debug``
TORCH_COMM_NAMES = {"allreduce_": "all_reduce", "_allgather_base_": "all_gather", "allgather_": "all_gather",
                    "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
                    "alltoall_base_": "all_to_all", "alltoall_": "all_to_all",
                    "all_reduce": "all_reduce", "all_gather_into_tensor": "all_gather",
                    "reduce_scatter_tensor": "reduce_scatter", "all_to_all_single": "all_to_all"}


# the collectives torch's own CommDebugMode counts (torch/distributed/tensor/debug/_comm_mode.py:
# ``c10d_collective_ops`` and its ``comm_registry``), by op name; barriers, sends and receives are not
TORCH_COLLECTIVES = {"c10d": frozenset({
    "allreduce_", "allreduce_coalesced_", "allgather_", "_allgather_base_", "allgather_coalesced_",
    "allgather_into_tensor_coalesced_", "reduce_scatter_", "_reduce_scatter_base_", "reduce_scatter_tensor_coalesced_",
    "alltoall_", "alltoall_base_", "broadcast_", "gather_", "scatter_", "reduce_"})}
TORCH_COLLECTIVES["_c10d_functional"] = TORCH_COLLECTIVES["c10d_functional"] = frozenset({
    "all_reduce", "all_reduce_coalesced", "all_gather_into_tensor", "all_gather_into_tensor_coalesced",
    "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced", "all_to_all_single", "broadcast"})
TORCH_COLLECTIVES["_c10d_functional_autograd"] = frozenset({"all_to_all_single"})
TORCH_COLLECTIVES["_dtensor"] = frozenset({"shard_dim_alltoall"})


class comm_debug:
    """``with comm_debug() as seen:`` counts the collective ops torch's dispatcher runs in the block
    and fills the dict ``seen`` on exit with the number of calls, keyed by this file's kind names
    (c10d op names mapped; anything else under its own name). A check on COMM_CALLS that does not
    depend on our own counting: the same test as torch's ``CommDebugMode`` (a dispatch mode that
    sees each c10d op), without its per-module trace of every op (module hooks and a record per
    op, about half the CPU of a small program's first step). Collectives run inside autograd's
    backward are seen too: the CPU backward runs on the calling thread, where the mode is active.
    (On CUDA the backward of CUDA tensors runs on autograd's device thread instead; torch hands
    its thread-local state to that thread, but this was verified on gloo/CPU only.)
    ``comm_debug(enabled=False)`` does nothing and leaves the dict empty.
    """

    def __init__(self, enabled=True):
        self.enabled = enabled  # False: a no-op leaving ``seen`` empty (e.g. every step but the first)
        self.mode = None
        self.seen = {}

    def __enter__(self):
        if not self.enabled:
            return self.seen
        self.mode = _CollectivesSeen()
        self.mode.__enter__()
        return self.seen

    def __exit__(self, *exc):
        if self.mode is None:
            return False
        self.mode.__exit__(*exc)
        for name, calls in self.mode.calls.items():
            kind = TORCH_COMM_NAMES.get(name, name)
            self.seen[kind] = self.seen.get(kind, 0) + calls
        return False


class _CollectivesSeen(TorchDispatchMode):
    """The dispatch mode behind ``comm_debug``: counts TORCH_COLLECTIVES by op name."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t.__name__ == "DTensor" for t in types):
            return NotImplemented  # let DTensor lower to plain collectives first, as CommDebugMode does
        out = func(*args, **(kwargs or {}))
        packet = getattr(func, "_overloadpacket", None)
        if packet is not None and packet.__name__ in TORCH_COLLECTIVES.get(func.namespace, ()):
            self.calls[packet.__name__] += 1
        return out
