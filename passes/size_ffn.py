"""Spec-level pass: give every ``ffn: {hidden: auto}`` the width its block's memory ratio asks for.

UltraMemV2's fifth change rebalances compute between the memory layer and the FFN beside it (the
paper's "memory compute proportion"; research/memory_layers.md §5.1). In a spec that is one number
on the memory sublayer, ``memory_to_ffn: r``; the FFN of the same block then has the width ``h``
at which

    memory FLOPs per token = r * FFN FLOPs per token,

rounded to the FFN's ``multiple_of`` (at least one multiple). FLOPs are the cost model's
(passes/cost.py), read from a probe lowering in which every auto FFN has width 1: an FFN's FLOPs
are linear in its width with no constant term (SwiGLU 6 d h, GELU 4 d h), so the probe gives the
FLOPs per unit of width, and the memory's FLOPs do not depend on the FFN at all. The ratio is per
block; a memory sublayer delivered later (UltraMem's skip-layer) counts in the block that computes it.

This is the one pass that runs before lowering, because what it decides is a shape.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict

import sympy

from ..compiler.build import build_model
from ..compiler.lower import lower
from ..compiler.schema import FFNSpec, ModelSpec, SublayerSpec
from ..compiler.shapes import B, T
from .annotate_cost import annotate_cost
from .context import PassReport

PROBE_WIDTH = 1


@dataclasses.dataclass(frozen=True)
class Sizing:
    """One sized FFN: where it is, the FLOPs that fixed it, the width chosen and the ratio it gives."""

    layer: int
    ffn: str
    memory: str
    target: float
    memory_flops: int  # per token
    ffn_flops_per_width: int  # per token and unit of inner width
    width: int

    @property
    def achieved(self) -> float:
        return self.memory_flops / (self.ffn_flops_per_width * self.width)

    def describe(self) -> str:
        return (f"layers.{self.layer}.{self.ffn}: hidden auto -> {self.width}: layers.{self.layer}.{self.memory} "
                f"{self.memory_flops:,} FLOP/token = {self.achieved:.4f} x FFN {self.ffn_flops_per_width:,} * "
                f"{self.width} (memory_to_ffn {self.target:g})")


def _auto_pairs(spec: ModelSpec) -> list[tuple[int, SublayerSpec, SublayerSpec]]:
    """(layer, auto ffn, memory sublayer with the ratio) for each block that asks; validation
    guarantees at most one of each per block and that they come together."""
    pairs = []
    for layer in spec.layers:
        ffn = next((s for s in layer.sublayers if isinstance(s.config, FFNSpec) and s.config.hidden == "auto"), None)
        memory = next((s for s in layer.sublayers if getattr(s.config, "memory_to_ffn", None) is not None), None)
        if ffn is not None and memory is not None:
            pairs.append((layer.index, ffn, memory))
    return pairs


def with_widths(spec: ModelSpec, widths: dict[tuple[int, str], int]) -> ModelSpec:
    """``spec`` with the FFN ``(layer, name)`` given width ``widths[...]``."""
    layers = []
    for layer in spec.layers:
        subs = tuple(dataclasses.replace(s, config=dataclasses.replace(s.config, hidden=widths[layer.index, s.name]))
                     if (layer.index, s.name) in widths else s for s in layer.sublayers)
        layers.append(dataclasses.replace(layer, sublayers=subs))
    return dataclasses.replace(spec, layers=tuple(layers))


def flops_by_sublayer(spec: ModelSpec) -> dict[str, sympy.Expr]:
    """Forward FLOPs per token of each sublayer (``layers.3.ffn``), from the cost model."""
    gm = lower(build_model(spec, device="meta"), mode="infer")
    annotate_cost(gm, None)
    out: dict[str, sympy.Expr] = defaultdict(lambda: sympy.Integer(0))
    for node in gm.graph.nodes:
        path = node.meta.get("ultraplan.layer", "").split(".")
        if "ultraplan.cost" in node.meta and len(path) >= 3 and path[0] == "layers":
            out[".".join(path[:3])] += node.meta["ultraplan.cost"].flops
    return {k: sympy.simplify(v / (B * T)) for k, v in out.items()}


def _constant(value: sympy.Expr, what: str) -> int:
    if value.free_symbols:
        raise ValueError(f"{what}: FLOPs per token depend on {sorted(map(str, value.free_symbols))} ({value}); "
                         "memory_to_ffn needs a fixed number")
    return int(value)


def size_ffn(spec: ModelSpec) -> tuple[ModelSpec, PassReport]:
    """The spec with every auto FFN sized, and a report of each decision."""
    start = time.perf_counter()
    report = PassReport("size_ffn")
    pairs = _auto_pairs(spec)
    if not pairs:
        report.decisions.append("no ffn says hidden: auto; widths are as written")
        return spec, report
    flops = flops_by_sublayer(with_widths(spec, {(i, ffn.name): PROBE_WIDTH for i, ffn, _ in pairs}))
    sizings = []
    for i, ffn, memory in pairs:
        mem = _constant(flops[f"layers.{i}.{memory.name}"], f"layers.{i}.{memory.name}")
        unit = _constant(flops[f"layers.{i}.{ffn.name}"], f"layers.{i}.{ffn.name}") // PROBE_WIDTH
        target = memory.config.memory_to_ffn
        step = ffn.config.multiple_of
        width = max(step, step * round(mem / (target * unit * step)))
        sizings.append(Sizing(i, ffn.name, memory.name, target, mem, unit, width))
    report.decisions += [s.describe() for s in sizings]
    report.costs.update({f"layers.{s.layer}.{s.ffn}.memory_to_ffn": sympy.Rational(s.memory_flops,
                                                                                  s.ffn_flops_per_width * s.width)
                         for s in sizings})
    report.seconds = time.perf_counter() - start
    return with_widths(spec, {(s.layer, s.ffn): s.width for s in sizings}), report
