"""fsdp_groups.py: fsdp's gather groups, one all-gather per layer and axis (with FSDP2's prefetch).

Copied verbatim next to every emitted program, beside runtime.py (which imports nothing of it but
re-exports ``prefetch_group``, ``gather_group`` and ``with_following``, the names a program calls):
torch, the standard library and collectives.py only. A layer's parameters gathered over one mesh axis go
as one flat buffer, as torch's FSDP2 groups a block's parameters (torch/distributed/fsdp/_fully_shard/
_fsdp_param_group.py); the backward reduce-scatters their gradients the same way.
"""

import torch
import torch.distributed as dist

try:  # inside the ultraplan package, and beside an emitted program (shipped there as plain files)
    from . import collectives
except ImportError:
    import collectives

# One layer's sharded parameters gathered by one all-gather, as FSDP2 does
# (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py, foreach_all_gather / foreach_reduce).


def _flat_shards(tensors, dims):
    """Each tensor with its split dim moved first, flattened, concatenated: one rank's flat buffer."""
    return torch.cat([t.movedim(d, 0).reshape(-1) for t, d in zip(tensors, dims)])


class _InFlight:
    """One gather group's collectives: the all-gather started by ``_start_gather`` (perhaps a layer
    early: ``prefetch_group``) and, in the backward, the reduce-scatter of its gradients, which
    ``_ShardsIn``'s backward waits for."""

    def __init__(self, mesh, axis, dims, shards):
        self.mesh, self.axis, self.dims = mesh, axis, tuple(dims)
        self.shapes = [s.movedim(d, 0).shape for s, d in zip(shards, dims)]
        self.shard_shapes = [s.shape for s in shards]
        flat = _flat_shards([s.detach() for s in shards], dims)
        collectives.count("all_gather", flat)
        n = mesh.shape[axis]
        self.rows = torch.empty((n * flat.numel(),), dtype=flat.dtype, device=flat.device)
        self.work = collectives.all_gather_single(self.rows, flat, group=mesh.group(axis), async_op=True)
        self.reduced = self.reduce_work = None


class _ShardsIn(torch.autograd.Function):
    """Identity on a gather group's shards, applied when its all-gather starts. Its backward waits for
    the group's reduce-scatter and hands each shard its gradient. Made before the layer ahead of the
    group runs (when the group is prefetched), it comes after that layer's ops in the backward's
    order (torch's engine runs the latest-made ready node first), so the reduce-scatter travels while
    that layer's backward computes, as FSDP2 overlaps its reduce-scatters (_fsdp_param_group.py)."""

    @staticmethod
    def forward(ctx, flight, *shards):
        ctx.flight = flight
        return tuple(s.view_as(s) for s in shards)

    @staticmethod
    def backward(ctx, *placeholders):
        flight = ctx.flight
        flight.reduce_work.wait()
        out, start, mine = [], 0, flight.reduced.view(-1)
        for shape, d in zip(flight.shapes, flight.dims):
            out.append(mine[start:start + shape.numel()].view(shape).movedim(0, d).contiguous())
            start += shape.numel()
        flight.reduced = flight.reduce_work = None
        return (None, *out)


class _GatherGroup(torch.autograd.Function):
    """Local shards (each split on its ``dims`` entry) -> the full parameters, by one all-gather of
    the concatenated shards (started by ``_InFlight``, waited for here). Row r of the gathered (n, L)
    buffer is rank r's flat buffer, so each parameter is its pieces of the n rows, concatenated along
    its dim. Backward: each full gradient cut into its n chunks along dim, rank r's chunks of all
    parameters concatenated into row r, one reduce-scatter of the (n, L) buffer, started here and
    waited for by ``_ShardsIn`` (this rank's row splits back into its shards' gradients there); the
    gradients returned here are placeholders that only ``_ShardsIn`` receives, and it ignores them."""

    @staticmethod
    def forward(ctx, flight, *shards):
        ctx.flight = flight
        flight.work.wait()
        n = flight.mesh.shape[flight.axis]
        rows = flight.rows.view(n, -1)
        out, start = [], 0
        for shape, d in zip(flight.shapes, flight.dims):
            size = shape.numel()
            piece = rows[:, start:start + size].reshape(n * shape[0], *shape[1:])
            out.append(piece.movedim(0, d).contiguous())
            start += size
        flight.rows = flight.work = None
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        flight = ctx.flight
        n = flight.mesh.shape[flight.axis]
        like = next(g for g in grads if g is not None)
        grads = [g if g is not None else like.new_zeros((n * s[0], *s[1:])).movedim(0, d)
                 for g, s, d in zip(grads, flight.shapes, flight.dims)]
        rows = torch.cat([g.movedim(d, 0).reshape(n, -1) for g, d in zip(grads, flight.dims)], dim=1)
        collectives.count("reduce_scatter", rows)
        flight.reduced = rows.new_empty((1, rows.shape[1]))  # gloo: (n, L) -> (1, L)
        flight.reduce_work = collectives.reduce_scatter_single(flight.reduced, rows, op=dist.ReduceOp.SUM,
                                                    group=flight.mesh.group(flight.axis), async_op=True)
        flight.sent = rows  # the reduce-scatter reads it until _ShardsIn waits
        placeholder = rows.new_zeros(1)
        return (None, *(placeholder.expand(shape) for shape in flight.shard_shapes))


_PREFETCHED = {}  # (axis, ids of the shards) -> the _InFlight of a group prefetch_group started


def _start_gather(shards, mesh, axis, dims):
    flight = _InFlight(mesh, axis, dims, shards)
    return flight, _ShardsIn.apply(flight, *shards)


def prefetch_group(shards, mesh, axis, dims):
    """Start the all-gather of a gather group now, so that it travels while the layer before it
    computes (FSDP2's forward prefetch, FSDPParamGroup's unshard ahead of use); the group's
    ``gather_group`` call takes the result. Same call and bytes as without the prefetch."""
    _PREFETCHED[(axis, tuple(map(id, shards)))] = _start_gather(shards, mesh, axis, dims)


def gather_group(shards, mesh, axis, dims):
    """The full parameters of ``shards`` (split on mesh ``axis``, each along its entry of ``dims``),
    by one all-gather (the one ``prefetch_group`` started, else one started now); the backward
    reduce-scatters their gradients by one call, waited for when the shards' gradients are due."""
    flight, inputs = _PREFETCHED.pop((axis, tuple(map(id, shards))), None) or _start_gather(shards, mesh, axis, dims)
    return _GatherGroup.apply(flight, *inputs)


def with_following(layers, start, stop, after=None):
    """(layer, the layer after it) for ``layers[start:stop]``: a layer's forward prefetches the gather
    groups of the one after it (``prefetch_group``); the last layer's is ``after`` (the Model, whose
    parameters used after the layers it then prefetches), or None."""
    return [(layers[i], layers[i + 1] if i + 1 < len(layers) else after) for i in range(start, stop)]
