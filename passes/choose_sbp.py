"""choose_sbp: give every node an SBP signature, and make every boxing an explicit graph node.

Each mesh axis has a named strategy (``passes/strategies.py``) that pins a few nodes: the inputs,
the parameters (how each is stored, and how its consumers see it), and for tensor and sequence
parallelism the residual stream. ``--force NODE=SBP`` pins more by hand. Everything else follows
from one generic propagation over the op table, node by node in graph order:

    for each op and each mesh axis a, among the op's signatures on a (passes/signatures.py) whose
    parameter and state inputs are exactly as stored (a parameter is never re-laid out by its
    consumer; fsdp's gather is the parameter's own boxing), choose the cheapest

        sum over inputs of  boxing cost (producer's SBP on a -> the signature's)
      + boxing cost (the signature's output -> the node's pin on a), if pinned
      + the all-reduce a P output will need, if not every consumer takes P,

    costs in bytes per device on that axis (then the number of collectives, then of local steps:
    OneFlow's tie-breaking constant, so that doing nothing beats slicing), ties by signature order.

The per-axis choices form the nd-signature. Wherever an input's SBP differs from what the
signature wants, one ``boxing`` node is inserted (shared by every consumer wanting the same
layout of the same value) holding the per-axis collective steps; a pinned node whose op makes
another layout gets one boxing node after it. Parameters stored other than used (fsdp) get their
gather as a boxing node too. Training: the loss is made ``P`` on every axis (a ``B -> P`` boxing
where needed) so each device's backward starts from its share, and its logging all-reduce is
recorded on the output. Gradients of parameters stored ``B`` on an axis arrive ``P`` there and
are all-reduced after backward (``grad_boxing``); on axes where they are stored split, autograd's
duals have already made them whole for the shard.

Requires shapes (and ``concrete_shape`` from shape_prop). Promises an ``sbp`` on every node,
``boxing`` steps on every boxing node, ``at_rest`` and ``grad_boxing`` on every parameter.
"""

from __future__ import annotations

import math
import time

import sympy
from torch import fx

from ..compiler.lower import tensor_args
from ..compiler.node_info import NodeInfo, info
from ..compiler.op_table import OP_TABLE
from .context import PassReport, PlanContext, PlanError
from .placement import uneven_dims
from .sbp import Broadcast, NdSbp, PartialSum, Sbp, Signature, Split, box_cost, boxings, chunk_share, fits, nd_str
from .signatures import AxisSignature, axis_signatures, chunked_dims, covers_uneven
from .strategies import STRATEGIES, AxisPins, check_batch, forced_pins, pin_axes
from .symbols import BYTES_PER_ELEMENT, axis_size, readable

__all__ = ["PlanError", "boxing", "boxings", "choose_sbp"]  # boxings: passes.sbp's, re-exported

B_, P_ = Broadcast(), PartialSum()


def boxing(x):
    """The target of a boxing node: the plan's collectives on a value, which the emitter spells."""
    return x


def _add(a: tuple, b: tuple | None) -> tuple | None:
    return None if b is None else tuple(x + y for x, y in zip(a, b))


def _nbytes(node: fx.Node, nd: NdSbp, axis: int, mesh: tuple[int, ...]) -> float:
    """Bytes of the value a collective on ``axis`` sees (its other axes' splits divided out)."""
    shape = info(node).concrete_shape or ()
    total = float(math.prod(int(s) for s in shape)) * BYTES_PER_ELEMENT[info(node).dtype]  # plain ints: hot
    for a, entry in enumerate(nd):
        if a != axis and isinstance(entry, Split):
            total /= mesh[a]
    return total


def _state(node: fx.Node) -> bool:
    """Parameters, buffers and their own boxings: consumers take them as they are."""
    rec = info(node)
    return rec.op in ("param", "buffer") or (rec.op == "boxing" and _state(node.args[0]))


def _takes_partial(user: fx.Node, node: fx.Node) -> bool:
    if user.op == "output":
        return True
    record = OP_TABLE.get(info(user).op)
    return record is not None and record.linear in ("each", "all")


def _internal_cost(node: fx.Node, args: list[fx.Node], cand: AxisSignature, n: int, train: bool) -> tuple:
    """(bytes per device, collectives, 0) a variant's call sends inside it on one axis (its inputs
    split as the signature wants on that axis), so that a routed lookup is priced beside the boxing
    of the all-gathered one."""
    local = [tuple(chunk_share(s, n if isinstance(sbp, Split) and d == sbp.dim else 1)
                   for d, s in enumerate(info(a).concrete_shape or ())) for a, sbp in zip(args, cand.inputs)]
    comms = cand.variant.comms(local, [info(a).dtype for a in args], info(node).attrs, sympy.Integer(n), train)
    wire = sum(float(c.payload) * (2 * (n - 1) / n if c.collective == "all_reduce" else (n - 1) / n) for c in comms)
    return (wire, len(comms), 0)


class _Planner:
    def __init__(self, gm: fx.GraphModule, ctx: PlanContext, pins: list[AxisPins]) -> None:
        self.gm, self.ctx, self.pins = gm, ctx, pins
        self.mesh = ctx.mesh.shape
        self.boxes: dict[tuple[str, NdSbp], fx.Node] = {}
        self.forced: dict[str, NdSbp] = {}
        self.num_boxings = 0

    def pin(self, node: fx.Node) -> tuple[Sbp | None, ...] | None:
        """What the node's consumers must see, per axis (None: whatever its op makes there)."""
        if node.name in self.forced:
            return self.forced[node.name]
        entries = tuple(p.outputs.get(node.name) for p in self.pins)
        return None if all(e is None for e in entries) else entries

    def box_node(self, value: fx.Node, want: NdSbp, before: fx.Node, reason: str, layer: str) -> fx.Node:
        """The boxing node turning ``value`` into ``want`` (made once per value and layout)."""
        key = (value.name, want)
        if key in self.boxes:
            return self.boxes[key]
        rec = info(value)
        have = rec.sbp.output
        try:
            steps = boxings(have, want, rec.shape, rec.dtype)
        except PlanError as exc:
            raise PlanError(f"{value.name}: {exc}") from None
        suffix = "_".join(str(e).replace("(", "").replace(")", "") for e in want)
        with self.gm.graph.inserting_before(before):
            node = self.gm.graph.create_node("call_function", boxing, (value,), {}, name=f"{value.name}_{suffix}")
        node.meta["ultraplan"] = NodeInfo(
            "boxing", {"src": nd_str(have), "dst": nd_str(want)}, rec.shape, rec.dtype, layer=layer,
            component=rec.component, differentiable=rec.differentiable, concrete_shape=rec.concrete_shape,
            sbp=Signature((have,), want), boxing=steps, reason=reason)
        self.boxes[key] = node
        self.num_boxings += bool(steps)
        return node

    def place_input(self, node: fx.Node) -> None:
        pinned = self.pin(node) or (None,) * len(self.mesh)
        info(node).sbp = Signature((), tuple(e or B_ for e in pinned))

    def place_state(self, node: fx.Node) -> None:
        rec = info(node)
        axes = len(self.mesh)
        if rec.op == "buffer":
            rec.sbp = Signature((), (B_,) * axes)
            return
        used = tuple(e or B_ for e in (self.pin(node) or (None,) * axes))
        if any(isinstance(e, PartialSum) for e in used):
            raise PlanError(f"{node.name}: a parameter cannot be P (a partial sum); pin S(d) or B")
        forced = node.name in self.forced
        rest = used if forced else tuple(p.at_rest.get(node.name, used[a]) for a, p in enumerate(self.pins))
        uneven = uneven_dims(node) if rest == used else frozenset()  # a gathered split must divide
        if not fits(tuple(rec.param.shape), rest, self.mesh, uneven):
            raise PlanError(f"{node.name}: {rec.param.name} {rec.param.shape} cannot be {nd_str(rest)} over the "
                            f"mesh {self.ctx.mesh} (a dim does not exist or does not divide, or torch.chunk's shares "
                            "leave a device without rows)")
        rec.at_rest = rest
        rec.sbp = Signature((), rest)
        train = self.ctx.mode == "train"
        grad = tuple(P_ if isinstance(e, Broadcast) else e for e in rest)
        rec.grad_boxing = boxings(grad, rest, rec.shape, "float32") if train else []
        rec.reason = "; ".join(f"axis {a} {p.strategy}" for a, p in enumerate(self.pins))
        if rest != used:
            gathered = self.box_node(node, used, next(iter(node.users)), "stored sharded (fsdp), all-gathered "
                                     "before use; the backward reduce-scatters its gradient", rec.layer)
            node.replace_all_uses_with(gathered, delete_user_cb=lambda user: user is not gathered)

    def place_op(self, node: fx.Node) -> None:
        rec = info(node)
        record = OP_TABLE[rec.op]
        args = tensor_args(node)
        have = [info(a).sbp.output for a in args]
        shapes = [info(a).concrete_shape for a in args]
        pinned = self.pin(node)
        chosen: list[AxisSignature] = []
        # parameters stored in torch.chunk's shares over the mesh (a placed table's columns, 34 on 2x2)
        chunked = chunked_dims(shapes, [h if _state(a) else None for a, h in zip(args, have)], self.mesh)
        for axis, n in enumerate(self.mesh):
            best, best_cost = None, None
            want = self.pins[axis].signatures.get(node.name)  # chosen by the search (--strategy auto)
            taken = {c.variant.name for c in chosen if c.variant}  # one variant per node (localize)
            for cand in axis_signatures(record, shapes, rec.concrete_shape, rec.attrs, n, chunked):
                if want is not None and cand != want:
                    continue
                if cand.variant is not None and taken and cand.variant.name not in taken:
                    continue
                if not covers_uneven([*chosen, cand], chunked):
                    continue  # an uneven input's dim split by its variant on one axis and an einsum on another
                cost = self._cost(node, args, have, cand, axis, n, pinned)
                if cost is not None and (best_cost is None or cost < best_cost):
                    best, best_cost = cand, cost
            if best is None:
                stored = ", ".join(f"{a.name} [{nd_str(h)}]" for a, h in zip(args, have) if _state(a))
                raise PlanError(f"{node.name} ({rec.op}): no signature on mesh axis {axis} takes its parameters as "
                                f"stored ({stored}); pin them differently")
            chosen.append(best)
        ins = tuple(tuple(c.inputs[i] for c in chosen) for i in range(len(args)))
        out = tuple(c.output for c in chosen)
        self._check_combined(node, record, ins, out, chosen, shapes)
        scale = sympy.Integer(1)
        for axis, c in enumerate(chosen):
            if c.mean:
                scale /= axis_size(axis)
        rec.sbp = Signature(ins, out, scale)
        rec.variant = tuple(c.variant for c in chosen) if any(c.variant for c in chosen) else None
        rec.splits = tuple(c.variant.name if c.variant else c.split for c in chosen)
        rec.attrs = dict(rec.attrs)
        new_args = list(node.args)
        for position, (arg, want) in enumerate(zip(args, ins)):
            if info(arg).sbp.output != want:
                boxed = self.box_node(arg, want, node, f"{node.name} ({rec.op}) takes {arg.name} as [{nd_str(want)}]",
                                      rec.layer)
                new_args[[i for i, a in enumerate(node.args) if isinstance(a, fx.Node)][position]] = boxed
        node.args = tuple(new_args)
        target = tuple(p or o for p, o in zip(pinned, out)) if pinned is not None else out
        if target != out:
            users = list(node.users)
            boxed = self.box_node(node, target, users[0] if users else node.next, f"{node.name} is pinned "
                                  f"[{nd_str(target)}] ({self._why_pinned(node)})", rec.layer)
            node.replace_all_uses_with(boxed, delete_user_cb=lambda user: user is not boxed)

    def _why_pinned(self, node: fx.Node) -> str:
        if node.name in self.forced:
            return "--force"
        return ", ".join(f"{p.strategy} on axis {p.axis}" for p in self.pins if node.name in p.outputs)

    def _cost(self, node, args, have, cand: AxisSignature, axis: int, n: int, pinned) -> tuple | None:
        total: tuple | None = (0.0, 0, 0)
        for arg, h, want in zip(args, have, cand.inputs):
            if _state(arg) and h[axis] != want:
                return None
            total = _add(total, box_cost(h[axis], want, _nbytes(arg, h, axis, self.mesh), n))
            if total is None:
                return None
        if cand.variant is not None and cand.variant.comms is not None:
            total = _add(total, _internal_cost(node, args, cand, n, self.ctx.mode == "train"))
        out_bytes = _nbytes(node, (), axis, self.mesh)
        if pinned is not None and pinned[axis] is not None:
            total = _add(total, box_cost(cand.output, pinned[axis], out_bytes, n))
        elif isinstance(cand.output, PartialSum) and not all(_takes_partial(u, node) for u in node.users):
            later = box_cost(P_, B_, out_bytes, n)  # the all-reduce a consumer will ask for: its bytes only,
            total = _add(total, (later[0], 0, 0))  # as it is not decided here (and free on one device)
        return total

    def _check_combined(self, node, record, ins, out, chosen, shapes) -> None:
        """Per-axis choices combine: a dim split on several axes, and head counts, must divide by the product."""
        uneven = {i for c in chosen if c.variant is not None for i in c.variant.uneven}
        for i, (nd, shape) in enumerate([*zip(ins, shapes), (out, info(node).concrete_shape)]):
            chunked = frozenset(range(len(shape or ()))) if i in uneven else frozenset()  # a variant's table
            if not fits(tuple(shape or ()), nd, self.mesh, chunked):
                raise PlanError(f"{node.name} ({info(node).op}): a split of {tuple(shape or ())} as [{nd_str(nd)}] "
                                f"does not divide over mesh {self.ctx.mesh} (sbp.fits)")
        for letter, counts in record.heads.items():
            factor = 1
            for axis, c in enumerate(chosen):
                if c.split == letter:
                    factor *= self.mesh[axis]
            for count in counts:
                if info(node).attrs[count] % factor:
                    raise PlanError(f"{node.name}: {count} = {info(node).attrs[count]} does not split over {factor} "
                                    f"devices on mesh {self.ctx.mesh}")

    def place_output(self, node: fx.Node) -> None:
        value = node.args[0]
        rec = info(node)
        have = info(value).sbp.output
        axes = len(self.mesh)
        if self.ctx.mode != "train":
            rec.sbp = Signature((have,), have)
            return
        partial = (P_,) * axes
        if have != partial:  # each device's backward starts from its share of the loss
            boxed = self.box_node(value, partial, node, "the loss is a partial sum on every axis, so each "
                                  "device's backward starts from its share", info(value).layer)
            node.args = (boxed,)
        rec.sbp = Signature((partial,), (B_,) * axes)
        rec.boxing = boxings(partial, (B_,) * axes, info(value).shape, info(value).dtype)  # logging, detached


def choose_sbp(gm: fx.GraphModule, ctx: PlanContext) -> PassReport:
    start = time.perf_counter()
    names = ctx.strategies or ("dp",) * len(ctx.mesh.shape)
    if len(names) != len(ctx.mesh.shape):
        raise PlanError(f"--strategy names {len(names)} strategies ({','.join(names)}) for a mesh of "
                        f"{len(ctx.mesh.shape)} axes ({ctx.mesh}); give one per axis, e.g. dp,tp")
    unknown = [s for s in names if s not in STRATEGIES and s != "auto"]
    if unknown:
        raise PlanError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}, auto")
    ctx.strategies = tuple(names)
    pins = pin_axes(gm, ctx)
    forced = forced_pins(gm, ctx)
    found = None
    if "auto" in names:  # the search chooses every signature, around the named axes' pins and --force
        from .search import KEY, pins_from, search

        named = {p.axis: p for p in pins}
        check_batch(ctx, pins)
        found = search(gm, ctx, named, forced)
        pins = pins_from(found, gm, ctx, named)
        gm.meta[KEY] = found
    check_batch(ctx, pins)
    planner = _Planner(gm, ctx, pins)
    planner.forced = forced
    for node in list(gm.graph.nodes):
        rec = info(node)
        if rec.op == "boxing":
            continue
        if node.op == "placeholder":
            planner.place_input(node)
        elif node.op == "get_attr":
            planner.place_state(node)
        elif node.op == "call_function":
            planner.place_op(node)
        elif node.op == "output":
            planner.place_output(node)
    gm.recompile()
    assert all(info(n).sbp is not None for n in gm.graph.nodes), "choose_sbp left a node without SBP"
    decisions = [d for p in pins for d in p.decisions]
    if found is not None:
        from .search_explain import annotate

        decisions += annotate(found, gm, ctx)
    decisions += [f"--force {name}=[{nd_str(nd)}]" for name, nd in planner.forced.items()]
    decisions.append(f"{planner.num_boxings} boxing nodes with collectives or local steps")
    params = [n for n in gm.graph.nodes if info(n).op == "param"]
    grad_bytes = sympy.Add(*(b.wire for n in params for b in info(n).grad_boxing))
    return PassReport("choose_sbp", time.perf_counter() - start, decisions,
                      {"gradient_wire_bytes_per_device": readable(grad_bytes)})
