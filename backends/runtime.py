"""runtime.py: what an emitted program needs besides torch (process group, mesh, collectives).

This file must import nothing but torch and the standard library: it is copied verbatim next
to every emitted program. It holds no model knowledge; the program passes in every decision.

- ``setup`` starts (or joins) the process group: NCCL when CUDA is present, gloo otherwise;
  without torchrun's environment it runs as a single process.
- ``Mesh`` maps ranks to mesh coordinates (row-major) and holds one process group per axis.
- ``local_slice`` cuts a full tensor to this rank's shard for an nd-SBP such as ``("S(0)", "B")``.
- Collectives count the bytes they are handed (``COMM_BYTES``), so a run can be compared with the
  plan's predicted payload.
"""

import json
import os
import socket
from collections import Counter

import torch
import torch.distributed as dist

COMM_BYTES: Counter = Counter()  # collective name -> payload bytes handed to it on this rank
COMM_CALLS: Counter = Counter()


class Mesh:
    """Ranks laid out row-major on ``shape``; ``groups[axis]`` holds this rank's group on that axis."""

    def __init__(self, shape, device):
        self.shape = tuple(shape)
        self.device = device
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()
        expected = 1
        for n in self.shape:
            expected *= n
        if expected != self.size:
            raise SystemExit(f"this program was compiled for a mesh of {expected} devices {self.shape}, "
                             f"but {self.size} processes started; run torchrun --nproc_per_node {expected}")
        self.coords = self._coords(self.rank)
        self.groups = {}
        for axis in range(len(self.shape)):
            if len(self.shape) == 1:
                self.groups[axis] = dist.group.WORLD
                continue
            # every rank must create every group, in the same order
            for ranks in self._axis_groups(axis):
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    self.groups[axis] = group

    def _coords(self, rank):
        coords = []
        for n in reversed(self.shape):
            coords.append(rank % n)
            rank //= n
        return tuple(reversed(coords))

    def _axis_groups(self, axis):
        seen = {}
        for rank in range(self.size):
            key = tuple(c for a, c in enumerate(self._coords(rank)) if a != axis)
            seen.setdefault(key, []).append(rank)
        return list(seen.values())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(mesh_shape):
    """Join the process group torchrun describes (or start a 1-process one); return (mesh, owned).

    ``owned`` is True when this call created the process group and so should destroy it.
    """
    owned = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        owned = True
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Mesh(mesh_shape, device), owned


def teardown(owned):
    """End the process group if ``setup`` started it. The barrier first keeps a fast rank from
    tearing down gloo's connections while a slow one still uses them (that aborts the process)."""
    if owned and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def local_slice(full, mesh, sbp):
    """This rank's shard of ``full`` under the nd-SBP ``sbp`` (one of "S(d)", "B", "P" per axis).

    Splits are balanced like torch.chunk on an evenly divisible dim; the plan guarantees that.
    For "P" the value is kept on coordinate 0 of that axis and zero elsewhere (B -> P, local).
    """
    out = full
    for axis, entry in enumerate(sbp):
        if entry.startswith("S("):
            dim = int(entry[2:-1])
            n = mesh.shape[axis]
            if out.shape[dim] % n:
                raise ValueError(f"dim {dim} of size {out.shape[dim]} does not split over {n} devices")
            out = out.chunk(n, dim=dim)[mesh.coords[axis]]
        elif entry == "P":  # as partial_from_whole: each device's share is 1/n, the shares sum to the whole
            out = out / mesh.shape[axis]
    return out.contiguous()


def param(name, shape, init, std, seed, mesh, sbp, init_full):
    """A parameter holding this rank's shard of the deterministic full initial value."""
    full = init_full(name, tuple(shape), init, std, seed)
    return torch.nn.Parameter(local_slice(full, mesh, sbp).to(mesh.device))


def _count(name, tensor):
    COMM_BYTES[name] += tensor.numel() * tensor.element_size()
    COMM_CALLS[name] += 1


def all_reduce(tensor, mesh, axis):
    """Sum ``tensor`` in place over the ranks of mesh axis ``axis`` (P -> B); returns it."""
    _count("all_reduce", tensor)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=mesh.groups[axis])
    return tensor


class _SumOverAxis(torch.autograd.Function):
    """P -> B inside the forward: all-reduce (sum); its backward all-reduces the gradient, since
    every device's share of the loss used the summed value."""

    @staticmethod
    def forward(ctx, tensor, mesh, axis):
        ctx.mesh, ctx.axis = mesh, axis
        return all_reduce(tensor.clone(), mesh, axis)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(), ctx.mesh, ctx.axis), None, None


def reduce_partial(tensor, mesh, axis):
    """A partial sum made whole on mesh axis ``axis`` (P -> B), differentiably."""
    return _SumOverAxis.apply(tensor, mesh, axis)


def partial_from_whole(tensor, mesh, axis):
    """A whole value as a partial sum on ``axis`` (B -> P): each device holds 1/n of it."""
    return tensor / mesh.shape[axis]


def all_gather(tensor, mesh, axis, dim):
    """Concatenate the shards of mesh axis ``axis`` along ``dim`` (S(dim) -> B), outside autograd."""
    _count("all_gather", tensor)
    parts = [torch.empty_like(tensor) for _ in range(mesh.shape[axis])]
    dist.all_gather(parts, tensor.contiguous(), group=mesh.groups[axis])
    return torch.cat(parts, dim=dim)


def gather_full(tensor, mesh, sbp):
    """The full logical tensor from every rank's shard (for checkpoints and checks)."""
    out = tensor.detach()
    for axis in reversed(range(len(sbp))):
        entry = sbp[axis]
        if entry.startswith("S("):
            out = all_gather(out, mesh, axis, int(entry[2:-1]))
        elif entry == "P":
            out = all_reduce(out.clone(), mesh, axis)
    return out


def dump(path, mesh, losses, named_shards):
    """Write losses, measured communication and the full final parameters (rank 0 only).

    ``named_shards`` is a list of (canonical name, local tensor, sbp). Every rank must call it
    (gathering is collective). Writes ``path`` (JSON) and ``path + '.pt'`` (a state dict).
    """
    comm = {"bytes": dict(COMM_BYTES), "calls": dict(COMM_CALLS)}
    state = {name: gather_full(t, mesh, sbp).cpu() for name, t, sbp in named_shards}
    if mesh.rank == 0:
        torch.save(state, path + ".pt")
        with open(path, "w") as f:
            json.dump({"losses": losses, "comm": comm, "world_size": mesh.size, "params": path + ".pt"}, f, indent=1)
