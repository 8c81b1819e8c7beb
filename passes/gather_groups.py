"""Gather groups: which fsdp parameter gathers of one layer travel as one flat all-gather.

A parameter stored split on a mesh axis (fsdp) is all-gathered before its layer uses it, and the
backward reduce-scatters its gradient. One collective per parameter pays one latency per
parameter, forward and backward. FSDP2 instead gathers a whole module's parameters at once: each
rank copies its shards into one flat buffer, a single all-gather fills every rank's copy, and the
full parameters are views split out of it; the backward concatenates their gradients and runs one
reduce-scatter (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py, ``foreach_all_gather``
and ``foreach_reduce``; the unit is the ``FSDPParamGroup`` of _fsdp_param_group.py). This pass
makes the same decision, for the plan to state and the program to spell:

- The unit is one layer (``layers.i``, a call of its block, passes/blocks.py): the gathers of
  its parameters whose boxing is one ``S(d) -> B`` all-gather on the same mesh axis, in the same
  dtype, form one group, whatever dimension each is split on (each rank's flat buffer holds each
  shard with its split dimension moved first). A group of one parameter is no group.
- The model's own parameters (embedding, final norm, head, a table shared by several layers) each
  gather as a group of its own (``layer`` -1): their all-gather runs where the parameter is first
  used, its reduce-scatter starts asynchronously in the backward as a layer group's does, and those
  used only after the last layer are prefetched by that layer (``prefetch_after``), as the layers
  prefetch each other. One group each, not one per part of the model as FSDP2's root group: the
  search (passes/search_costs.py) prices a gather's latency per parameter outside the layers, and
  the plan it makes must cost what it sends.
- The group's collectives are one all-gather of the summed shard bytes and, in training, one
  reduce-scatter of the summed gradient bytes: the latency term counts groups, not parameters.
- Splits are even (plans only split a dimension its axis divides, passes/sbp.py), so each rank's
  flat buffer holds the same number of elements and rank r's block of the gathered buffer is
  rank r's shard of each parameter, in the group's order.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import sympy
from torch import fx

from ..compiler.node_info import info
from .plan import CollectivePlan, GatherGroupPlan
from .sbp import Boxing, parse_sbp
from .symbols import axis_size

LAYER = re.compile(r"^layers\.(\d+)\.")


@dataclass(frozen=True)
class GatherGroup:
    """Boxing nodes (one per parameter) whose all-gathers run as one, in forward order."""

    layer: int  # its layer, or -1 for one of the model's own parameters
    axis: int
    src: str  # the members' SBPs on the axis before the gather ("S(0)", or "S(0)/S(1)" when they differ)
    dtype: str
    nodes: tuple[str, ...]  # the boxing nodes
    params: tuple[str, ...]  # their parameters (canonical names)
    steps: tuple[Boxing, ...]  # each member's all-gather
    prefetch_after: int = -1  # the layer whose forward starts it (a model group used after the layers), or -1

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(parse_sbp(b.src).dim for b in self.steps)

    def merged(self) -> Boxing:
        """The group's one all-gather: the members' bytes summed, one latency."""
        first = self.steps[0]
        return Boxing("all_gather", self.axis, self.src, first.dst, sympy.Add(*(b.payload for b in self.steps)),
                      sympy.Add(*(b.wire for b in self.steps)), first.messages)

    def dual(self) -> Boxing:
        """The backward's one reduce-scatter, P -> the members' splits, of the full gradients
        (what passes/build_plan.py's dual_of gives one all-gather, summed)."""
        gather = self.merged()
        return Boxing("reduce_scatter", self.axis, "P", self.src, gather.payload * axis_size(self.axis), gather.wire,
                      gather.messages)


def gather_groups(gm: fx.GraphModule) -> list[GatherGroup]:
    """The gather groups: fsdp gathers of one layer's parameters on the same axis in the same dtype,
    in the order the forward first runs them, and one per gather of the model's own parameters."""
    found: dict[tuple, list[tuple[str, str, Boxing]]] = {}
    model: list[GatherGroup] = []
    position = {n: k for k, n in enumerate(gm.graph.nodes)}
    in_layers = [(int(m.group(1)), position[n]) for n in gm.graph.nodes if (m := LAYER.match(info(n).layer + "."))]
    last_layer = max((i for i, _ in in_layers), default=-1)
    layers_end = max((k for _, k in in_layers), default=-1)
    for node in gm.graph.nodes:
        rec = info(node)
        if rec.op != "boxing" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        source = info(node.args[0])
        if source.op != "param" or len(rec.boxing) != 1 or rec.boxing[0].collective != "all_gather":
            continue
        match = LAYER.match(source.param.name)
        step = rec.boxing[0]
        if match is None:
            after = min((position[u] for u in node.users), default=-1) > layers_end >= 0
            model.append(GatherGroup(-1, step.axis, step.src, rec.dtype, (node.name,), (source.param.name,), (step,),
                                     last_layer if after else -1))
            continue
        key = (int(match.group(1)), step.axis, rec.dtype)
        found.setdefault(key, []).append((node.name, source.param.name, step))
    return model + [GatherGroup(layer, axis, "/".join(dict.fromkeys(m[2].src for m in members)), dtype,
                                tuple(m[0] for m in members), tuple(m[1] for m in members), tuple(m[2] for m in members))
                    for (layer, axis, dtype), members in found.items() if len(members) > 1]


def group_plan(group: GatherGroup, add: Callable[..., CollectivePlan], train: bool) -> GatherGroupPlan:
    """The group as the plan records it: its all-gather and, in training, the dual reduce-scatter,
    each added to the step's collectives by ``add`` (build_plan's list) where the first member's were."""
    if group.layer >= 0:
        why = (f"gather group of layer {group.layer}: its {len(group.params)} sharded parameters in one flat buffer, "
               "one all-gather (FSDP2's foreach_all_gather)")
        dual = f"the dual of layer {group.layer}'s gather group: one reduce-scatter of its concatenated gradients"
    else:
        ahead = f", started by layer {group.prefetch_after}" if group.prefetch_after >= 0 else ""
        why = f"{group.params[0]} stored sharded (fsdp), all-gathered before use{ahead}"
        dual = f"the dual of {group.params[0]}'s gather: one reduce-scatter of its gradient, started in the backward"
    steps = [add(group.merged(), "forward", group.nodes[0], why, dtype=group.dtype)]
    if train:
        steps.append(add(group.dual(), "backward", group.nodes[0], dual, dtype=group.dtype))
    return GatherGroupPlan(group.layer, group.params, group.nodes, group.dims, tuple(steps), group.prefetch_after)
