"""What every pass receives (``PlanContext``) and returns (``PassReport``)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import sympy

from ..compiler.schema import HardwareSpec, ModelSpec
from .host_cost import host_values, oversubscription
from .symbols import PEAK, B, T, axis_bandwidth, axis_latency, axis_size
from .sync_drift import drift_values


class PlanError(Exception):
    """A plan that cannot be made as asked (a batch that does not split over the mesh, a strategy
    the model's sizes do not divide, a forced SBP no signature of the op takes)."""


@dataclass(frozen=True)
class Mesh:
    """A device mesh: ``(4,)`` or ``(2, 4)``; ranks are laid row-major (the last axis fastest), so an
    axis whose groups span nodes is the one priced at inter-node speed (PlanContext.axis_link)."""

    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        out = 1
        for n in self.shape:
            out *= n
        return out

    @staticmethod
    def parse(text: str) -> Mesh:
        """``"4"`` -> (4,), ``"2x4"`` -> (2, 4); raises ValueError with the reason."""
        parts = str(text).lower().split("x")
        try:
            shape = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"--mesh takes N or NxM (e.g. 4 or 2x4), got {text!r}") from None
        if not shape or any(n < 1 for n in shape):
            raise ValueError(f"mesh axis sizes must be positive, got {text!r}")
        return Mesh(shape)

    def __str__(self) -> str:
        return "x".join(str(n) for n in self.shape)


@dataclass
class PlanContext:
    """The question a plan answers: this spec, on this mesh and hardware, at this B and T."""

    spec: ModelSpec
    hardware: HardwareSpec
    mesh: Mesh
    batch: int
    seq: int
    mode: str = "train"
    spec_text: str = ""  # the spec file's text, carried into the plan
    strategies: tuple[str, ...] = ()  # one named strategy per mesh axis (passes/strategies.py)
    forces: tuple[tuple[str, str], ...] = ()  # (glob over node names, nd-SBP text) pinned by hand
    bucket_cap_bytes: int | None = None  # gradient buckets' width on the byte line (passes/buckets.py); None: 50 MiB
    fuse: bool = True  # run the fusion pass (passes/fuse.py); --no-fuse turns it off

    def axis_link(self, axis: int):
        """The link an axis's collectives cross: intra-node when every group of the axis (the ranks
        that differ only in this axis's coordinate) lies on one node, else inter-node. Ranks are laid
        on devices row-major (the last axis varies fastest, as torch's DeviceMesh numbers them:
        ``torch.arange(n).view(shape)``), ``devices_per_node`` consecutive ranks per node."""
        hw = self.hardware
        per_node = hw.devices_per_node
        shape = self.mesh.shape
        stride = 1
        for n in shape[axis + 1:]:
            stride *= n
        for rank in range(self.mesh.size):
            if (rank // stride) % shape[axis]:
                continue  # not the first rank of its group
            nodes = {(rank + k * stride) // per_node for k in range(shape[axis])}
            if len(nodes) > 1:
                return hw.inter_node
        return hw.intra_node

    def values(self) -> dict[sympy.Symbol, float]:
        """Numbers for every symbol a cost may contain."""
        peak = self.hardware.peak_flops  # at the precision the step computes in (fp32 when not listed)
        # a rank's FLOP/s: one core's, shared where more ranks than cores run on a host (host_cost.py)
        share = oversubscription(self.hardware, self.mesh.size)
        rate = peak.get(self.spec.train.precision, peak["fp32"])
        out: dict[sympy.Symbol, float] = {B: self.batch, T: self.seq, PEAK: rate / share if share != 1 else rate}
        for axis, n in enumerate(self.mesh.shape):
            link = self.axis_link(axis)
            out[axis_size(axis)] = n
            out[axis_bandwidth(axis)] = link.bandwidth
            out[axis_latency(axis)] = link.latency
        # a calibrated spec's host terms (passes/host_cost.py), its collectives' on every group this mesh forms
        groups = self.group_sizes()
        return out | host_values(self.hardware, self.mesh.size, groups) | drift_values(self.hardware, groups)

    def group_sizes(self) -> tuple[int, ...]:
        """The sizes of the groups a collective of this mesh runs on: an axis's, or the product of the
        axes a spanning call covers (any set of them); 1 too, where an axis has one device (a one-device
        mesh's gradient all_reduce is still called, on a group of one)."""
        shape = self.mesh.shape
        sizes = {math.prod(shape[a] for a in axes) for k in range(1, len(shape) + 1)
                 for axes in itertools.combinations(range(len(shape)), k)}
        return tuple(sorted(sizes))


@dataclass
class PassReport:
    """What a pass did: its name, wall time, the decisions it made, and symbolic totals."""

    name: str
    seconds: float = 0.0
    decisions: list[str] = field(default_factory=list)
    costs: dict[str, sympy.Expr] = field(default_factory=dict)

    def render(self) -> str:
        lines = [f"# Constructed by {self.name} (took {self.seconds * 1000:.0f} ms)"]
        lines += [f"#   {d}" for d in self.decisions]
        lines += [f"#   {k} = {v}" for k, v in self.costs.items()]
        return "\n".join(lines)
