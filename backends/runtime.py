"""runtime.py: what an emitted program needs besides torch (process group, mesh, collectives).

This file must import nothing but torch, the standard library and its neighbours: collectives.py,
vocab_parallel.py, fsdp_groups.py and grad_buckets.py (whose names it re-exports: a program calls them
on ``runtime``) and expert_parallel.py (when called). All are copied verbatim next to every emitted
program. It holds no model knowledge; the program passes in every decision.

- ``setup`` starts (or joins) the process group: NCCL when CUDA is present, gloo otherwise;
  without torchrun's environment it runs as a single process. The mesh is torch's ``DeviceMesh``.
  On a CPU host it keeps each of a node's ranks on cores of its own (``pin_to_cores``), and the
  threads of its process groups on all of them (``on_host_cores``).
- ``Mesh`` gives this rank's coordinates, one process group per axis and the index range a rank
  holds of a split dim (``shard_range``).
- Layouts are nd-SBPs: one of "S(d)" (split on dim d), "B" (broadcast) or "P" (partial sum) per
  mesh axis. When several axes split one dim, axis 0 is the outer split (then each chunk over the
  next axis, ...), everywhere in this file.
- Collectives (collectives.py) are differentiable (each is a ``torch.autograd.Function`` whose
  backward runs the dual collective) and count what they are handed in ``COMM_BYTES[kind]`` and
  ``COMM_CALLS[kind]``, so a run can be compared with the plan's predicted payload; ``comm_debug``
  counts what torch's dispatcher runs (as CommDebugMode does), a check on ours.
- ``vocab_parallel_cross_entropy`` (vocab_parallel.py's) and ``expert_parallel_ffn`` (expert_parallel.py's)
  are ops whose shard-local form needs collectives inside.
  Every rank of an axis must make the same calls in the same order, backward included (an SPMD
  program does); ``expert_parallel_ffn`` keeps that true even for a rank no token is routed to.
- ``gather_full`` and ``dump`` communicate uncounted (checks and results, not the step).
- ``param`` builds only this rank's shard of a parameter (``seeded.init_shard``), never the whole.
- ``forward_in`` runs the model on copies of its weights in the plan's compute dtype (mixed
  precision: bfloat16 copies of float32 master weights).
- ``GradBuckets`` (grad_buckets.py) synchronises gradients in the plan's flat buckets, each launched
  during the backward as soon as its gradients are ready; ``gather_group`` and ``prefetch_group``
  (fsdp_groups.py) gather a layer's fsdp-sharded parameters by one all-gather per axis.
"""

import contextlib
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

try:  # inside the ultraplan package, and beside an emitted program (shipped there as plain files)
    from . import collectives, vocab_parallel
    from .fsdp_groups import gather_group, prefetch_group, with_following
    from .grad_buckets import GradBuckets
except ImportError:
    import collectives
    import vocab_parallel
    from fsdp_groups import gather_group, prefetch_group, with_following  # noqa: F401
    from grad_buckets import GradBuckets  # noqa: F401

# collectives.py's collectives and counters and vocab_parallel.py's loss, under the names programs call on
# ``runtime`` (the same objects: runtime.COMM_BYTES is collectives.COMM_BYTES)
COMM_BYTES, COMM_CALLS, comm_debug = collectives.COMM_BYTES, collectives.COMM_CALLS, collectives.comm_debug
all_reduce, all_reduce_, all_gather = collectives.all_reduce, collectives.all_reduce_, collectives.all_gather
reduce_scatter, all_to_all = collectives.reduce_scatter, collectives.all_to_all
slice_local, to_partial = collectives.slice_local, collectives.to_partial
vocab_parallel_cross_entropy = vocab_parallel.vocab_parallel_cross_entropy

PARAM_BYTES = 0  # bytes of the parameter shards ``param`` made on this rank (as made: float32)
INIT_PEAK_BYTES = 0  # the most bytes one init_shard call held on this rank (its shard + one block)


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

    def new_group(self, ranks=None, **options):
        """``dist.new_group(ranks, **options)`` (collective over the world), its threads off this rank's
        cores (``on_host_cores``)."""
        with on_host_cores():
            return dist.new_group(ranks, **options)

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
        return Mesh(mesh_shape, device), owned
    device = torch.device("cpu")
    with on_host_cores():  # the mesh's process groups start their threads: off this rank's cores
        mesh = Mesh(mesh_shape, device)
    pin_to_cores()
    return mesh, owned


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


@contextlib.contextmanager
def on_host_cores():
    """Run the body on every core of the host, then return to this rank's own (where it was pinned).

    A thread starts on its parent's cores: gloo's worker threads, started when a process group is made,
    would otherwise share this rank's one core with it, and each collective would wait for the rank's
    own thread to yield. Measured here (2 gloo ranks, 2 cores): a 1 KiB all_reduce between tiny ops on
    a group made after pinning took 1.2 to 1.9 ms, on one made before it 0.6 to 1.0 ms. Groups are made
    inside this (``setup``'s mesh, ``Mesh.new_group``'s)."""
    if HOST_CORES is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, HOST_CORES)
    try:
        yield
    finally:
        os.sched_setaffinity(0, own)


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
            out = collectives.all_gather_raw(out, mesh.group(axis), mesh.shape[axis], dim)
        elif sbp[axis] == "P":
            out = collectives.all_reduce_raw(out.clone(memory_format=torch.contiguous_format), mesh.group(axis))
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
    whole = collectives.all_gather_raw(padded, group, n, dim)
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
