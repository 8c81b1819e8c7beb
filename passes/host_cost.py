"""The step-time terms a calibrated hardware spec adds: memory traffic, per-op overhead, the optimizer.

FLOPs over peak and collectives over links (build_plan's ``compute_time`` and ``comm_time``) rank
plans on a datasheet machine, but on a CPU host (or for a small model anywhere) most of a measured
step is neither: each op pays the dispatcher, autograd and Python whatever its size, elementwise ops
are bound by memory bandwidth, and AdamW reads and writes every local parameter element several
times. ``ultraplan calibrate`` measures the coefficients (ultraplan/calibrate.py); a spec that has
them (``op_overhead`` > 0) gets three more terms in its plans' ``step_time``:

    memory_time    = (bytes read + written by every op, over the devices splitting it)
                     * (3 in train: the backward reads the output's gradient and the saved inputs
                     and writes the inputs' gradients, about twice the forward's traffic; 1 in infer)
                     * oversub / mem_bw
    overhead_time  = oversub * (launches * op_overhead + passes * loop_pass
                                + (train) local parameter tensors * opt_tensor + local parameter elements * opt_element)
                     + sum over the step's collectives of coll_<kind> (coll_overhead where the kind is not given)
    launches       = op nodes in the forward + those the backward reaches (each runs again there),
                     + the step's collectives (each a call through the runtime: an autograd
                     function, a buffer to pack or unpack; beside the link's latency)
    passes         = for an op that loops in Python (the op table's ``loop``: the dropless MoE runs
                     each local expert in turn, a dozen torch ops each), the local size of its loop
                     dim, forward and again backward
    coll_<kind>    = what a collective of that kind (all_reduce, all_gather, reduce_scatter,
                     all_to_all) costs a program beyond the link's formula: the runtime's call and
                     the wait for its peers, which on a host with more ranks than cores is the wait
                     for them to be scheduled; timed in place by calibrate, per kind, with as many
                     ranks as the programs run (so it is not scaled by ``oversub``)
    oversub        = max(1, ranks on the host / the host's cores): a rank's share of a core. A CPU
                     rank's FLOP/s, copy bandwidth and per-op overhead are one core's; where more
                     ranks than cores share a host each runs ``oversub`` times slower (the
                     scheduler time-slices them). Context.values divides ``peak`` by it too, so
                     compute_time = FLOPs / (peak / oversub). 1 for a spec without ``host_cores``.

build_plan hands ``host_times`` the step's collectives by kind and the search prices each call at its
kind's rate (``collective_rates``), so each kind is priced apart; ``coll_overhead`` (calibrate writes
the median of the kinds' figures there) prices a call whose kind is not given.

``op_overhead`` is per plan op (a plan op is a few torch ops: a fitted figure, calibrate.py says
how); ``loop_pass``, ``coll_overhead``, ``opt_tensor`` and ``opt_element`` (AdamW's cost per
parameter tensor and per element) are timed directly. Specs without these fields (the bundled
datasheet specs) keep the two-term model.

The search (passes/search_costs.py) weighs the same terms, split by what decides them: an op
candidate its traffic over the devices splitting it, its launches and loop passes; a boxing, a
variant's inner collective, a gradient bucket and a gather group their collectives; a parameter
candidate AdamW's share of it (its stored elements). ``host_rates`` evaluates this module's
formulas once at unit arguments (every term is linear in its count), so that the search's
objective is the plan's ``step_time`` with them too: tests/unit/test_search_host.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import sympy

from ..compiler.op_table import OP_TABLE
from ..compiler.schema import HardwareSpec
from ..compiler.validate import COLLECTIVE_KINDS  # the kinds a hardware spec may price

MEM_BW = sympy.Symbol("mem_bw", positive=True)
OP_OVERHEAD = sympy.Symbol("op_overhead", nonnegative=True)
OPT_TENSOR = sympy.Symbol("opt_tensor", nonnegative=True)
OPT_ELEMENT = sympy.Symbol("opt_element", nonnegative=True)
LOOP_PASS = sympy.Symbol("loop_pass", nonnegative=True)
COLL_OVERHEAD = sympy.Symbol("coll_overhead", nonnegative=True)
OVERSUB = sympy.Symbol("oversub", positive=True)
COLL_KIND = {kind: sympy.Symbol(f"coll_{kind}", nonnegative=True) for kind in COLLECTIVE_KINDS}
WIRE_KIND = {kind: sympy.Symbol(f"wire_{kind}", positive=True) for kind in COLLECTIVE_KINDS}


def coll_symbol(kind: str, group: int | None = None) -> sympy.Symbol:
    """The wait of one ``kind`` call beyond its link: on groups of ``group`` ranks (``coll_all_gather_4``),
    or whatever the group (``coll_all_gather``, for a caller that does not say)."""
    if group is None:
        return COLL_KIND[kind]
    symbol = sympy.Symbol(f"coll_{kind}_{group}", nonnegative=True)
    GROUP_SYMBOLS[symbol] = (kind, group)
    return symbol


GROUP_SYMBOLS: dict[sympy.Symbol, tuple[str, int]] = {}  # coll_symbol's (kind, group size) of each it made
BACKWARD_TRAFFIC = 2  # the backward's bytes per forward byte (module docstring)


def loop_passes(op: str, input_shapes: list, input_sbps: list, sizes: list) -> sympy.Expr:
    """How many times the op's code runs its loop's body on a device: 0 (no loop), or the local size
    of the op table's ``loop`` dim (the first input holding it, as this device holds that input)."""
    record = OP_TABLE[op]
    if not record.loop:
        return sympy.Integer(0)
    from .sbp import local_dims  # sbp -> context -> this module: imported when first needed
    for letters, shape, sbp in zip(record.dims.split("->")[0].split(","), input_shapes, input_sbps):
        if record.loop in letters:
            return local_dims(shape, sbp, sizes)[letters.index(record.loop)]
    raise AssertionError(f"{op}: loop dim {record.loop!r} is in none of its inputs ({record.dims})")


def calibrated(hardware: HardwareSpec) -> bool:
    """Does this spec carry the host terms' coefficients (written by ``ultraplan calibrate``)?"""
    return hardware.op_overhead > 0


def oversubscription(hardware: HardwareSpec, ranks: int) -> float:
    """``oversub``: how many ranks share each core of a host when ``ranks`` ranks run on this
    hardware (as many on a node as it has devices), at least 1; 1 where the spec does not say how
    many cores a host has (a GPU machine: a rank's device is its own)."""
    if hardware.host_cores <= 0:
        return 1.0
    return max(1.0, min(ranks, hardware.devices_per_node) / hardware.host_cores)


def collective_figure(hardware: HardwareSpec, kind: str, group: int | None = None) -> float:
    """Seconds a call of ``kind`` on ``group`` ranks costs beyond its link: calibrate's figure for that
    kind on groups of that size (``collective_by_group``; the nearest size timed where this one was
    not: the wait grows with the peers to wait for), else the kind's over every size
    (``collective_by_kind``), else the spec's one ``collective_overhead`` (a spec calibrated before the
    kinds were timed apart). A group of one waits for no peer: 0 (its call's launch is priced apart)."""
    if group == 1:
        return 0.0
    sizes = hardware.collective_by_group.get(kind, {})
    if group is not None and sizes:
        return nearest_group(sizes, group)
    return hardware.collective_by_kind.get(kind, hardware.collective_overhead)


def nearest_group(by_size: Mapping[int, float], group: int) -> float:
    """A per-group-size figure for a group of ``group`` ranks: its size's, else the nearest size's by
    ratio, the larger of two as near (a wait grows with the peers to wait for)."""
    return by_size[min(by_size, key=lambda n: (abs(math.log(n / group)), -n))]


def host_values(hardware: HardwareSpec, ranks: int | None = None,
                groups: Iterable[int] = ()) -> dict[sympy.Symbol, float]:
    """The numbers of this module's symbols for a plan of ``ranks`` ranks (None: as many as the spec
    has devices) whose collectives run on groups of the sizes ``groups``; for an uncalibrated spec
    only its wire factors, if it lists any (its plans use no other)."""
    wire = {WIRE_KIND[kind]: hardware.collective_wire_factor.get(kind, 1.0) for kind in WIRE_KIND
            if hardware.collective_wire_factor}  # priced wherever a spec lists them (wire_factor)
    if not calibrated(hardware):
        return wire
    ranks = hardware.num_devices if ranks is None else ranks
    return wire | {MEM_BW: hardware.memory_bandwidth, OP_OVERHEAD: hardware.op_overhead,
            OPT_TENSOR: hardware.optimizer_tensor, OPT_ELEMENT: hardware.optimizer_element,
            LOOP_PASS: hardware.loop_pass, COLL_OVERHEAD: hardware.collective_overhead,
            OVERSUB: oversubscription(hardware, ranks)} | {
            symbol: collective_figure(hardware, kind) for kind, symbol in COLL_KIND.items()} | {
            coll_symbol(kind, n): collective_figure(hardware, kind, n) for kind in COLL_KIND for n in groups}


def wire_factor(hardware: HardwareSpec, kind: str) -> sympy.Expr:
    """What a ``kind`` collective's wire bytes over the link's bandwidth are multiplied by: the symbol
    ``wire_<kind>`` for a spec that lists wire factors (calibrate writes them: on gloo an all_gather
    moves a byte about 3 times slower than an all_reduce), else 1 (the link's fit holds for every kind)."""
    return WIRE_KIND[kind] if hardware.collective_wire_factor and kind in WIRE_KIND else sympy.Integer(1)


def traffic_time(traffic: sympy.Expr, train: bool) -> sympy.Expr:
    """Seconds of ``traffic`` forward bytes on a device, with the backward's share in training."""
    return traffic * (1 + BACKWARD_TRAFFIC if train else 1) * OVERSUB / MEM_BW


def launch_time(launches: sympy.Expr, passes: sympy.Expr) -> sympy.Expr:
    """Seconds of op launches (each forward or backward run of a plan op) and loop passes."""
    return (launches * OP_OVERHEAD + passes * LOOP_PASS) * OVERSUB


def collectives_time(collectives: sympy.Expr | Mapping[str | tuple[str, int], sympy.Expr]) -> sympy.Expr:
    """What collective calls cost beyond their links: a launch each (a rank's share of a core) and the
    wait for the peers, per kind and group size. ``collectives``: the calls by ``(kind, group size)``
    (or by kind alone), or their number where the caller does not give kinds (each then priced at
    ``coll_overhead``)."""
    if not isinstance(collectives, Mapping):
        return collectives * (OP_OVERHEAD * OVERSUB + COLL_OVERHEAD)
    return sympy.Add(*(count * (OP_OVERHEAD * OVERSUB + coll_symbol(*(key if isinstance(key, tuple) else (key,))))
                       for key, count in collectives.items()))


def optimizer_time(tensors: sympy.Expr, elements: sympy.Expr) -> sympy.Expr:
    """AdamW's seconds for ``tensors`` local parameter tensors of ``elements`` elements in all."""
    return (tensors * OPT_TENSOR + elements * OPT_ELEMENT) * OVERSUB


def host_times(hardware: HardwareSpec, traffic: sympy.Expr, launches: sympy.Expr, passes: sympy.Expr,
               collectives: int | Mapping[str, int], param_elements: sympy.Expr, param_tensors: int,
               train: bool) -> dict[str, sympy.Expr]:
    """``memory_time`` and ``overhead_time`` (module docstring); empty for an uncalibrated spec.
    ``traffic``: the forward's bytes per device; ``launches`` the op launches (collectives not
    included); ``collectives``: the step's calls by (kind, group size) (or their number: see collectives_time);
    ``param_elements``: the local (stored) elements."""
    if not calibrated(hardware):
        return {}
    overhead = launch_time(launches, passes) + collectives_time(collectives)
    if train:
        overhead += optimizer_time(param_tensors, param_elements)
    return {"memory_time": traffic_time(traffic, train), "overhead_time": overhead}


@dataclass(frozen=True)
class HostRates:
    """The host terms per unit, in seconds, for the search: per forward byte of an op's traffic (the
    backward's included in training), per op launch, per loop pass, per parameter tensor and per
    parameter element in AdamW. All 0 for an uncalibrated spec. A collective call's is its kind's
    and group size's (``collective_rates``)."""

    byte: float = 0.0
    launch: float = 0.0
    loop: float = 0.0
    tensor: float = 0.0
    element: float = 0.0

    @property
    def any(self) -> bool:
        return self != HostRates()


def host_rates(values: dict, train: bool) -> HostRates:
    """This module's formulas at unit counts, evaluated at ``values`` (a context's: the host symbols
    are there only for a calibrated spec; without them every rate is 0)."""
    if MEM_BW not in values:
        return HostRates()
    one = {s: values[s] for s in (MEM_BW, OP_OVERHEAD, OPT_TENSOR, OPT_ELEMENT, LOOP_PASS, COLL_OVERHEAD, OVERSUB,
                                  *COLL_KIND.values())}

    def at(expr: sympy.Expr) -> float:
        return float(sympy.sympify(expr).xreplace(one))

    return HostRates(at(traffic_time(1, train)), at(launch_time(1, 0)), at(launch_time(0, 1)),
                     at(optimizer_time(1, 0)) if train else 0.0,
                     at(optimizer_time(0, 1)) if train else 0.0)


class CollectiveRates(dict):
    """Seconds per collective call beyond its link (``collectives_time`` of one call), by kind and by
    ``(kind, group size)``: ``rates["all_gather"]``, ``rates["all_gather", 4]``. A group size the
    context gave no figure for is priced at the kind's."""

    def __missing__(self, key):
        if isinstance(key, tuple):
            return self[key[0]]
        raise KeyError(f"no collective kind {key!r}: one of {', '.join(COLLECTIVE_KINDS)}")


def collective_rates(values: dict) -> CollectiveRates:
    """``CollectiveRates`` at ``values`` (a context's: its group sizes' figures are there); all 0 for
    an uncalibrated spec. For a search that counts its calls by kind and group."""
    if MEM_BW not in values:
        return CollectiveRates(dict.fromkeys(COLLECTIVE_KINDS, 0.0))
    keys = [*COLLECTIVE_KINDS, *(GROUP_SYMBOLS[s] for s in values if s in GROUP_SYMBOLS)]
    return CollectiveRates({key: float(collectives_time({key: 1}).xreplace(values)) for key in keys})
