"""Turn a positioned YAML document into a frozen ``ModelSpec`` or ``HardwareSpec``.

Checks, in order: document shape (known top-level keys), field names and types (via
``fields.read_dataclass``), references (block names in ``layers``, override targets) and
cross-field facts (hidden divisible by heads, kv heads dividing heads, even rotary width).
Every failure is a ``SpecError`` at the offending key or value.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Literal

from .errors import nearest, raise_all
from .fields import Sourced, coerce, expect_mapping, read_dataclass, sourced_mapping
from .layers import read_layers, read_norm
from .schema import MODEL_FIELDS, HardwareSpec, LinkSpec, ModelSpec, NormSpec, TrainSpec
from .sublayer_checks import check_shared_tables
from .tensor_sizes import check_spec_sizes
from .yaml_source import Document, load_document


def check_top_level(doc: Document, allowed: dict[str, bool]) -> dict:
    """``allowed`` maps each top-level key to whether it is required."""
    if not isinstance(doc.data, dict):
        raise doc.error((), "a spec file must be a mapping with top-level keys " + ", ".join(allowed))
    for key in doc.data:
        if key not in allowed:
            guess = nearest(key, allowed)
            raise doc.error((key,), f"unknown top-level key '{key}'", key=True,
                            hint=(f"did you mean '{guess}'? " if guess else "") + "valid: " + ", ".join(allowed))
    for key, required in allowed.items():
        if required and key not in doc.data:
            raise doc.error((), f"missing top-level key '{key}'", hint=f"add a '{key}:' section")
    return doc.data


def read_model(doc: Document) -> ModelSpec:
    """Every mistake in the spec is collected (``doc.collecting``) and raised together at the end;
    a field that failed leaves a fallback (None) so that reading can go on."""
    top = check_top_level(doc, {"model": True, "train": False})
    model = sourced_mapping(expect_mapping(doc, Sourced(top["model"], ("model",)), "model"), ("model",))
    for key, item in model.items():
        if key not in MODEL_FIELDS:
            guess = nearest(key, MODEL_FIELDS)
            doc.errors.append(doc.error(item.path, f"unknown field '{key}'", key=True, hint=(
                f"did you mean '{guess}'? " if guess else "") + "valid: " + ", ".join(MODEL_FIELDS)))

    def required(key: str, tp: type, minimum: int) -> Any:
        with doc.collecting():
            if key not in model:
                raise doc.error(("model",), f"missing required field '{key}' ({MODEL_FIELDS[key]})",
                                hint=f"add '{key}: ...' under model")
            value = coerce(doc, model[key], tp)
            if value < minimum:
                raise doc.error(model[key].path, f"must be at least {minimum}, got {value}")
            return value
        return None

    name, tie, final = Path(doc.file).stem, False, NormSpec()
    with doc.collecting():
        name = coerce(doc, model["name"], str) if "name" in model else name
    vocab = required("vocab_size", int, 2)
    hidden = required("hidden_size", int, 1)
    seq_len = required("seq_len", int, 1)
    with doc.collecting():
        tie = coerce(doc, model["tie_embeddings"], bool) if "tie_embeddings" in model else False
    positions = "none"
    with doc.collecting():
        if "position_embedding" in model:
            positions = coerce(doc, model["position_embedding"], Literal["none", "learned"])
    default_norm = model.get("norm", Sourced("rms", ("model", "norm")))
    with doc.collecting():
        read_norm(doc, default_norm)  # validate once even if every sublayer overrides it
    with doc.collecting():
        final = read_norm(doc, model.get("final_norm", default_norm))
        if final is None and "final_norm" in model:
            raise doc.error(model["final_norm"].path, "the LM head always reads a normalised stream; final_norm "
                            "cannot be none", hint="write final_norm: rms (or layer)")
        final = final or NormSpec()  # norm: none for the sublayers still ends with an RMSNorm
    layers = ()
    with doc.collecting():
        layers = read_layers(doc, model, hidden, default_norm)
    train = TrainSpec()
    with doc.collecting():
        train_raw = top.get("train") or {}
        train = read_dataclass(doc, TrainSpec, sourced_mapping(
            expect_mapping(doc, Sourced(train_raw, ("train",)), "train"), ("train",)), ("train",))
    raise_all(doc.errors)
    spec = ModelSpec(name=name, vocab_size=vocab, hidden_size=hidden, seq_len=seq_len, tie_embeddings=tie,
                     position_embedding=positions,
                     final_norm=final, layers=layers, train=train, source=Path(doc.file).name,
                     sha256=hashlib.sha256(doc.text.encode("utf-8", "surrogatepass")).hexdigest())
    check_shared_tables(spec)
    check_spec_sizes(doc, spec)
    return spec


def read_hardware(doc: Document) -> HardwareSpec:
    top = check_top_level(doc, {"hardware": True})
    path = ("hardware",)
    items = sourced_mapping(expect_mapping(doc, Sourced(top["hardware"], path), "hardware"), path)
    links = {}
    for key in ("intra_node", "inter_node"):
        if key in items:
            item = items.pop(key)
            links[key] = read_dataclass(doc, LinkSpec, sourced_mapping(expect_mapping(doc, item, key), item.path),
                                        item.path)
    flops = {}
    if "peak_flops" in items:
        item = items.pop("peak_flops")
        for dtype, value in expect_mapping(doc, item, "peak_flops").items():
            flops[dtype] = coerce(doc, Sourced(value, (*item.path, dtype)), float)
        if "fp32" not in flops:
            raise doc.error(item.path, "peak_flops needs at least an fp32 entry", hint="add 'fp32: 1.0e+12'")
    def seconds(value, where):
        out = coerce(doc, Sourced(value, where), float)
        if out < 0:
            raise doc.error(where, f"{out} s is negative", hint="seconds per call, 0 or more")
        return out

    def per_group(sizes, where):
        out = {}
        for size, value in expect_mapping(doc, Sourced(sizes, where), where[-1]).items():
            ranks = int(size) if str(size).isdigit() else 0  # the document's keys are text
            if ranks < 2:
                raise doc.error((*where, size), f"group size {size!r} is not a whole number of ranks of 2 or more",
                                hint=f"write '{where[-1]}: {{2: 1.0e-4, 4: 2.0e-4}}': ranks in a group, then seconds")
            out[ranks] = seconds(value, (*where, size))
        return out

    def factor(value, where):
        out = coerce(doc, Sourced(value, where), float)
        if out <= 0:
            raise doc.error(where, f"a wire factor of {out} is not positive",
                            hint="seconds per wire byte against the link's: 1 is the link's own speed")
        return out

    by_kind = _per_kind(doc, items, "collective_by_kind", seconds)
    by_group = _per_kind(doc, items, "collective_by_group", per_group)
    wire = _per_kind(doc, items, "collective_wire_factor", factor)
    drift = per_group(*items.pop("collective_drift")) if "collective_drift" in items else {}  # passes/sync_drift.py
    spec = read_dataclass(doc, _HardwareFields, items, path)
    for key in ("intra_node", "inter_node"):
        if key not in links:
            raise doc.error(path, f"missing required field '{key}'", hint=f"add '{key}: {{bandwidth: ..., latency: ...}}'")
    if not flops:
        raise doc.error(path, "missing required field 'peak_flops'", hint="add 'peak_flops: {fp32: ...}'")
    return HardwareSpec(name=spec.name, devices_per_node=spec.devices_per_node, nodes=spec.nodes, peak_flops=flops,
                        memory_bytes=spec.memory_bytes, memory_bandwidth=spec.memory_bandwidth,
                        intra_node=links["intra_node"], inter_node=links["inter_node"], source=Path(doc.file).name,
                        op_overhead=spec.op_overhead, optimizer_tensor=spec.optimizer_tensor,
                        optimizer_element=spec.optimizer_element, collective_overhead=spec.collective_overhead,
                        loop_pass=spec.loop_pass, collective_by_kind=by_kind, collective_by_group=by_group,
                        collective_wire_factor=wire, collective_drift=drift,
                        host_cores=spec.host_cores)


def _per_kind(doc: Document, items: dict, field: str, read) -> dict:
    """A hardware spec's mapping of collective kinds (``field``, taken out of ``items``), each value
    read by ``read(value, its path)``; an unknown kind is an error naming it."""
    if field not in items:
        return {}
    item = items.pop(field)
    out = {}
    for kind, value in expect_mapping(doc, item, field).items():
        if kind not in COLLECTIVE_KINDS:
            raise doc.error((*item.path, kind), f"unknown collective kind {kind!r}",
                            hint="one of " + ", ".join(COLLECTIVE_KINDS))
        out[kind] = read(value, (*item.path, kind))
    return out


@dataclasses.dataclass(frozen=True)
class _HardwareFields:
    """The scalar fields of a hardware spec (links and peak_flops are read separately)."""

    name: str
    devices_per_node: int = dataclasses.field(metadata={"min": 1})
    memory_bytes: float = dataclasses.field(metadata={"min": 0, "exclusive": True, "doc": "bytes per device"})
    memory_bandwidth: float = dataclasses.field(metadata={"min": 0, "exclusive": True, "doc": "bytes/s per device"})
    nodes: int = dataclasses.field(default=1, metadata={"min": 1})
    op_overhead: float = dataclasses.field(default=0.0, metadata={
        "min": 0, "doc": "seconds per plan op, forward and backward (ultraplan calibrate; 0: not modelled)"})
    optimizer_tensor: float = dataclasses.field(default=0.0, metadata={
        "min": 0, "doc": "AdamW seconds per parameter tensor (ultraplan calibrate)"})
    optimizer_element: float = dataclasses.field(default=0.0, metadata={
        "min": 0, "doc": "AdamW seconds per parameter element (ultraplan calibrate)"})
    collective_overhead: float = dataclasses.field(default=0.0, metadata={
        "min": 0, "doc": "seconds a collective call costs a program beyond its link's formula (ultraplan calibrate)"})
    loop_pass: float = dataclasses.field(default=0.0, metadata={
        "min": 0, "doc": "seconds per pass of an op's Python loop, forward or backward (ultraplan calibrate)"})
    host_cores: int = dataclasses.field(default=0, metadata={
        "min": 0, "doc": "cores the ranks of one node share (ultraplan calibrate; 0: a core per device)"})


# the collectives a hardware spec's collective_by_kind, _by_group and _wire_factor may price (passes/sbp.py's kinds)
COLLECTIVE_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


def load_model_spec(path: str | Path, text: str | None = None) -> ModelSpec:
    """Read and validate a model spec; raises ``SpecError`` naming file, line, column and field."""
    return read_model(load_document(path, text))


def load_hardware_spec(path: str | Path, text: str | None = None) -> HardwareSpec:
    return read_hardware(load_document(path, text))
