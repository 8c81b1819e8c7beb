"""table_parallel.py: number-wise value-table lookups routed to the devices that own the rows.

Copied verbatim beside every emitted program (as runtime.py is); it imports torch and its neighbours
``collectives`` (the counted, differentiable collectives) and ``ops``, nothing of ultraplan. A table placed
number-wise holds rows [start, start + R) on each device (split outer mesh axis first, as everywhere
in runtime.py); rows that do not divide split as torch.chunk does (runtime.Mesh.shard_range's
``chunks``: ceil(rows / n) per coordinate, the last ones what is left, possibly none). Each (token,
pick) id goes to the device owning its row by all_to_all with variable
splits, the row comes back the same way: the UltraMem paper's number-wise partition (Huang et al.
2025, arXiv 2411.12364), and the dispatch GShard uses for experts (runtime.expert_parallel_ffn).
Over several mesh axes the routing nests: first to the owner's coordinate on the outer axis, there
to its coordinate on the next, and back in reverse.

A dimension-wise table whose value dim does not divide reads its own columns (torch.chunk's share)
of every picked row into a zero row of the whole width (``gather_rows_columns``,
``gather_weighted_sum_columns``, the fused pooling ``gather_core_pool_columns``) or dots them with its
columns of the token's hidden (``gather_row_dot_columns``): no collective inside; the partial outputs
are reduced by the plan's boxing.

Collectives per axis, counted as "all_to_all" by collectives.py (A = ids this device sends on that axis,
R = rows it receives there, data-dependent; e the table's element size, D its local width):
forward 3 calls: counts (n int64), ids (A int64), rows back (R*D*e); backward 1 call: the rows'
gradients to their owners (A*D*e). Ids have no backward. A device that receives no ids still takes
part in every call; its table shard then gets a zero gradient.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:  # inside the ultraplan package
    from ..compiler import ops
    from . import collectives
except ImportError:  # beside an emitted program
    import collectives
    import ops


def _route(table, ids, mesh, axes, row_start, rows, as_sent=False):
    """Rows of ``table`` (this device's block) for global ``ids`` (A,) within [row_start, row_start +
    rows), the rows the devices of ``axes`` hold together; ``as_sent``: the rows in the order they
    came back and where each id's row is among them, (rows, (A,) positions), not put in id order."""
    if not axes:
        found = F.embedding(ids - row_start, table)
        return (found, torch.arange(ids.numel(), device=ids.device)) if as_sent else found
    axis, n = axes[0], mesh.shape[axes[0]]
    block = max(1, -(-rows // n))  # torch.chunk's share: ceil(rows / n), the last coordinates what is left
    group = mesh.group(axis)
    owner = torch.div(ids - row_start, block, rounding_mode="floor")
    order = torch.argsort(owner, stable=True)  # by owning coordinate
    send = torch.bincount(owner, minlength=n)
    recv = torch.empty_like(send)
    collectives.count("all_to_all", send)
    dist.all_to_all_single(recv, send.contiguous(), group=group)
    send_counts, recv_counts = send.tolist(), recv.tolist()
    ids_in = collectives.AllToAllRows.apply(ids[order], group, send_counts, recv_counts)
    offset = min(mesh.coords[axis] * block, rows)
    rows_in = _route(table, ids_in, mesh, axes[1:], row_start + offset, min(block, rows - offset))
    back = collectives.AllToAllRows.apply(rows_in, group, recv_counts, send_counts)  # in ``order``
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return (back, inverse) if as_sent else back[inverse]


def routed_gather_rows(table, indices, *, mesh, axes, num_rows):
    """``ops.gather_rows`` with the table's ``num_rows`` rows split over mesh ``axes``: (..., D) rows
    for this device's ``indices``, fetched from their owners."""
    rows = _route(table, indices.reshape(-1), mesh, tuple(axes), 0, int(num_rows))
    return rows.view(*indices.shape, table.shape[1])


def routed_gather_weighted_sum(table, indices, weights, *, mesh, axes, num_rows):
    """``ops.gather_weighted_sum`` with the table's rows split over mesh ``axes``: the picked rows come
    from their owners (routed_gather_rows), the weights stay here, and each token's bag is pooled here."""
    b, t = indices.shape[:2]
    rows = routed_gather_rows(table, indices, mesh=mesh, axes=axes, num_rows=num_rows)
    return torch.einsum("bnd,bn->bd", rows.reshape(b * t, -1, table.shape[1]),
                        weights.reshape(b * t, -1)).view(b, t, table.shape[1])


def gather_rows_columns(table, indices, *, col_start, total_cols):
    """``ops.gather_rows`` with the table's ``total_cols`` value columns in torch.chunk's shares: this
    device's columns [col_start, col_start + D_local) of every picked row, in a zero row of the whole
    width, so the devices' outputs sum to the lookup (the plan reduces them); the backward keeps the
    gradient of this device's columns."""
    rows = F.embedding(indices, table)
    return F.pad(rows, (int(col_start), int(total_cols) - int(col_start) - table.shape[1]))


def gather_weighted_sum_columns(table, indices, weights, *, col_start, total_cols):
    """``ops.gather_weighted_sum`` with the value columns in torch.chunk's shares: each token's bag of
    this device's columns, weighted, in a zero row of the whole width (the devices' outputs sum to the
    bag; each weight's gradient is the sum of the devices' column dots, which the reduction gives)."""
    b, t = indices.shape[:2]
    rows = F.embedding(indices.reshape(b * t, -1), table)
    bags = torch.einsum("bnd,bn->bd", rows, weights.reshape(b * t, -1)).view(b, t, table.shape[1])
    return F.pad(bags, (int(col_start), int(total_cols) - int(col_start) - table.shape[1]))


def gather_row_dot_columns(table, indices, x, *, col_start, total_cols):
    """``ops.gather_row_dot`` with the value columns in torch.chunk's shares (UltraMemV2's pre-values): a dot
    product over the value dim is the sum of its columns' dots, so each device dots its columns of every
    picked row with the same columns of its token's hidden (the fused op, its kernel if installed) and the
    devices' partial dots sum to the whole; the hidden's gradient is nonzero on this device's columns only,
    and the plan's boxing of the hidden sums the devices' gradients as it sums the dots."""
    del total_cols  # the hidden is whole: its columns are where the table's are
    return ops.gather_row_dot(table, indices, x.narrow(-1, int(col_start), table.shape[1]).contiguous())


def gather_core_pool_columns(table, indices, weights, *, col_start, total_cols):
    """``ops.gather_core_pool`` with the value columns in torch.chunk's shares (UltraMemV2's values): this
    device's columns pooled, each with the weights of the core whose chunk holds it (``ops``'s column form,
    whose column groups follow any shard start), in a zero row of the whole width, so the devices' outputs
    sum to the pooling."""
    pooled = ops.gather_core_pool_columns(table, indices, weights, int(col_start), int(total_cols))
    return F.pad(pooled, (int(col_start), int(total_cols) - int(col_start) - table.shape[1]))


def routed_gather_core_pool(table, indices, weights, *, mesh, axes, num_rows):
    """``ops.gather_core_pool`` with the table's rows split over mesh ``axes``: the picked rows come
    from their owners as routed_gather_rows fetches them, and the fused pooling reads each where it
    arrived (its index: the routing's inverse permutation), so they are never copied into pick order."""
    arrived, where = _route(table, indices.reshape(-1), mesh, tuple(axes), 0, int(num_rows), as_sent=True)
    return ops.gather_core_pool(arrived, where.view(indices.shape), weights)


def routed_gather_ive_pool(table, indices, weights, blocks, *, num_blocks, mesh, axes, num_rows):
    """``ops.gather_ive_pool`` with the table's rows split over mesh ``axes``, as routed_gather_core_pool."""
    arrived, where = _route(table, indices.reshape(-1), mesh, tuple(axes), 0, int(num_rows), as_sent=True)
    return ops.gather_ive_pool(arrived, where.view(indices.shape), weights, blocks, num_blocks)
