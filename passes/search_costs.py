"""The candidates of one node for the sharding search, each with its modelled time and memory.

The same numbers build_plan adds up, evaluated numerically once per candidate (the sympy
expressions of the cost model, collectives from ``sbp.boxings`` and their duals from
``build_plan.dual_of``, memory by ``memory.SAVES``), so that the search's objective is the plan's
``step_time`` (to the gradient buckets' count, docs/search.md) and its memory row the plan's
``memory_per_device``:

Collectives are timed as build_plan times them (messages * latency + wire bytes / bandwidth per
axis link), in plain numbers here (``box_time``). A calibrated spec's host terms
(passes/host_cost.py, evaluated once per unit by ``host_rates`` and, per collective kind,
``collective_rates``) join them where build_plan counts
them: each collective call (a boxing's, its dual's, a variant's inner one, a gradient bucket's, a
gather group's), each op's traffic, launches and loop passes, each parameter's AdamW share.

- an input: per axis ``B`` or ``S(0)`` (the batch), unless pinned;
- a parameter: per axis (stored, used) in ``(B, B)``, ``(S(d), S(d))`` (Megatron-like: its
  consumers take the shard) or ``(S(d), B)`` (ZeRO-3 / FSDP: gathered before use); time: the
  gather and its dual, the bandwidth of the gradient sync of axes where it is stored ``B`` (its
  latency is paid per gradient bucket: ``grad_sync`` says which bucket key, the integer program
  counts the buckets); memory: the stored
  shard times 4 (parameter, gradient, two AdamW moments) and the gathered copy the backward keeps;
- an op: the product over axes of its signatures (passes/signatures.py) whose dims and heads
  divide over the combined axes; time: its FLOPs over the devices splitting its work, the
  collectives inside a variant's call, the boxing to a pinned layout; memory: its own saved
  intermediates (what it saves of its inputs is the search's "save" demands on those values).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from torch import fx

from ..compiler.lower import tensor_args
from ..compiler.node_info import info
from ..compiler.op_table import OP_TABLE
from .build_plan import _needs_grad
from .context import PlanContext
from .gather_groups import LAYER
from .host_cost import WIRE_KIND, collective_rates, host_rates, loop_passes
from .memory import SAVES, rule_for
from .placement import uneven_dims
from .precision import MASTER
from .sbp import DUALS, Broadcast, NdSbp, PartialSum, Sbp, Split, chunk_share, fits, local_numel
from .signatures import axis_signatures, chunked_dims, covers_uneven
from .strategies import AxisPins
from .symbols import BYTES_PER_ELEMENT, PEAK, axis_bandwidth, axis_latency, evaluate

B_, P_ = Broadcast(), PartialSum()
COLLECTIVE_OF = {(Split, Broadcast): "all_gather", (PartialSum, Split): "reduce_scatter"}  # one step's kind


@dataclass(frozen=True)
class Cand:
    """One way to run a node: ``axes`` per mesh axis (an AxisSignature for an op, (stored, used)
    for a parameter, the SBP for an input), its input layouts, its own output and what consumers see."""

    axes: tuple
    ins: tuple[NdSbp, ...]
    raw: NdSbp
    out: NdSbp
    time: float
    memory: float
    peak: float = 0.0
    grad: tuple[tuple, float] | None = None  # a parameter's gradient sync: (bucket key, bytes it adds)
    gather: tuple[int, str, float] | None = None  # a layer's fsdp gather: (axis, dtype, latency paid per group)


class Costing:
    def __init__(self, gm: fx.GraphModule, ctx: PlanContext, named: dict[int, AxisPins],
                 forced: dict[str, NdSbp]) -> None:
        self.gm, self.ctx, self.named, self.forced = gm, ctx, named, forced
        self.mesh = ctx.mesh.shape
        self.values = ctx.values()
        self.train = ctx.mode == "train"
        self.host = host_rates(self.values, self.train)
        self.hosted = self.host.any  # a calibrated spec: the per-candidate host terms are worth computing
        self.call = collective_rates(self.values)  # seconds per call of each kind and group size, beyond its link
        # each kind's wire bytes weighed against the link's (host_cost.wire_factor; 1 where the spec lists none)
        self.wire = {kind: self.values.get(symbol, 1.0) for kind, symbol in WIRE_KIND.items()}
        self.needs_grad = _needs_grad(gm)
        self.box_memo: dict[tuple, tuple[float, float] | None] = {}
        self.pair_memo: dict[tuple, tuple[float, float] | None] = {}  # by layout ids (search._demands)
        self.memo: dict[fx.Node, list[Cand]] = {}
        sources = {info(b).buffer.source for b in gm.graph.nodes if info(b).op == "buffer" and info(b).buffer.source}
        self.sources = sources

    # -- numbers ---------------------------------------------------------------------------------
    def num(self, expr) -> float:
        return evaluate(expr, self.values) if hasattr(expr, "free_symbols") else float(expr)

    def box_time(self, have: NdSbp, want: NdSbp, node: fx.Node) -> tuple[float, float] | None:
        """(forward, backward dual) seconds of boxing ``node``'s value; None when not allowed.

        ``sbp.boxings`` step by step in plain numbers (its sympy is the slow part of a search):
        innermost axis first, each step sized by the layout the steps before it left; a dual moves
        the bytes of its forward step the other way (all_gather <-> reduce_scatter of the same
        tensor, all_reduce and all_to_all their own), so it takes the same link time, and each call
        its own kind's calibrated wait (``collective_rates``); local steps are free both ways.
        tests/unit/test_search.py checks the sum against the plan's step_time."""
        if have == want:
            return (0.0, 0.0)
        rec = info(node)
        key = (have, want, rec.concrete_shape, rec.dtype)
        if key not in self.box_memo:
            self.box_memo[key] = self._box_seconds(have, want, rec.concrete_shape, rec.dtype)
        return self.box_memo[key]

    def _box_seconds(self, have: NdSbp, want: NdSbp, shape: tuple, dtype: str) -> tuple[float, float] | None:
        layout, total, dual = list(have), 0.0, 0.0
        elements = float(math.prod(shape or ()))
        for axis in reversed(range(len(have))):
            src, dst = layout[axis], want[axis]
            if src == dst:
                continue
            for entry in (src, dst):  # a strided layout (sbp.boxings refuses it)
                if isinstance(entry, Split) and any(layout[a] == entry for a in range(axis + 1, len(have))):
                    return None
            n = self.mesh[axis]
            nbytes = elements * BYTES_PER_ELEMENT[dtype]
            for a, e in enumerate(layout):
                if a != axis and isinstance(e, Split):
                    nbytes /= self.mesh[a]
            pair = (type(src), type(dst))
            if pair == (Split, PartialSum):
                return None
            bw, lat = self._link(axis)
            if pair == (PartialSum, Broadcast):
                latency, wire, kind = 2 * (n - 1) * lat, 2 * (n - 1) / n * nbytes / bw, "all_reduce"
            elif pair == (Split, Split):
                latency, wire, kind = (n - 1) * lat, (n - 1) / n**2 * nbytes / bw, "all_to_all"
            elif pair in ((Split, Broadcast), (PartialSum, Split)):
                latency, wire, kind = (n - 1) * lat, (n - 1) / n * nbytes / bw, COLLECTIVE_OF[pair]
            else:
                latency, wire, kind = 0.0, 0.0, ""
            if kind:  # the backward runs the dual collective on the gradient, the same bytes (sbp.DUALS)
                total += latency + wire * self.wire[kind] + self.call[kind, n]
                dual += latency + wire * self.wire[DUALS[kind]] + self.call[DUALS[kind], n]
            layout[axis] = dst
        return total, dual

    def local_bytes(self, node: fx.Node, nd: NdSbp) -> float:
        """Bytes of the largest share one device holds (torch.chunk's, where a table splits unevenly)."""
        rec = info(node)
        return float(local_numel(rec.concrete_shape, nd, self.mesh)) * BYTES_PER_ELEMENT.get(rec.dtype, 4)

    def _divides(self, shape: tuple, nd: NdSbp, uneven: frozenset[int] = frozenset()) -> bool:
        """sbp.fits, the plan's own rule (``uneven``: dims that may split in torch.chunk's shares)."""
        return fits(tuple(shape or ()), nd, self.mesh, uneven)

    def _pin(self, node: fx.Node) -> tuple[Sbp | None, ...]:
        if node.name in self.forced:
            return self.forced[node.name]
        return tuple(self.named[a].outputs.get(node.name) if a in self.named else None for a in range(len(self.mesh)))

    # -- candidates ------------------------------------------------------------------------------
    def candidates(self, node: fx.Node) -> list[Cand]:
        if node not in self.memo:
            rec = info(node)
            if node.op == "placeholder":
                self.memo[node] = self._inputs(node)
            elif rec.op == "buffer":
                everywhere = (B_,) * len(self.mesh)
                self.memo[node] = [Cand(everywhere, (), everywhere, everywhere, 0.0, 0.0)]
            elif rec.op == "param":
                self.memo[node] = self._params(node)
            else:
                self.memo[node] = self._ops(node)
        return self.memo[node]

    def _inputs(self, node: fx.Node) -> list[Cand]:
        pin = self._pin(node)
        shape = info(node).concrete_shape
        options = [[p] if p is not None else [B_, Split(0)] for p in pin]
        return [Cand(nd, (), nd, nd, 0.0, 0.0) for nd in itertools.product(*options) if self._divides(shape, nd)]

    def _params(self, node: fx.Node) -> list[Cand]:
        rec = info(node)
        shape = rec.param.shape
        options, uneven = [], uneven_dims(node)
        for axis, n in enumerate(self.mesh):
            if node.name in self.forced:
                options.append([(self.forced[node.name][axis],) * 2])
            elif axis in self.named:
                used = self.named[axis].outputs.get(node.name, B_)
                options.append([(self.named[axis].at_rest.get(node.name, used), used)])
            else:
                dims = [Split(d) for d, size in enumerate(shape) if size % n == 0] if n > 1 else []
                gathered = [] if rec.param.name in self.sources else [(s, B_) for s in dims]
                chunked = [Split(d) for d in sorted(uneven) if shape[d] % n] if n > 1 else []  # used as stored
                options.append([(B_, B_), *[(s, s) for s in dims + chunked], *gathered])
        saved = self.train and any(self.saves(user, node) for user in node.users)
        out = []
        for axes in itertools.product(*options):
            rest, used = tuple(a[0] for a in axes), tuple(a[1] for a in axes)
            if any(isinstance(e, PartialSum) for e in used) or not self._divides(shape, rest,
                                                                                  uneven if rest == used else frozenset()):
                continue
            gather = self.box_time(rest, used, node)
            if gather is None:
                continue
            dual = self.train and self.needs_grad[node]
            time = gather[0] + (gather[1] if dual else 0.0)
            group = self._gather_group(node, rest, used, dual)
            if group is not None:
                time -= group[2]
            stored = self.local_bytes(node, rest)
            memory = stored * (4 if self.train else 1)
            sync = None
            if self.train:
                seconds, sync = self.grad_sync(rest, node)
                time += seconds
                if self.hosted:  # AdamW on the stored shard (host_cost.optimizer_time)
                    time += self.host.tensor + self.host.element * stored / BYTES_PER_ELEMENT.get(info(node).dtype, 4)
                if rest != used and saved:
                    memory += self.local_bytes(node, used)
            out.append(Cand(axes, (), used, used, time, memory, grad=sync, gather=group))
        return out

    def _gather_group(self, node: fx.Node, rest: NdSbp, used: NdSbp, dual: bool) -> tuple[int, str, float] | None:
        """A layer's parameter gathered by one all-gather (``S(d) -> B`` on one axis) joins the layer's
        gather group (passes/gather_groups.py: one all-gather, and in training one reduce-scatter, per
        layer, axis and dtype): its bandwidth stays its own, the latency is paid once per group, here
        (axis, dtype, the latency), which search.py prices per group as the buckets are priced."""
        axes = [a for a in range(len(rest)) if rest[a] != used[a]]
        if len(axes) != 1 or not isinstance(rest[axes[0]], Split) or not isinstance(used[axes[0]], Broadcast):
            return None
        if LAYER.match(info(node).param.name) is None:
            return None
        n = self.mesh[axes[0]]
        latency = (n - 1) * self._link(axes[0])[1]
        calls = self.call["all_gather", n] + (self.call["reduce_scatter", n] if dual else 0.0)
        return axes[0], info(node).dtype, latency * (2 if dual else 1) + calls

    def grad_sync(self, rest: NdSbp, node: fx.Node) -> tuple[float, tuple[tuple, float] | None]:
        """The gradient sync of a parameter stored ``rest``, as passes/buckets.py packs it: (the
        bandwidth seconds of its own bytes, (its bucket key, its bytes)); the latency is paid per
        bucket (``bucket_latency``, priced by the integer program per bucket key). The key is
        buckets.py's: the all-reduces (P -> B, innermost axis first) on the axes where it is stored
        ``B``, and the master dtype; the bytes are its stored shard in that dtype."""
        axes = tuple(a for a in reversed(range(len(rest))) if isinstance(rest[a], Broadcast))
        if not axes:
            return 0.0, None
        nbytes = float(local_numel(info(node).concrete_shape, rest, self.mesh)) * BYTES_PER_ELEMENT[MASTER]
        seconds = 0.0
        for a in axes:
            n = self.mesh[a]
            seconds += 2 * (n - 1) / n * nbytes / self._link(a)[0] * self.wire["all_reduce"]
        return seconds, ((axes, MASTER), nbytes)

    def bucket_latency(self, key: tuple) -> float:
        """Seconds of latency one gradient bucket of ``key`` pays (one all-reduce per axis, each a call)."""
        return sum(2 * (self.mesh[a] - 1) * self._link(a)[1] + self.call["all_reduce", self.mesh[a]] for a in key[0])

    def saves(self, user: fx.Node, value: fx.Node) -> bool:
        """Does ``user`` keep ``value`` for its backward (passes/memory.py's rule)?"""
        if user.op != "call_function" or info(user).op not in SAVES:
            return False
        args = tensor_args(user)
        if not any(info(a).differentiable for a in args):
            return False
        return any(args[i] is value for i in SAVES[info(user).op].inputs if i < len(args))

    def _ops(self, node: fx.Node) -> list[Cand]:
        rec = info(node)
        record = OP_TABLE[rec.op]
        args = tensor_args(node)
        shapes = [info(a).concrete_shape for a in args]
        states = [set(c.out for c in self.candidates(a)) if info(a).op in ("param", "buffer") else None for a in args]
        # parameters some candidate stores in torch.chunk's shares over the mesh: offer their column forms too
        stored_chunked = frozenset().union(*(chunked_dims(shapes, [o if j == i else None for j in range(len(args))],
                                                          self.mesh) for i, st in enumerate(states) if st for o in st))
        per_axis = []
        for axis, n in enumerate(self.mesh):
            sigs = axis_signatures(record, shapes, rec.concrete_shape, rec.attrs, n, stored_chunked)
            per_axis.append([s for s in sigs if all(st is None or any(o[axis] == w for o in st)
                                                    for st, w in zip(states, s.inputs))])
        pin = self._pin(node)
        flops = self.num(rec.cost.flops) + (self.num(rec.cost.backward_flops) if self.train else 0.0) if rec.cost else 0.0
        written = self.num(rec.cost.bytes_written) if rec.cost and not self.train else 0.0
        saving = self.train and any(info(a).differentiable for a in args)
        runs = 1 + (self.train and self.needs_grad[node])  # build_plan's launches: forward, and again backward
        traffic = self.num(rec.cost.bytes_read + rec.cost.bytes_written) if rec.cost and self.hosted else 0.0
        out = []
        for axes in itertools.product(*per_axis):
            ins = tuple(tuple(c.inputs[i] for c in axes) for i in range(len(args)))
            raw = tuple(c.output for c in axes)
            if not self._combined(node, record, axes, ins, raw, shapes):
                continue
            if (stored_chunked or any(c.variant is not None and c.variant.uneven for c in axes)) and not covers_uneven(
                    axes, chunked_dims(shapes, [nd if st is not None else None for st, nd in zip(states, ins)], self.mesh)):
                continue  # choose_sbp's rule: an uneven input's dim split by one variant on every axis
            seen = tuple(p or o for p, o in zip(pin, raw))
            extra = (0.0, 0.0) if seen == raw else self.box_time(raw, seen, node)
            if extra is None or any(st is not None and nd not in st for st, nd in zip(states, ins)):
                continue
            split = math.prod(n for n, c in zip(self.mesh, axes) if c.variant or c.split)
            time = flops / split / self.values[PEAK] + self._internal(node, axes, ins)
            time += extra[0] + (extra[1] if self.train and self.needs_grad[node] else 0.0)
            if self.hosted and rec.cost:  # host_cost.traffic_time and launch_time, as build_plan sums them
                passes = float(loop_passes(rec.op, shapes, ins, self.mesh)) if record.loop else 0.0
                time += traffic / split * self.host.byte + runs * (self.host.launch + passes * self.host.loop)
            memory = 0.0
            rule = rule_for(rec.op, [c.variant for c in axes]) if saving else None  # memory.py's, by the variant
            if rule is not None and rule.internal is not None:
                dims = tuple(self._local_dims(rec.concrete_shape, raw))
                ins_bytes = [self.local_bytes(a, nd) for a, nd in zip(args, ins)]
                memory = float(rule.internal(self.local_bytes(node, raw), ins_bytes, node, dims))
            out.append(Cand(axes, ins, raw, seen, time, memory, written / split))
        return out

    def _local_dims(self, shape: tuple, nd: NdSbp) -> list[float]:
        dims = [float(s) for s in shape or ()]
        for axis, entry in enumerate(nd):
            if isinstance(entry, Split):
                dims[entry.dim] = float(chunk_share(int(dims[entry.dim]), self.mesh[axis]))
        return dims

    def _combined(self, node, record, axes, ins, raw, shapes) -> bool:
        """choose_sbp's checks of a combined signature: dims and head counts divide, one variant."""
        if len({c.variant.name for c in axes if c.variant}) > 1:
            return False
        uneven = {i for c in axes if c.variant is not None for i in c.variant.uneven}
        pairs = [*zip(shapes, ins), (info(node).concrete_shape, raw)]
        chunked = [frozenset(range(len(s or ()))) if i in uneven else frozenset() for i, (s, _) in enumerate(pairs)]
        if not all(self._divides(s, nd, c) for (s, nd), c in zip(pairs, chunked)):
            return False
        for letter, counts in record.heads.items():
            factor = math.prod(n for n, c in zip(self.mesh, axes) if c.split == letter)
            if any(info(node).attrs[count] % factor for count in counts):
                return False
        return True

    def _internal(self, node: fx.Node, axes, ins) -> float:
        """Seconds of the collectives a variant runs inside its call (localize.internal_collectives): per
        axis, or once over the group spanning its axes (a ``spanning`` variant on several, on the
        slowest of their links)."""
        used = [axis for axis, c in enumerate(axes) if c.variant is not None and c.variant.comms is not None]
        if not used:
            return 0.0
        variant = axes[used[0]].variant
        local = [self._local_dims(info(a).concrete_shape, nd) for a, nd in zip(tensor_args(node), ins)]
        dtypes = [info(a).dtype for a in tensor_args(node)]
        total = 0.0
        for group in ([used] if variant.spanning and len(used) > 1 else [[a] for a in used]):
            n = math.prod(self.mesh[a] for a in group)
            links = [self._link(a) for a in group]
            bw, lat = min(b for b, _ in links), max(t for _, t in links)
            for comm in variant.comms(local, dtypes, info(node).attrs, n, self.train):
                reduce = comm.collective == "all_reduce"
                share, messages = (2 * (n - 1) / n, 2 * (n - 1)) if reduce else ((n - 1) / n, n - 1)
                total += (messages * lat + share * self.num(comm.payload) / bw * self.wire[comm.collective]
                          + self.call[comm.collective, n])
        return total

    def _link(self, axis: int) -> tuple[float, float]:
        return self.values[axis_bandwidth(axis)], self.values[axis_latency(axis)]
