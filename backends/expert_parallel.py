"""expert_parallel.py: a dropless mixture of experts whose experts are split over mesh axes.

Copied verbatim beside every emitted program (as runtime.py and table_parallel.py are); it imports
torch and its neighbour ``collectives`` (the counted, differentiable collectives), nothing of
ultraplan. Emitted programs call it as ``runtime.expert_parallel_ffn`` (runtime.py forwards here), the
name they have always used. GShard's expert parallelism (Lepikhin et al. 2020, arXiv 2006.16668):
each (token, slot) assignment travels to the device holding its expert by all_to_all with variable
splits, the expert runs there, and the result comes back by the inverse exchange.

Over several mesh axes the experts split as DTensor's nested Shard splits them (outer axis first,
each chunk then over the next axis, torch.chunk's shares where they do not divide:
``runtime.Mesh.shard_range``). Unlike table_parallel.py's row lookups, which nest one routing per
axis, a token's row here goes straight to its expert's owner in one exchange over the process group
of every rank that shares this one's other coordinates: each row and result crosses the wire once,
not once per axis, and the counts, ids, rows and results are one call each.
"""

import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:  # inside the ultraplan package
    from . import collectives
except ImportError:  # beside an emitted program
    import collectives


def _members(mesh, axes, coords):
    """The coordinates of the group spanning ``axes`` through ``coords`` (its other coordinates fixed), in
    group order: the spanned coordinates row-major, outer axis first (rank order, as axes ascend)."""
    for sub in itertools.product(*(range(mesh.shape[a]) for a in axes)):
        full = list(coords)
        for a, c in zip(axes, sub):
            full[a] = c
        yield tuple(full)


def spanning_group(mesh, axes):
    """The process group of the ranks that differ from this one only on mesh ``axes`` (ascending).

    One axis is that axis's group; every axis of the mesh is the world. Otherwise every rank creates
    every such group (torch's ``new_group`` is collective over the world), in the same order, on the
    first call (an SPMD program makes it on every rank at the same point); kept on the mesh."""
    if len(axes) == 1:
        return mesh.group(axes[0])
    if len(axes) == len(mesh.shape):
        return dist.group.WORLD
    cache = mesh.__dict__.setdefault("spanning_groups", {})
    if axes not in cache:
        others = [a for a in range(len(mesh.shape)) if a not in axes]
        mine = None
        for fixed in itertools.product(*(range(mesh.shape[a]) for a in others)):
            coords = [0] * len(mesh.shape)
            for a, c in zip(others, fixed):
                coords[a] = c
            group = mesh.new_group([int(mesh.device_mesh.mesh[c]) for c in _members(mesh, axes, coords)])
            if all(mesh.coords[a] == c for a, c in zip(others, fixed)):
                mine = group
        cache[axes] = mine
    return cache[axes]


def expert_stops(mesh, axes, num_experts):
    """(n,) int64: the end of each group member's experts, in group order (torch.chunk's nested shares,
    as ``Mesh.shard_range`` gives them); ascending, so the owner of expert e is the first member whose
    end exceeds e (a member holding none repeats its predecessor's end and owns nothing)."""
    stops = [mesh.shard_range(num_experts, axes, chunks=True, coords=c)[1] for c in _members(mesh, axes, mesh.coords)]
    return torch.tensor(stops, dtype=torch.int64)


def _local_experts(rows, local_ids, w_up, w_gate, w_down, biases, activation):
    """Each local expert on the rows that arrived for it, in place of them (every expert runs, on zero
    rows if none arrived, so every weight gets a gradient, zero where unused). The result depends on the
    rows even where no expert is held (an empty index_add), so that rank's backward runs both exchanges."""
    none = torch.zeros(0, dtype=torch.int64, device=rows.device)
    out = torch.zeros_like(rows).index_add(0, none, rows[none])
    for e in range(w_up.shape[0]):
        sel = torch.nonzero(local_ids == e).squeeze(1)
        h = rows[sel]
        b_up, b_gate = (biases[0][e], biases[1][e]) if biases else (None, None)
        up = F.linear(h, w_up[e], b_up)
        act = F.silu(F.linear(h, w_gate[e], b_gate)) * up if activation == "swiglu" else F.gelu(up, approximate="tanh")
        out = out.index_add(0, sel, F.linear(act, w_down[e]))
    return out


def expert_parallel_ffn(x, indices, gates, w_up, w_gate, w_down, *biases, activation, mesh, num_experts,
                        axis=None, axes=None):
    """Dropless mixture of experts with the experts split over mesh ``axes`` (or one ``axis``).

    x (b, t, d) are this rank's tokens; indices (b, t, k) int64 global expert ids; gates (b, t, k);
    w_up, w_gate (E_local, f, d) and w_down (E_local, d, f) hold this rank's torch.chunk share of the
    experts (DTensor's Shard, nested over ``axes`` outer first: ``Mesh.shard_range(num_experts, axes,
    chunks=True)``; passes/sbp.py's ``fits``), possibly none. ``activation`` is "swiglu" (uses w_gate)
    or "gelu" (tanh approximation; w_gate unused, pass w_up again). ``biases``: none, or the local
    experts' (b_up, b_gate), each (E_local, f) (ops.expert_ffn_biased). Equals ops.expert_ffn (or
    expert_ffn_biased) on this rank's tokens with the full expert weights.

    Steps: each (token, slot) assignment, sorted by expert id (so by owning rank, then expert), sends
    its row of x to the rank owning its expert; that rank runs each local expert on the rows that
    arrived for it; the results go back by the inverse exchange and are gate-weighted and summed per
    token (in expert order, as ops.expert_ffn adds them).

    Collectives, all over the group spanning ``axes`` (n ranks, the product of their sizes) and counted
    as "all_to_all" (A = b*t*k assignments of this rank, R = rows it receives, data-dependent; e the
    element size of x, d its width):
      forward, 4 calls: counts (n int64: 8n B), expert ids (A int64: 8A B), rows (A*d*e B),
        results back (R*d*e B: data-dependent);
      backward, 2 calls: gradient of the results (A*d*e B), gradient of the rows (R*d*e B:
        data-dependent). Counts and ids have no backward.
    Over the group R sums to the sum of A, so the group's total is routing-independent; one rank's R
    is not. A rank that receives nothing, or holds no experts, still takes part in every call.
    """
    if activation not in ("swiglu", "gelu"):
        raise ValueError(f"unknown expert activation {activation!r}")
    axes = (int(axis),) if axes is None else tuple(int(a) for a in axes)
    if not axes or list(axes) != sorted(set(axes)):
        raise ValueError(f"expert parallelism over mesh axes {axes}: give distinct axes, ascending (outer first)")
    first, stop = mesh.shard_range(num_experts, axes, chunks=True)
    if w_up.shape[0] != stop - first:
        sizes = tuple(mesh.shape[a] for a in axes)
        raise ValueError(f"w_up holds {w_up.shape[0]} experts, expected {stop - first} of {num_experts} "
                         f"in torch.chunk's shares over mesh axes {axes} of sizes {sizes}")
    group = spanning_group(mesh, axes)
    stops = expert_stops(mesh, axes, num_experts).to(indices.device)
    b, t, d = x.shape
    k = indices.shape[-1]
    flat_x = x.reshape(b * t, d)
    expert = indices.reshape(-1)
    order = torch.argsort(expert, stable=True)  # by expert id, so by owning rank, then expert
    expert_sorted = expert[order]
    token_sorted = torch.div(order, k, rounding_mode="floor")  # assignment a is token a // k, slot a % k
    gate_sorted = gates.reshape(-1)[order]

    send = torch.bincount(torch.bucketize(expert_sorted, stops, right=True), minlength=stops.numel())
    recv = torch.empty_like(send)
    collectives.count("all_to_all", send)
    dist.all_to_all_single(recv, send.contiguous(), group=group)
    send_counts, recv_counts = send.tolist(), recv.tolist()

    ids = collectives.AllToAllRows.apply(expert_sorted, group, send_counts, recv_counts)
    rows = collectives.AllToAllRows.apply(flat_x[token_sorted], group, send_counts, recv_counts)
    out = _local_experts(rows, ids - first, w_up, w_gate, w_down, biases, activation)
    back = collectives.AllToAllRows.apply(out, group, recv_counts, send_counts)  # rows in this rank's sorted order
    weighted = back * gate_sorted.unsqueeze(-1)
    return torch.zeros_like(flat_x).index_add(0, token_sorted, weighted).reshape(b, t, d)
