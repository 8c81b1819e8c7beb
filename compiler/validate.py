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
from typing import Any

from .errors import Origin, nearest
from .fields import (
    INT64_MAX,
    Sourced,
    check_identifier,
    coerce,
    expect_list,
    expect_mapping,
    read_dataclass,
    sourced_mapping,
    sublayer_name,
)
from .schema import (
    MODEL_FIELDS,
    SUBLAYER_KINDS,
    HardwareSpec,
    LayerSpec,
    LinkSpec,
    ModelSpec,
    NormSpec,
    SublayerSpec,
    TrainSpec,
)
from .sublayer_checks import check_ffn_sizing, check_shared_tables, check_sublayer
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


def read_norm(doc: Document, item: Sourced) -> NormSpec | None:
    value = item.value
    if value is None or value == "none":
        return None
    if isinstance(value, str):
        return read_dataclass(doc, NormSpec, {"kind": item}, item.path)
    mapping = expect_mapping(doc, item, "a norm")
    return read_dataclass(doc, NormSpec, sourced_mapping(mapping, item.path), item.path)


def read_sublayer(
    doc: Document, item: Sourced, overrides: dict[str, dict[str, Sourced]], hidden: int, default_norm: Sourced
) -> SublayerSpec:
    entry = expect_mapping(doc, item, "a sublayer")
    if len(entry) != 1:
        raise doc.error(item.path, f"a sublayer is one 'kind: {{...}}' entry, got keys {sorted(entry)}",
                        hint="write e.g. '- attention: {heads: 4}' or '- ffn: {hidden: 256}'")
    kind = next(iter(entry))
    kind_path = (*item.path, kind)
    if kind not in SUBLAYER_KINDS:
        guess = nearest(kind, SUBLAYER_KINDS)
        raise doc.error(kind_path, f"unknown sublayer kind '{kind}'", key=True,
                        hint=(f"did you mean '{guess}'? " if guess else "") + "kinds: " + ", ".join(SUBLAYER_KINDS))
    body = entry[kind] if entry[kind] is not None else {}
    items = sourced_mapping(expect_mapping(doc, Sourced(body, kind_path), f"the {kind} sublayer"), kind_path)
    name = sublayer_name(doc, Sourced(body, kind_path), kind)
    items.pop("name", None)
    items.update(overrides.get(name, {}))
    origins = (("", Origin(doc.file, kind_path, *doc.where(kind_path, key=True))),
               *((key, Origin(doc.file, item.path, *doc.where(item.path))) for key, item in items.items()))
    parallel = coerce(doc, items.pop("parallel"), bool) if "parallel" in items else False
    deliver_after = 0
    if "deliver_after" in items:
        deliver_after = coerce(doc, items["deliver_after"], int)
        if deliver_after < 0:
            raise doc.error(items["deliver_after"].path, f"deliver_after counts layers ahead; got {deliver_after}")
        items.pop("deliver_after")
    # a parallel sublayer without its own norm shares the normed input of the sublayer before it
    norm = read_norm(doc, items.pop("norm", Sourced(None, kind_path) if parallel else default_norm))
    config = read_dataclass(doc, SUBLAYER_KINDS[kind], items, kind_path)
    config = check_sublayer(doc, config, items, kind_path, hidden)
    return SublayerSpec(name=name, kind=kind, config=config, norm=norm, parallel=parallel, deliver_after=deliver_after,
                        origins=origins)


def read_overrides(doc: Document, item: Sourced, block: list[Sourced]) -> dict[str, dict[str, Sourced]]:
    """``override: {ffn.hidden: 512}`` -> ``{"ffn": {"hidden": Sourced(512, ...)}}``."""
    mapping = expect_mapping(doc, item, "override")
    names = []
    for sub in block:
        if isinstance(sub.value, dict) and len(sub.value) == 1:
            kind, body = next(iter(sub.value.items()))
            names.append(sublayer_name(doc, Sourced(body, (*sub.path, kind)), kind))
    out: dict[str, dict[str, Sourced]] = {}
    for key, value in mapping.items():
        path = (*item.path, key)
        target, _, fieldname = key.partition(".")
        if not fieldname:
            raise doc.error(path, f"override key '{key}' must be 'sublayer.field'", key=True,
                            hint="e.g. 'ffn.hidden: 512'")
        if target not in names:
            guess = nearest(target, names)
            raise doc.error(path, f"override names sublayer '{target}', which this block does not have", key=True,
                            hint=(f"did you mean '{guess}'? " if guess else "") + "sublayers: " + ", ".join(names))
        out.setdefault(target, {})[fieldname] = Sourced(value, path)
    return out


GROUP_KEYS = ("block", "pattern", "repeat", "override")


def read_layers(doc: Document, model: dict[str, Sourced], hidden: int, default_norm: Sourced) -> tuple[LayerSpec, ...]:
    blocks_item = model.get("blocks")
    if blocks_item is None:
        raise doc.error(("model",), "missing required field 'blocks'", hint="add 'blocks: {dense: [...]}'")
    blocks = expect_mapping(doc, blocks_item, "blocks")
    for name in blocks:
        check_identifier(doc, Sourced(name, (*blocks_item.path, name)), "a block name")
    if "layers" not in model:
        raise doc.error(("model",), "missing required field 'layers'", hint="add 'layers: [{block: NAME, repeat: N}]'")
    groups = expect_list(doc, model["layers"], "layers")
    layers: list[LayerSpec] = []
    for gi, group in enumerate(groups):
        gpath = (*model["layers"].path, gi)
        gmap = expect_mapping(doc, Sourced(group, gpath), "a layer group")
        for key in gmap:
            if key not in GROUP_KEYS:
                guess = nearest(key, GROUP_KEYS)
                raise doc.error((*gpath, key), f"unknown field '{key}' in a layer group", key=True,
                                hint=(f"did you mean '{guess}'? " if guess else "") + "valid: " + ", ".join(GROUP_KEYS))
        if ("block" in gmap) == ("pattern" in gmap):
            raise doc.error(gpath, "a layer group needs exactly one of 'block: NAME' or 'pattern: [NAMES]'")
        if "block" in gmap:
            pattern = [Sourced(gmap["block"], (*gpath, "block"))]
        else:
            names = expect_list(doc, Sourced(gmap["pattern"], (*gpath, "pattern")), "pattern")
            pattern = [Sourced(n, (*gpath, "pattern", i)) for i, n in enumerate(names)]
        repeat = 1
        if "repeat" in gmap:
            repeat = coerce(doc, Sourced(gmap["repeat"], (*gpath, "repeat")), int)
            if repeat < 1:
                raise doc.error((*gpath, "repeat"), f"repeat must be at least 1, got {repeat}")
        for ref in pattern:
            check_identifier(doc, ref, "a block name")
        for _ in range(repeat):
            for ref in pattern:
                if ref.value not in blocks:
                    guess = nearest(str(ref.value), blocks)
                    raise doc.error(ref.path, f"no block named {ref.value!r}",
                                    hint=(f"did you mean '{guess}'? " if guess else "") + "blocks: " + ", ".join(blocks))
                bpath = (*blocks_item.path, ref.value)
                body = expect_list(doc, Sourced(blocks[ref.value], bpath), f"block '{ref.value}'")
                subs = [Sourced(s, (*bpath, i)) for i, s in enumerate(body)]
                if not subs:
                    raise doc.error(bpath, f"block '{ref.value}' has no sublayers")
                overrides = read_overrides(doc, Sourced(gmap["override"], (*gpath, "override")), subs) \
                    if "override" in gmap else {}
                sublayers = tuple(read_sublayer(doc, s, overrides, hidden, default_norm) for s in subs)
                seen: set[str] = set()
                if sublayers[0].parallel:
                    raise doc.error(subs[0].path, "the first sublayer of a block cannot be parallel (to what?)",
                                    hint="put it after the sublayer it runs beside")
                for s, sub in zip(subs, sublayers):
                    if sub.name in seen:
                        raise doc.error(s.path, f"two sublayers named '{sub.name}' in block '{ref.value}'",
                                        hint="give one of them 'name: ...'")
                    seen.add(sub.name)
                check_ffn_sizing(len(layers), ref.value, sublayers)
                layers.append(LayerSpec(index=len(layers), block=ref.value, sublayers=sublayers))
    if not layers:
        raise doc.error(model["layers"].path, "the model has no layers")
    for layer in layers:
        for sub in layer.sublayers:
            if getattr(sub.config, "init", "code") == "paper" and not any(s.kind == "ffn" for s in layer.sublayers):
                raise (sub.origin("init") or sub.origin()).error(
                    f"layer {layer.index}'s {sub.name} uses the paper's init, which sizes values against the FFN of "
                    "its block, but the block has no ffn", hint="add an ffn to the block, or use init: code")
            if layer.index + sub.deliver_after >= len(layers):
                raise (sub.origin("deliver_after") or sub.origin()).error(
                    f"layer {layer.index}'s {sub.name} delivers its output {sub.deliver_after} layers later, past "
                    f"the last layer ({len(layers) - 1})", hint="lower deliver_after for the last layers, or add layers")
    return tuple(layers)


def read_model(doc: Document) -> ModelSpec:
    top = check_top_level(doc, {"model": True, "train": False})
    model = sourced_mapping(expect_mapping(doc, Sourced(top["model"], ("model",)), "model"), ("model",))
    for key, item in model.items():
        if key not in MODEL_FIELDS:
            guess = nearest(key, MODEL_FIELDS)
            raise doc.error(item.path, f"unknown field '{key}'", key=True,
                            hint=(f"did you mean '{guess}'? " if guess else "") + "valid: " + ", ".join(MODEL_FIELDS))
    def required(key: str, tp: type, minimum: int) -> Any:
        if key not in model:
            raise doc.error(("model",), f"missing required field '{key}' ({MODEL_FIELDS[key]})",
                            hint=f"add '{key}: ...' under model")
        value = coerce(doc, model[key], tp)
        if value < minimum:
            raise doc.error(model[key].path, f"must be at least {minimum}, got {value}")
        return value
    name = coerce(doc, model["name"], str) if "name" in model else Path(doc.file).stem
    vocab = required("vocab_size", int, 2)
    hidden = required("hidden_size", int, 1)
    if vocab * hidden > INT64_MAX:
        raise doc.error(("model", "vocab_size"), f"vocab_size x hidden_size = {vocab * hidden:.3g} elements is more "
                        "than a tensor can hold (2^63 - 1)", hint="choose a smaller vocab_size or hidden_size")
    seq_len = required("seq_len", int, 1)
    tie = coerce(doc, model["tie_embeddings"], bool) if "tie_embeddings" in model else False
    default_norm = model.get("norm", Sourced("rms", ("model", "norm")))
    read_norm(doc, default_norm)  # validate once even if every sublayer overrides it
    final = read_norm(doc, model.get("final_norm", default_norm))
    if final is None and "final_norm" in model:
        raise doc.error(model["final_norm"].path, "the LM head always reads a normalised stream; final_norm "
                        "cannot be none", hint="write final_norm: rms (or layer)")
    final = final or NormSpec()  # norm: none for the sublayers still ends with an RMSNorm
    layers = read_layers(doc, model, hidden, default_norm)
    train_raw = top.get("train") or {}
    train = read_dataclass(doc, TrainSpec, sourced_mapping(
        expect_mapping(doc, Sourced(train_raw, ("train",)), "train"), ("train",)), ("train",))
    spec = ModelSpec(name=name, vocab_size=vocab, hidden_size=hidden, seq_len=seq_len, tie_embeddings=tie,
                     final_norm=final, layers=layers, train=train, source=Path(doc.file).name,
                     sha256=hashlib.sha256(doc.text.encode()).hexdigest())
    check_shared_tables(spec)
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
    spec = read_dataclass(doc, _HardwareFields, items, path)
    for key in ("intra_node", "inter_node"):
        if key not in links:
            raise doc.error(path, f"missing required field '{key}'", hint=f"add '{key}: {{bandwidth: ..., latency: ...}}'")
    if not flops:
        raise doc.error(path, "missing required field 'peak_flops'", hint="add 'peak_flops: {fp32: ...}'")
    return HardwareSpec(name=spec.name, devices_per_node=spec.devices_per_node, nodes=spec.nodes, peak_flops=flops,
                        memory_bytes=spec.memory_bytes, memory_bandwidth=spec.memory_bandwidth,
                        intra_node=links["intra_node"], inter_node=links["inter_node"], source=Path(doc.file).name)


@dataclasses.dataclass(frozen=True)
class _HardwareFields:
    """The scalar fields of a hardware spec (links and peak_flops are read separately)."""

    name: str
    devices_per_node: int = dataclasses.field(metadata={"min": 1})
    memory_bytes: float = dataclasses.field(metadata={"min": 0, "exclusive": True, "doc": "bytes per device"})
    memory_bandwidth: float = dataclasses.field(metadata={"min": 0, "exclusive": True, "doc": "bytes/s per device"})
    nodes: int = dataclasses.field(default=1, metadata={"min": 1})


def load_model_spec(path: str | Path, text: str | None = None) -> ModelSpec:
    """Read and validate a model spec; raises ``SpecError`` naming file, line, column and field."""
    return read_model(load_document(path, text))


def load_hardware_spec(path: str | Path, text: str | None = None) -> HardwareSpec:
    return read_hardware(load_document(path, text))
