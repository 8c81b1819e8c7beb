"""Value-table and expert placement by hand: ``--place TABLE=number|dim|replicate``.

A value table (UltraMem, UltraMemV2 values and pre-values, PKM and Memory+'s shared values, PEER's
down and up tables: the parameters of the ``values`` optimizer group) or an MoE expert weight is
placed per mesh axis in one of three ways (the UltraMem paper's partitions, Huang et al. 2025,
arXiv 2411.12364 sec. 4.7; experts: GShard's expert parallelism and Megatron's expert width split):

- ``replicate`` (``B``): every device holds the whole table; lookups are local, gradients reduced;
- ``number`` (``S(0)``: rows, or the expert index): each device holds a block of rows; the lookup
  runs the op table's ``rows_owned`` variant (ids all-gathered, zeros for rows held elsewhere,
  partial outputs summed) or, for experts, ``expert_parallel`` (tokens routed by all_to_all);
- ``dim`` (``S(1)``: the value dim; experts: their hidden width as tensor parallelism splits it):
  each device holds a slice of every row and reads it for every token (the einsum split of the
  value dim ``d`` in gather_rows' dims ``.d,*->*d``).

These are pins on the parameter nodes, resolved here and handed to the ``--force`` machinery
(``strategies.forced_pins``): the parameter is stored and used as placed, and the propagation or
the search (``--strategy auto``) picks the lookup's signature, the boxing and its collectives. One
word applies to every mesh axis; ``number,dim`` gives one per axis (number-wise across nodes,
dimension-wise inside a node on a 2-D mesh). TABLE is a glob over canonical parameter names
(``layers.1.pkm.values``, ``memory_tables.ring.*``, ``layers.*.moe.w_*``).
"""

from __future__ import annotations

import fnmatch

from torch import fx

from ..compiler.node_info import info
from .context import PlanContext, PlanError
from .sbp import Broadcast, NdSbp, Sbp, Split, chunk_share, fits

PLACEMENTS = ("number", "dim", "replicate")
# MoE expert weights and where their expert index / hidden width sit: (component, own name) -> (number, dim)
EXPERT_DIMS: dict[tuple[str, str], tuple[int, int | None]] = {
    ("moe", "w_up"): (0, 1), ("moe", "w_gate"): (0, 1), ("moe", "w_down"): (0, 2),
    ("moe", "b_up"): (0, 1), ("moe", "b_gate"): (0, 1),
}


def is_placement(text: str) -> bool:
    """Is ``text`` (the right side of a ``--force``/``--place``) placement words, not SBPs?"""
    return all(part.strip() in PLACEMENTS for part in text.split(","))


def _own(node: fx.Node) -> tuple[str, str]:
    return info(node).component, info(node).param.name.rsplit(".", 1)[-1]


def placed_dims(node: fx.Node) -> tuple[int, int | None] | None:
    """(number-wise dim, dimension-wise dim) of a table or expert parameter; None for any other."""
    rec = info(node)
    if rec.op != "param":
        return None
    if rec.param.group == "values":
        return 0, 1 if len(rec.param.shape) > 1 else None
    return EXPERT_DIMS.get(_own(node))


def uneven_dims(node: fx.Node) -> frozenset[int]:
    """The dims of this parameter that may split over devices that do not divide them (sbp.fits): a
    value table's rows and an expert weight's expert index (number-wise). Each device holds torch.chunk's
    share (DTensor's ``Shard``: ceil(R / n) rows, the last devices what is left), which the variants that
    take them split (the op table's ``uneven`` inputs: ``rows_owned``, ``rows_routed``,
    ``expert_parallel``) read wherever their block starts. Every other parameter dim must divide."""
    rec = info(node)
    if rec.op == "param" and rec.param.group == "values":
        return frozenset({0, 1}) if len(rec.param.shape) > 1 else frozenset({0})  # rows, value columns
    if rec.op == "param" and _own(node) in EXPERT_DIMS:
        return frozenset({EXPERT_DIMS[_own(node)][0]})  # the expert index: expert parallelism's owners
    return frozenset()


def table_params(gm: fx.GraphModule) -> list[fx.Node]:
    """The parameter nodes a placement applies to: value tables and expert weights."""
    return [n for n in gm.graph.nodes if placed_dims(n) is not None]


def _sbp(word: str, dims: tuple[int, int | None], name: str, text: str) -> Sbp:
    if word == "replicate":
        return Broadcast()
    dim = dims[0] if word == "number" else dims[1]
    if dim is None:
        raise PlanError(f"--place {name}={text}: {name} has no value dim to split; use number or replicate")
    return Split(dim)


def placement_pins(gm: fx.GraphModule, ctx: PlanContext, pattern: str, text: str) -> dict[str, NdSbp]:
    """Parameter node -> the nd-SBP it is stored and used in, for one ``--place PATTERN=TEXT``."""
    words = [w.strip() for w in text.split(",")]
    axes = len(ctx.mesh.shape)
    if len(words) == 1:
        words *= axes
    if len(words) != axes:
        raise PlanError(f"--place {pattern}={text}: {len(words)} placements for a mesh of {axes} axes ({ctx.mesh}); "
                        "give one, or one per axis separated by commas")
    tables = table_params(gm)
    matched = [n for n in tables if fnmatch.fnmatchcase(info(n).param.name, pattern)]
    if not matched:
        names = sorted({info(n).param.name for n in tables})
        listing = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "") if names else "none: the model has none"
        raise PlanError(f"--place {pattern}={text}: no value table or expert weight matches {pattern!r} (a glob over "
                        f"canonical parameter names; tables: {listing})")
    out: dict[str, NdSbp] = {}
    for node in matched:
        name, dims = info(node).param.name, placed_dims(node)
        nd = tuple(_sbp(w, dims, name, text) for w in words)
        shape = tuple(info(node).param.shape)
        if not fits(shape, nd, ctx.mesh.shape, uneven_dims(node)):
            entry = next(e for e in nd if isinstance(e, Split) and not fits(shape, _only(nd, e), ctx.mesh.shape,
                                                                           uneven_dims(node)))
            size, devices = shape[entry.dim], _split_over(nd, entry, ctx.mesh.shape)
            if entry.dim in uneven_dims(node):
                what = "rows" if entry.dim == dims[0] else "columns"
                raise PlanError(f"--place {pattern}={text}: {name}'s {size} {what} in torch.chunk's shares of "
                                f"{chunk_share(size, devices)} leave a device of the {devices} without {what}; use "
                                f"fewer devices on the axes placing it {words[nd.index(entry)]}, or replicate")
            raise PlanError(f"--place {pattern}={text}: {name} {info(node).param.shape} dim {entry.dim} of size "
                            f"{size} does not split over the mesh {ctx.mesh} axes placing it "
                            f"{words[nd.index(entry)]}; use a mesh whose axes divide it, or replicate")
        out[node.name] = nd
    return out


def _only(nd: NdSbp, entry: Sbp) -> NdSbp:
    """``nd`` with every split but ``entry`` made ``B`` (which of a placement's splits does not fit)."""
    return tuple(e if e == entry else Broadcast() for e in nd)


def _split_over(nd: NdSbp, entry: Sbp, mesh: tuple[int, ...]) -> int:
    devices = 1
    for axis, e in enumerate(nd):
        if e == entry:
            devices *= mesh[axis]
    return devices
