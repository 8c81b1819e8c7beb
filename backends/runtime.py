"""runtime.py: what an emitted program needs besides torch (process group, mesh, collectives).

This file must import nothing but torch and the standard library (and its neighbours, which import it:
fsdp_groups.py and grad_buckets.py at its end, re-exported here, and expert_parallel.py when called):
it is copied verbatim next to every emitted program. It holds no model knowledge; the program passes
in every decision.

- ``setup`` starts (or joins) the process group: NCCL when CUDA is present, gloo otherwise;
  without torchrun's environment it runs as a single process. The mesh is torch's ``DeviceMesh``.
  On a CPU host it keeps each of a node's ranks on cores of its own (``pin_to_cores``).
- ``Mesh`` gives this rank's coordinates, one process group per axis and the index range a rank
  holds of a split dim (``shard_range``).
- Layouts are nd-SBPs: one of "S(d)" (split on dim d), "B" (broadcast) or "P" (partial sum) per
  mesh axis. When several axes split one dim, axis 0 is the outer split (then each chunk over the
  next axis, ...), everywhere in this file.
- Collectives are differentiable (each is a ``torch.autograd.Function`` whose backward runs the
  dual collective) and count what they are handed: every call, forward or backward, adds the
  bytes of the local tensor given to the collective to ``COMM_BYTES[kind]`` and 1 to
  ``COMM_CALLS[kind]``, so a run can be compared with the plan's predicted payload. Kinds:
  "all_reduce", "all_gather", "reduce_scatter", "all_to_all".
- ``vocab_parallel_cross_entropy`` and ``expert_parallel_ffn`` (expert_parallel.py's) are ops whose
  shard-local form needs collectives inside.
  Every rank of an axis must make the same calls in the same order, backward included (an SPMD
  program does); ``expert_parallel_ffn`` keeps that true even for a rank no token is routed to.
- ``comm_debug`` counts the collectives torch's dispatcher runs (as CommDebugMode does), a check on ours;
  ``gather_full`` and ``dump`` communicate uncounted (checks and results, not the step).
- ``param`` builds only this rank's shard of a parameter (``seeded.init_shard``), never the whole.
- ``forward_in`` runs the model on copies of its weights in the plan's compute dtype (mixed
  precision: bfloat16 copies of float32 master weights).
- ``GradBuckets`` (grad_buckets.py) synchronises gradients in the plan's flat buckets, each launched
  during the backward as soon as its gradients are ready; ``gather_group`` and ``prefetch_group``
  (fsdp_groups.py) gather a layer's fsdp-sharded parameters by one all-gather per axis.
"""

import json
import os
import socket
import sys
import time
from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.utils._python_dispatch import TorchDispatchMode

COMM_BYTES: Counter = Counter()  # collective kind -> payload bytes handed to it on this rank
COMM_CALLS: Counter = Counter()  # collective kind -> calls on this rank (forward and backward)
PARAM_BYTES = 0  # bytes of the parameter shards ``param`` made on this rank (as made: float32)
INIT_PEAK_BYTES = 0  # the most bytes one init_shard call held on this rank (its shard + one block)

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


def reset_counters():
    """Zero COMM_BYTES, COMM_CALLS, PARAM_BYTES and INIT_PEAK_BYTES (one program run's record)."""
    global PARAM_BYTES, INIT_PEAK_BYTES
    COMM_BYTES.clear()
    COMM_CALLS.clear()
    PARAM_BYTES = 0
    INIT_PEAK_BYTES = 0


# ---- mesh and set-up ----------------------------------------------------------------------------


def _prod(values):
    out = 1
    for v in values:
        out *= v
    return out


class Mesh:
    """Ranks laid out row-major on ``shape`` by torch's DeviceMesh (``init_device_mesh``).

    ``coords[axis]`` is this rank's coordinate on each axis and ``group(axis)`` the process group
    of the ranks that differ from this one only on that axis (what a collective on that axis uses).
    """

    def __init__(self, shape, device):
        self.shape = tuple(int(n) for n in shape)
        self.device = device
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()
        expected = _prod(self.shape)
        if expected != self.size:  # checked before DeviceMesh, whose own error names no remedy
            raise SystemExit(f"this program was compiled for a mesh of {expected} devices {self.shape}, "
                             f"but {self.size} processes started; run torchrun --nproc_per_node {expected}")
        self.device_mesh = init_device_mesh(device.type, self.shape)
        coords = self.device_mesh.get_coordinate()
        self.coords = tuple(int(c) for c in coords)
        self.groups = {axis: self.device_mesh.get_group(axis) for axis in range(len(self.shape))}

    def group(self, axis):
        """The process group of mesh axis ``axis`` that this rank belongs to."""
        return self.groups[axis]

    def shard_range(self, total, splits, chunks=False, coords=None):
        """(start, stop) of the indices this rank (or the rank at ``coords``) holds of a dim of size
        ``total`` split over the mesh axes ``splits`` (outermost first: over splits[0], then each chunk
        over splits[1], ...).

        Splits are even (torch.chunk of a divisible size); anything else is a ValueError, unless
        ``chunks``: then a size that does not divide is split as torch.chunk and DTensor's Shard do
        (every coordinate gets ceil(size / n) indices, the last ones what is left, possibly none), the
        uneven number-wise placement of a value table's rows (passes/placement.py).
        """
        coords = self.coords if coords is None else coords
        start, size = 0, int(total)
        for axis in splits:
            n = self.shape[axis]
            if size % n and not chunks:
                raise ValueError(f"a dim of size {total} does not split evenly over mesh axes {tuple(splits)} "
                                 f"of sizes {tuple(self.shape[a] for a in splits)} (size {size} over {n})")
            block = -(-size // n)
            offset = min(coords[axis] * block, size)
            start, size = start + offset, min(block, size - offset)
        return start, start + size


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(mesh_shape, timeout=None):
    """Join the process group torchrun describes (or start a 1-process one); return (mesh, owned).

    ``owned`` is True when this call created the process group and so should destroy it.
    ``timeout`` (a timedelta) bounds every collective's wait (torch's default: 30 minutes on gloo).
    """
    owned = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timeout)
        owned = True
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        pin_to_cores()
    return Mesh(mesh_shape, device), owned


HOST_CORES = None  # the cores this process could run on before ``pin_to_cores`` narrowed them


def rank_cores(cores, local_rank, local_world):
    """The cores of local rank ``local_rank`` of ``local_world`` on a host of ``cores``: an equal
    block each where there are enough (a rank's intra-op threads stay on its block), else one core,
    round robin (ranks ``r`` and ``r + len(cores)`` share one)."""
    cores = sorted(cores)
    block = max(1, len(cores) // local_world)
    start = local_rank * block % len(cores)
    return cores[start:start + block]


def pin_to_cores():
    """Keep this rank on cores of its own (``rank_cores``) when a node runs several ranks on CPUs;
    return them (None: not pinned). Left to the scheduler, two ranks that wait on each other's
    collectives share one core by turns and migrate: dense-tiny tp on 2 gloo ranks of a 2-core host
    took 31 to 41 ms a step over three runs unpinned, 24 to 29 pinned (docs/cost-model.md).
    ``ULTRAPLAN_PIN=0`` (or ``off``, ``false``, ``no``) leaves placement to the scheduler (or to
    ``taskset``/``numactl``)."""
    global HOST_CORES
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    asked_not_to = os.environ.get("ULTRAPLAN_PIN", "1").strip().lower() in ("0", "off", "false", "no")
    if local_world < 2 or asked_not_to or not hasattr(os, "sched_setaffinity"):
        return None
    if HOST_CORES is None:
        HOST_CORES = sorted(os.sched_getaffinity(0))
    cores = rank_cores(HOST_CORES, int(os.environ.get("LOCAL_RANK", "0")), local_world)
    os.sched_setaffinity(0, cores)
    return cores


def finish():
    """Leave the process now that every rank's work is done and written, skipping the interpreter's
    teardown: there gloo can abort a finished rank ("terminate called without an active exception",
    a worker thread still holding tensors; pytorch/pytorch PR #179291), which torchrun reports as a
    failed run after training succeeded. Measured on this project's programs: 1 exit in 8."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def teardown(owned):
    """End the process group if ``setup`` started it. The barrier first keeps a fast rank from
    tearing down gloo's connections while a slow one still uses them (that aborts the process)."""
    if owned and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---- layouts ------------------------------------------------------------------------------------


def split_dim(entry):
    """The dim of an "S(d)" entry, None for "B" and "P"; anything else is a ValueError."""
    if entry in ("B", "P"):
        return None
    if entry.startswith("S(") and entry.endswith(")") and entry[2:-1].isdigit():
        return int(entry[2:-1])
    raise ValueError(f"unknown SBP entry {entry!r} (expected 'S(d)', 'B' or 'P')")


def _split_axes(sbp, ndim):
    """dim -> the mesh axes splitting it, in axis order (axis 0 is the outer split)."""
    axes = {d: [] for d in range(ndim)}
    for axis, entry in enumerate(sbp):
        dim = split_dim(entry)
        if dim is not None:
            if dim >= ndim:
                raise ValueError(f"{entry} on mesh axis {axis} splits a {ndim}-dim tensor")
            axes[dim].append(axis)
    return axes


def shard_ranges(shape, mesh, sbp, chunks=False):
    """((start, stop), ...) per dim: the part of a ``shape`` tensor this rank holds under ``sbp``.

    "B" and "P" entries leave the ranges whole (a P shard is a share of values, not of indices).
    ``chunks``: sizes that do not divide split as torch.chunk does (``Mesh.shard_range``).
    """
    if len(sbp) != len(mesh.shape):
        raise ValueError(f"sbp {tuple(sbp)} has {len(sbp)} entries for a {len(mesh.shape)}-axis mesh")
    axes = _split_axes(sbp, len(shape))
    return tuple(mesh.shard_range(size, tuple(axes[d]), chunks) for d, size in enumerate(shape))


def local_slice(full, mesh, sbp):
    """This rank's shard of ``full`` under the nd-SBP ``sbp`` (one of "S(d)", "B", "P" per axis).

    Splits are even, several axes on one dim applied in axis order (as ``shard_ranges``).
    For "P" each device keeps full / n on that axis (as ``to_partial``): the shares sum to the whole.
    """
    ranges = shard_ranges(tuple(full.shape), mesh, sbp)
    out = full[tuple(slice(a, b) for a, b in ranges)]
    for axis, entry in enumerate(sbp):
        if entry == "P":
            out = out / mesh.shape[axis]
    return out.contiguous()


# ---- collectives: raw (uncounted) ---------------------------------------------------------------
# These do the communication and nothing else. The public, counted, differentiable functions below
# call them; so does ``gather_full``, whose collectives are checks, not part of a step, and so are
# deliberately not counted.


# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single (same arguments)
# and warns on the old names; older torch has only the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_reduce_raw(t, group, op=None):
    """Reduce the contiguous tensor ``t`` over ``group`` in place (sum unless ``op``)."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return t


def _all_gather_raw(x, group, n, dim):
    """Concatenate the group's ``x`` along ``dim`` in coordinate (group rank) order."""
    x = x.contiguous()
    out = torch.empty((n * x.shape[0], *x.shape[1:]) if x.dim() else (n,), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x.reshape(x.shape if x.dim() else (1,)), group=group)
    if x.dim() == 0 or dim == 0:
        return out
    # out is the shards stacked on a new leading axis: move that axis next to dim and merge them
    return out.view(n, *x.shape).movedim(0, dim).reshape(*x.shape[:dim], n * x.shape[dim], *x.shape[dim + 1:])


def _reduce_scatter_raw(x, group, n, dim):
    """Sum ``x`` over the group; return chunk (group rank) of ``dim`` of the sum."""
    if x.shape[dim] % n:
        raise ValueError(f"reduce_scatter: dim {dim} of size {x.shape[dim]} does not split over {n} devices")
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // n, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, moved, op=dist.ReduceOp.SUM, group=group)
    return out.movedim(0, dim).contiguous()


def _all_to_all_raw(x, group, n, src_dim, dst_dim):
    """Split ``dst_dim`` in n chunks, chunk j to group rank j; concatenate what arrives along src_dim."""
    if x.shape[dst_dim] % n:
        raise ValueError(f"all_to_all: dim {dst_dim} of size {x.shape[dst_dim]} does not split over {n} devices")
    send = torch.stack(x.chunk(n, dim=dst_dim)).contiguous()  # (n, *chunk shape): row j goes to rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    shape = recv.shape[1:]
    # recv[j] came from rank j: concatenate along src_dim (the stacked axis merges into src_dim, outer)
    return recv.movedim(0, src_dim).reshape(*shape[:src_dim], n * shape[src_dim], *shape[src_dim + 1:])


def _all_to_all_rows_raw(x, group, send_counts, recv_counts):
    """Variable all-to-all of dim-0 rows: send_counts[j] rows (in order) to group rank j, receive
    recv_counts[j] rows from rank j, concatenated in rank order."""
    x = x.contiguous()
    out = torch.empty((sum(recv_counts), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x, output_split_sizes=list(recv_counts), input_split_sizes=list(send_counts),
                           group=group)
    return out


def _count(kind, tensor):
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
        _count("all_reduce", out)
        return _all_reduce_raw(out, mesh.group(axis))

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        _count("all_reduce", grad)
        return _all_reduce_raw(grad, ctx.mesh.group(ctx.axis)), None, None


class _AllGather(torch.autograd.Function):
    """S(dim) -> B. Backward: reduce-scatter of the gradient along dim (each rank's gradient is a
    partial sum of the whole gradient; this rank keeps the sum of its own chunk)."""

    @staticmethod
    def forward(ctx, x, mesh, axis, dim):
        ctx.mesh, ctx.axis, ctx.dim = mesh, axis, dim
        _count("all_gather", x)
        return _all_gather_raw(x, mesh.group(axis), mesh.shape[axis], dim)

    @staticmethod
    def backward(ctx, grad):
        _count("reduce_scatter", grad)
        n = ctx.mesh.shape[ctx.axis]
        return _reduce_scatter_raw(grad, ctx.mesh.group(ctx.axis), n, ctx.dim), None, None, None


class _ReduceScatter(torch.autograd.Function):
    """P -> S(dim). Backward: all-gather of the gradient along dim (the gradient of a sum reaches
    every summand whole)."""

    @staticmethod
    def forward(ctx, x, mesh, axis, dim):
        ctx.mesh, ctx.axis, ctx.dim = mesh, axis, dim
        _count("reduce_scatter", x)
        return _reduce_scatter_raw(x, mesh.group(axis), mesh.shape[axis], dim)

    @staticmethod
    def backward(ctx, grad):
        _count("all_gather", grad)
        n = ctx.mesh.shape[ctx.axis]
        return _all_gather_raw(grad, ctx.mesh.group(ctx.axis), n, ctx.dim), None, None, None


class _AllToAll(torch.autograd.Function):
    """S(src_dim) -> S(dst_dim). Backward: the inverse all-to-all, S(dst_dim) -> S(src_dim)."""

    @staticmethod
    def forward(ctx, x, mesh, axis, src_dim, dst_dim):
        ctx.mesh, ctx.axis, ctx.src_dim, ctx.dst_dim = mesh, axis, src_dim, dst_dim
        _count("all_to_all", x)
        return _all_to_all_raw(x, mesh.group(axis), mesh.shape[axis], src_dim, dst_dim)

    @staticmethod
    def backward(ctx, grad):
        _count("all_to_all", grad)
        n = ctx.mesh.shape[ctx.axis]
        return _all_to_all_raw(grad, ctx.mesh.group(ctx.axis), n, ctx.dst_dim, ctx.src_dim), None, None, None, None


class _AllToAllRows(torch.autograd.Function):
    """Variable all-to-all of rows (expert dispatch). Backward: the same exchange reversed (the
    gradient of each received row goes back to the rank and position it came from)."""

    @staticmethod
    def forward(ctx, x, group, send_counts, recv_counts):
        ctx.group, ctx.send_counts, ctx.recv_counts = group, send_counts, recv_counts
        _count("all_to_all", x)
        return _all_to_all_rows_raw(x, group, send_counts, recv_counts)

    @staticmethod
    def backward(ctx, grad):
        _count("all_to_all", grad)
        return _all_to_all_rows_raw(grad, ctx.group, ctx.recv_counts, ctx.send_counts), None, None, None


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
    _count("all_reduce", t)
    return _all_reduce_raw(t, mesh.group(axis))


# the names the emitter used before the collectives above; kept until it switches
reduce_partial = all_reduce
partial_from_whole = to_partial


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


SAVED_BYTES = 0  # bytes of the distinct tensors autograd saved in the forward count_saved watched


class count_saved:
    """``with count_saved(model):`` counts what autograd saves for the backward in the block, via
    ``torch.autograd.graph.saved_tensors_hooks``: each distinct storage once (a value several ops
    save is one tensor in memory), the model's parameters excluded. The total is kept in
    SAVED_BYTES, which ``dump`` reports per rank. ``count_saved(model, enabled=False)`` does nothing.
    """

    def __init__(self, model, enabled=True):
        self.enabled = enabled
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages = {}
        self.hooks = None

    def _pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params and storage.device.type != "meta":
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self):
        if self.enabled:
            self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        global SAVED_BYTES
        if self.hooks is not None:
            self.hooks.__exit__(*exc)
            SAVED_BYTES = sum(self.storages.values())
        return False


# ---- ops whose shard-local form needs collectives -----------------------------------------------


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
            _count("all_reduce", top)
            _all_reduce_raw(top, mesh.group(axis), dist.ReduceOp.MAX)
        exp = torch.exp(z - top.unsqueeze(-1))
        local = targets - vocab_start
        owned = (local >= 0) & (local < v_local)
        column = local.clamp(0, v_local - 1).unsqueeze(-1)
        picked = torch.where(owned, z.gather(-1, column).squeeze(-1), torch.zeros((), dtype=z.dtype, device=z.device))
        sums = torch.stack([exp.sum(dim=-1), picked])  # (2, b, t): one all-reduce for both
        for axis in axes:
            _count("all_reduce", sums)
            _all_reduce_raw(sums, mesh.group(axis))
        total, target_logit = sums[0], sums[1]
        n = _prod(mesh.shape[a] for a in axes)
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


def expert_parallel_ffn(*args, **kwargs):
    """Expert parallelism over one or several mesh axes: expert_parallel.py (shipped beside this file,
    kept apart to keep this one small), here under the name emitted programs call."""
    try:  # inside the ultraplan package
        from . import expert_parallel
    except ImportError:  # beside an emitted program
        import expert_parallel
    return expert_parallel.expert_parallel_ffn(*args, **kwargs)


# ---- mixed precision ----------------------------------------------------------------------------


def forward_in(dtype, model, *args):
    """``model(*args)`` computed on ``dtype`` copies of its floating parameters and buffers (mixed
    precision, as FSDP2's MixedPrecisionPolicy(param_dtype=...) casts before the forward).

    The parameters stay as they are (the float32 master weights the optimizer updates); each copy
    is made once per call (``Tensor.to``, differentiable) and swapped in by
    ``torch.func.functional_call``, so autograd returns every copy's gradient to its master in the
    master's dtype. Activations follow the copies' dtype. When every floating tensor already has
    ``dtype`` (float32 programs, float64 checks) this is ``model(*args)``.
    """
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    floating = {name: t for name, t in named.items() if t.is_floating_point()}
    if all(t.dtype == dtype for t in floating.values()):
        return model(*args)
    return torch.func.functional_call(model, {name: t.to(dtype) for name, t in floating.items()}, args)


# ---- parameters, checks, results ----------------------------------------------------------------


def param(name, shape, init, std, seed, mesh, sbp, init_shard):
    """A Parameter holding only this rank's shard of ``name``'s deterministic initial value.

    ``init_shard`` is ``seeded.init_shard``: it makes the shard alone (block-seeded draws), so no
    rank ever holds a full parameter it does not own. A "P" entry is invalid (a parameter is not a
    partial sum). Adds the shard's bytes to PARAM_BYTES and keeps the largest bytes one init call
    held in INIT_PEAK_BYTES.
    """
    global PARAM_BYTES, INIT_PEAK_BYTES
    if "P" in sbp:
        raise ValueError(f"parameter {name} cannot be placed {tuple(sbp)}: a parameter is never a partial sum")
    shape = tuple(int(s) for s in shape)
    stats = {}
    shard = init_shard(name, shape, init, std, seed, shard_ranges(shape, mesh, sbp, chunks=True), stats=stats)
    peak = stats.get("peak_bytes", 0)
    PARAM_BYTES += shard.numel() * shard.element_size()
    INIT_PEAK_BYTES = max(INIT_PEAK_BYTES, peak)
    out = torch.nn.Parameter(shard.to(mesh.device))
    out.full_shape = shape  # the logical shape: gather_full needs it where a split does not divide
    return out


def gather_full(tensor, mesh, sbp, shape=None):
    """The full logical tensor from every rank's shard (for checkpoints and checks).

    Uses the raw collectives: NOT counted in COMM_BYTES / COMM_CALLS (a check, not the step).
    Axes are undone innermost first, the inverse of the axis-0-outer split order. ``shape`` (the
    logical shape) is needed only where a split does not divide (``shard_range``'s chunks): each
    shard is padded to the largest, gathered, and the padding dropped.
    """
    out = tensor.detach()
    stages = _chunk_stages(shape, mesh, sbp) if shape is not None else {}
    for axis in reversed(range(len(sbp))):
        dim = split_dim(sbp[axis])
        if dim is not None and axis in stages:
            out = _gather_chunks(out, mesh.group(axis), mesh.shape[axis], dim, stages[axis])
        elif dim is not None:
            out = _all_gather_raw(out, mesh.group(axis), mesh.shape[axis], dim)
        elif sbp[axis] == "P":
            out = _all_reduce_raw(out.clone(memory_format=torch.contiguous_format), mesh.group(axis))
    return out


def _chunk_stages(shape, mesh, sbp):
    """Mesh axis -> the size of the dim it splits before it does (only for splits that do not divide)."""
    axes = _split_axes(sbp, len(shape))
    out = {}
    for dim, split in axes.items():
        size = int(shape[dim])
        for axis in split:
            n = mesh.shape[axis]
            if size % n:
                out[axis] = size
            block = -(-size // n)
            size = max(0, min(block, size - mesh.coords[axis] * block))
    return out


def _gather_chunks(x, group, n, dim, size):
    """Concatenate the group's torch.chunk shares of a dim of ``size`` along ``dim``: padded, gathered, trimmed."""
    block = -(-size // n)
    pad = list(x.shape)
    pad[dim] = block - x.shape[dim]
    padded = torch.cat([x, x.new_zeros(pad)], dim=dim)
    whole = _all_gather_raw(padded, group, n, dim)
    keep = [min(block, max(0, size - j * block)) for j in range(n)]
    return torch.cat([whole.narrow(dim, j * block, k) for j, k in enumerate(keep)], dim=dim)


def dump(path, mesh, losses, named_shards, extra=None):
    """Write losses, measured communication and the full final parameters (rank 0 writes).

    ``named_shards`` is a list of (canonical name, local tensor, sbp). Every rank must call it
    (gathering is collective). Writes ``path`` (JSON) and ``path + '.pt'`` (a state dict). The
    JSON holds rank 0's ``comm`` (bytes and calls by kind), every rank's in ``comm_by_rank``
    (a list in rank order), and per rank ``param_bytes`` (the local shards' bytes as they are
    now, in the run's dtype), ``init_peak_bytes`` (INIT_PEAK_BYTES) and ``saved_activation_bytes``
    (SAVED_BYTES, the first step's). None of the gathering
    here is counted. ``extra`` (a dict of JSON values, rank 0's) is merged into the JSON.
    """
    comm = {"bytes": dict(COMM_BYTES), "calls": dict(COMM_CALLS)}
    mine = {"comm": comm, "param_bytes": sum(t.numel() * t.element_size() for _, t, _ in named_shards),
            "init_peak_bytes": INIT_PEAK_BYTES, "saved_bytes": SAVED_BYTES}
    everyone = [None] * mesh.size
    dist.all_gather_object(everyone, mine)
    state = {name: gather_full(t, mesh, sbp, getattr(t, "full_shape", None)).cpu() for name, t, sbp in named_shards}
    if mesh.rank == 0:
        torch.save(state, path + ".pt")
        result = {"losses": losses, "comm": comm, "world_size": mesh.size, "params": path + ".pt",
                  "comm_by_rank": [r["comm"] for r in everyone],
                  "param_bytes": [r["param_bytes"] for r in everyone],
                  "init_peak_bytes": [r["init_peak_bytes"] for r in everyone],
                  "saved_activation_bytes": [r["saved_bytes"] for r in everyone]}
        result.update(extra or {})
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


# ---- step timing --------------------------------------------------------------------------------


def synced_clock():
    """``time.perf_counter()`` once every rank has reached this point and the device has finished its
    queued work: the difference of two readings is the step every rank took, the slowest included
    (a GPU's kernels run asynchronously to the Python that launches them)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dist.barrier()
    return time.perf_counter()


# ---- shipped beside this file: the names a program calls on ``runtime`` ----------------------------

try:  # at the end: each imports this module, whole by now
    from .fsdp_groups import gather_group, prefetch_group, with_following
    from .grad_buckets import GradBuckets
except ImportError:
    from fsdp_groups import gather_group, prefetch_group, with_following  # noqa: F401
    from grad_buckets import GradBuckets  # noqa: F401
