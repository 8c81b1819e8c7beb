"""The pass pipeline: one ordered list, and the functions that run it.

Order and why:
0. ``size_ffn``      (on the spec, before lowering) gives ``ffn: {hidden: auto}`` the width its
                     block's memory_to_ffn ratio asks for: a width is a shape, and everything
                     below reads shapes. Idempotent: a sized spec passes through unchanged.
1. ``precision``     gives every value its dtype for ``train.precision`` (bfloat16 compute copies
                     and activations, float32 masters and losses): shapes times dtypes are the bytes
                     every pass below counts. Idempotent; in fp32 it keeps lowering's dtypes.
   ``shape_prop``    checks lowering's symbolic shapes (and those dtypes) against torch first: every
                     cost and placement below is computed from them.
2. ``annotate_cost`` needs shapes; gives each op its FLOPs and bytes (sympy in B, T).
2b. ``fuse``         needs costs (the bytes a fusion saves); rewrites subgraphs into fused op-table
                     records before placement, so strategies and signatures see the fused ops.
3. ``choose_sbp``    needs shapes (for boxing bytes); runs each mesh axis's strategy, propagates
                     signatures over the op table, inserts boxing nodes.
4. ``build_plan``    needs all of the above; reads them into the Plan and evaluates the totals.
5. ``find_blocks``   needs the Plan's per-node records; groups layers that compute the same on
                     their shards into distinct blocks, and consecutive ones into loops.

Under ``--strategy auto`` make_plan then records the search's optimum in the plan's totals
(``search.record_search``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx

from ..compiler.build import build_model
from ..compiler.lower import lower
from ..compiler.node_info import info
from ..compiler.schema import HardwareSpec, ModelSpec
from ..compiler.shapes import B, T
from ..compiler.tensor_sizes import ELEMENT_BYTES, MAX_TENSOR_BYTES, too_large
from .annotate_cost import annotate_cost
from .blocks import find_blocks
from .build_plan import build_plan
from .choose_sbp import choose_sbp
from .context import Mesh, PassReport, PlanContext, PlanError
from .fuse import fuse
from .plan import Plan
from .precision import precision
from .search import record_search
from .shape_prop import shape_prop
from .size_ffn import size_ffn

SpecPass = Callable[[ModelSpec], tuple[ModelSpec, PassReport]]

Pass = Callable[[fx.GraphModule, PlanContext], PassReport]

SPEC_PASSES: list[tuple[str, SpecPass]] = [
    ("size_ffn", size_ffn),
]

PIPELINE: list[tuple[str, Pass]] = [
    ("precision", precision),
    ("shape_prop", shape_prop),
    ("annotate_cost", annotate_cost),
    ("fuse", fuse),
    ("choose_sbp", choose_sbp),
    ("build_plan", build_plan),
    ("find_blocks", find_blocks),
]


class PassFailed(Exception):
    """A pass broke an invariant: names the pass and the ones that ran before it."""


def run_pipeline(gm: fx.GraphModule, ctx: PlanContext, *, stop_after: str | None = None) -> list[PassReport]:
    reports: list[PassReport] = []
    for name, run in PIPELINE:
        try:
            reports.append(run(gm, ctx))
        except AssertionError as exc:
            done = ", ".join(r.name for r in reports) or "none"
            raise PassFailed(f"pass {name} failed (after: {done}): {exc}") from exc
        if name == stop_after:
            break
    return reports


def prepare_spec(spec: ModelSpec) -> tuple[ModelSpec, list[PassReport]]:
    """Run the spec passes: the spec every later stage (and the eager reference) builds."""
    reports = []
    for _, run in SPEC_PASSES:
        spec, report = run(spec)
        reports.append(report)
    return spec, reports


def lower_spec(spec: ModelSpec, mode: str = "train") -> fx.GraphModule:
    """The graph of ``spec`` (spec passes applied), built on the meta device (no weights allocated)."""
    spec, _ = prepare_spec(spec)
    return lower(build_model(spec, device="meta"), mode=mode)


def make_context(
    spec: ModelSpec, hardware: HardwareSpec, mesh: Mesh, *, batch: int | None = None, seq: int | None = None,
    mode: str = "train", spec_text: str = "", strategies: tuple[str, ...] = (),
    forces: tuple[tuple[str, str], ...] = (), bucket_cap_bytes: int | None = None, fuse: bool = True,
) -> PlanContext:
    """The question a plan answers; B and T default to the spec's train.batch_size and seq_len."""
    batch = spec.train.batch_size if batch is None else batch
    seq = spec.seq_len if seq is None else seq
    if batch < 1 or seq < 1:
        raise PlanError(f"batch and sequence length must be at least 1, got --batch {batch} --seq {seq}")
    if spec.position_embedding == "learned" and seq > spec.seq_len:
        raise PlanError(f"the learned position table has {spec.seq_len} rows (the spec's seq_len), so --seq "
                        f"{seq} has positions without an embedding; use --seq at most {spec.seq_len}")
    big = too_large(spec, batch, seq)
    if big is not None:  # torch sizes storage in int64 bytes, even on the meta device
        owner = f"{big.sublayer.name}'s " if big.sublayer else ""
        raise PlanError(f"torch cannot size this graph at B={batch}, T={seq}: {owner}{big.what} would be "
                        f"{big.elements:.3g} elements = {big.nbytes:.3g} bytes, past 2^63 - 1; lower --batch or --seq")
    if mesh.size > hardware.num_devices:
        raise PlanError(f"mesh {mesh} needs {mesh.size} devices, but hardware {hardware.name} has "
                        f"{hardware.num_devices} ({hardware.nodes} node(s) x {hardware.devices_per_node}); "
                        "use a smaller --mesh or another --hardware")
    if mode not in ("train", "infer"):
        raise PlanError(f"mode must be train or infer, got {mode!r}")
    if bucket_cap_bytes is not None and bucket_cap_bytes < 1:
        raise PlanError(f"the gradient bucket cap must be positive, got {bucket_cap_bytes} bytes")
    return PlanContext(spec, hardware, mesh, batch, seq, mode, spec_text, tuple(strategies), tuple(forces),
                       bucket_cap_bytes, fuse)


def check_graph_sizes(gm: fx.GraphModule, ctx: PlanContext) -> None:
    """Every value of the graph at the plan's B and T fits torch's int64 byte count (at float64, as
    compiler/tensor_sizes.py counts): the spec-level check names the usual suspects, this one sees
    every tensor lowering made."""
    point = {B: ctx.batch, T: ctx.seq}
    sizes: dict[object, int] = {}  # a graph has few distinct dims; xreplace: a plain substitution, unlike subs
    for node in gm.graph.nodes:
        elements = 1
        for dim in info(node).shape:
            if dim not in sizes:
                sizes[dim] = int(dim.xreplace(point)) if hasattr(dim, "xreplace") else int(dim)
            elements *= sizes[dim]
        if elements * ELEMENT_BYTES > MAX_TENSOR_BYTES:
            raise PlanError(f"torch cannot size this graph at B={ctx.batch}, T={ctx.seq}: {node.name} would be "
                            f"{elements:.3g} elements = {elements * ELEMENT_BYTES:.3g} bytes, past 2^63 - 1; "
                            "lower --batch or --seq")


def make_plan(
    spec: ModelSpec, hardware: HardwareSpec, mesh: Mesh, *, batch: int | None = None, seq: int | None = None,
    mode: str = "train", spec_text: str = "", stop_after: str | None = None, strategies: tuple[str, ...] = (),
    forces: tuple[tuple[str, str], ...] = (), bucket_cap_bytes: int | None = None, fuse: bool = True,
) -> tuple[Plan | None, fx.GraphModule, list[PassReport]]:
    """Run the spec passes and the pipeline (up to ``stop_after``); return the plan (None when
    stopped before build_plan), the annotated graph and every pass's report."""
    spec, spec_reports = prepare_spec(spec)
    ctx = make_context(spec, hardware, mesh, batch=batch, seq=seq, mode=mode, spec_text=spec_text,
                       strategies=strategies, forces=forces, bucket_cap_bytes=bucket_cap_bytes, fuse=fuse)
    gm = lower_spec(spec, mode)
    check_graph_sizes(gm, ctx)
    reports = spec_reports + run_pipeline(gm, ctx, stop_after=stop_after)
    if "ultraplan.search" in gm.meta and "ultraplan.plan" in gm.meta:
        reports.append(record_search(gm, ctx))
    return gm.meta.get("ultraplan.plan"), gm, reports
