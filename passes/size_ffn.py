"""Spec-level pass: give every ``ffn: {hidden: auto}`` the width its block's memory ratio asks for.

UltraMemV2's fifth change rebalances compute between the memory layer and the FFN beside it (the
paper's "memory compute proportion"; UltraMemV2, Huang et al. 2025). In a spec that is one number
on a memory sublayer, ``memory_to_ffn: r``, a property of its block: the block's auto FFN gets the
width ``h`` at which

    FLOPs per token of the block's memory sublayers = r * FLOPs per token of the block's FFNs,

i.e. ``h = (M / r - F_fixed) / f``, with ``M`` the memory sublayers' FLOPs (pkm, peer, ultramem,
ultramem_v2 computed in the block; a skip-layer's output delivered later still counts where it is
computed), ``F_fixed`` the FLOPs of the block's other, fixed-width FFNs and ``f`` the auto FFN's
FLOPs per unit of width; rounded to the nearest multiple of its ``multiple_of``. A ratio no
multiple can reach (width below one multiple) or one asking for an absurd width is an error at
the ratio's line. FLOPs are the cost model's (passes/cost.py), from a probe lowering in which each
auto FFN has width 1: an FFN's FLOPs are linear in its width with no constant term (SwiGLU 6 d h,
GELU 4 d h), and nothing else depends on that width.

This is the one pass that runs before lowering, because what it decides is a shape.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import sympy
from torch import fx

from ..compiler.build import build_model
from ..compiler.errors import blame
from ..compiler.lower import lower
from ..compiler.node_info import info
from ..compiler.schema import MEMORY_KINDS, FFNSpec, LayerSpec, ModelSpec, SublayerSpec
from .annotate_cost import annotate_cost, flops_per_token_by
from .context import PassReport

PROBE_WIDTH = 1
MAX_WIDTH = 2**31 - 1  # beyond int32 no kernel or allocator takes the FFN


@dataclasses.dataclass(frozen=True)
class Sizing:
    """One sized FFN: where it is, the FLOPs that fixed it, the width chosen and the ratio it gives."""

    layer: int
    ffn: str
    memory: str
    target: float
    memory_flops: int  # per token, every memory sublayer of the block
    fixed_ffn_flops: int  # per token, the block's FFNs of fixed width
    ffn_flops_per_width: int  # per token and unit of the auto FFN's inner width
    width: int

    @property
    def achieved(self) -> sympy.Rational:
        return sympy.Rational(self.memory_flops, self.fixed_ffn_flops + self.ffn_flops_per_width * self.width)

    def describe(self) -> str:
        ffn = f"{self.ffn_flops_per_width:,} * {self.width}"
        ffn = f"({self.fixed_ffn_flops:,} + {ffn})" if self.fixed_ffn_flops else ffn
        return (f"layers.{self.layer}.{self.ffn}: hidden auto -> {self.width}: memory {self.memory_flops:,} FLOP/token "
                f"= {float(self.achieved):.4f} x FFN {ffn} "
                f"(layers.{self.layer}.{self.memory}.memory_to_ffn {self.target:g})")


def with_widths(spec: ModelSpec, widths: dict[tuple[int, str], int]) -> ModelSpec:
    """``spec`` with the FFN ``(layer, name)`` given width ``widths[...]``."""
    layers = []
    for layer in spec.layers:
        subs = tuple(dataclasses.replace(s, config=dataclasses.replace(s.config, hidden=widths[layer.index, s.name]))
                     if (layer.index, s.name) in widths else s for s in layer.sublayers)
        layers.append(dataclasses.replace(layer, sublayers=subs))
    return dataclasses.replace(spec, layers=tuple(layers))


def _sublayer_of(node: fx.Node) -> str | None:
    """``layers.3.ffn`` for a node that a sublayer's module produced, else None."""
    path = info(node).layer.split(".")
    return ".".join(path[:3]) if len(path) >= 3 and path[0] == "layers" else None


def _integer(value: sympy.Expr, what: str) -> int:
    if not value.is_Integer:  # memory and FFN FLOPs per token are whole numbers, free of B and T
        raise ValueError(f"{what}: expected a whole number of FLOPs per token, got {value}")
    return int(value)


def _size(layer: LayerSpec, flops: dict[str, sympy.Expr]) -> Sizing:
    ffn, memory = layer.ffn_sizing()
    def of(sub: SublayerSpec) -> int:
        name = f"layers.{layer.index}.{sub.name}"
        return _integer(flops.get(name, sympy.Integer(0)), name)

    mem = sum(of(s) for s in layer.sublayers if s.kind in MEMORY_KINDS)
    fixed = sum(of(s) for s in layer.sublayers if isinstance(s.config, FFNSpec) and s is not ffn)
    unit = of(ffn) // PROBE_WIDTH
    r, step = memory.config.memory_to_ffn, ffn.config.multiple_of
    ideal = (mem / r - fixed) / unit
    width = step * math.floor(ideal / step + 0.5) if math.isfinite(ideal) and ideal < MAX_WIDTH else MAX_WIDTH + 1
    where = f"layer {layer.index} (block '{layer.block}')"
    suspects = [(memory, "memory_to_ffn"), (ffn, "multiple_of"), (ffn, "hidden"),
                *((s, "hidden") for s in layer.sublayers if isinstance(s.config, FFNSpec) and s is not ffn)]
    if width < step:
        smallest = Sizing(layer.index, ffn.name, memory.name, r, mem, fixed, unit, step).achieved
        largest_r = mem / (fixed + unit * step / 2)  # nearest rounding still gives one multiple up to here
        shrink = "narrow the block's fixed ffns" if fixed and step == 1 else "use a smaller multiple_of"
        raise _error(suspects, f"{where}: memory_to_ffn {r:g} is out of reach: {ffn.name}'s smallest width "
                     f"(multiple_of {step}) gives {float(smallest):.4g}",
                     f"use memory_to_ffn <= {_round(largest_r, math.floor):g}, or {shrink}")
    if width > MAX_WIDTH:
        smallest_r = mem / (fixed + unit * MAX_WIDTH)
        raise _error(suspects, f"{where}: memory_to_ffn {r:g} asks for an ffn of width {ideal:.3g}, more than "
                     f"{MAX_WIDTH:,}", f"use memory_to_ffn >= {_round(smallest_r, math.ceil):g}")
    return Sizing(layer.index, ffn.name, memory.name, r, mem, fixed, unit, width)


def _round(value: float, direction, digits: int = 4) -> float:
    """``value`` to ``digits`` significant figures, rounded in ``direction`` (math.floor or math.ceil)
    so that a bound quoted in a hint is itself inside the bound."""
    scale = 10 ** (digits - 1 - math.floor(math.log10(value)))
    return direction(value * scale) / scale


def _error(suspects: list[tuple[SublayerSpec, str]], message: str, hint: str) -> Exception:
    """At the value a layer group's override wrote, if one of the suspects is; else at the ratio."""
    origin = blame(sub.origin(name) for sub, name in suspects)
    return origin.error(message, hint=hint) if origin else ValueError(f"{message} ({hint})")


def size_ffn(spec: ModelSpec) -> tuple[ModelSpec, PassReport]:
    """The spec with every auto FFN sized, and a report of each decision (none when nothing is auto)."""
    start = time.perf_counter()
    report = PassReport("size_ffn")
    layers = [layer for layer in spec.layers if layer.ffn_sizing()]
    if layers:
        spec, sizings = _sized(spec)
        report.decisions += [s.describe() for s in sizings]
        report.costs.update({f"layers.{s.layer}.{s.ffn}.memory_to_ffn": s.achieved for s in sizings})
    report.seconds = time.perf_counter() - start
    return spec, report


@functools.lru_cache(maxsize=64)
def _sized(spec: ModelSpec) -> tuple[ModelSpec, tuple[Sizing, ...]]:
    """The sized spec and each layer's sizing; memoised (specs are frozen values), as every plan of a spec
    sizes it alike and the probe graph's trace and sympy simplify are most of a tiny plan's spec passes."""
    layers = [layer for layer in spec.layers if layer.ffn_sizing()]
    probe = with_widths(spec, {(layer.index, layer.ffn_sizing()[0].name): PROBE_WIDTH for layer in layers})
    gm = lower(build_model(probe, device="meta"), mode="infer")
    annotate_cost(gm, None)
    flops = flops_per_token_by(gm, _sublayer_of)
    sizings = tuple(_size(layer, flops) for layer in layers)
    return with_widths(spec, {(s.layer, s.ffn): s.width for s in sizings}), sizings
