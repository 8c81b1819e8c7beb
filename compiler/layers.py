"""Read a model's blocks and layer groups into one ``LayerSpec`` per layer.

Why its own file: the stack is where a spec's size is decided (``repeat``), so this is where the
bound on the number of layers (``schema.MAX_LAYERS``) is enforced, at the ``repeat`` that passes
it, before anything is expanded. A block is read once per layer group (its sublayers are frozen
values, shared by the group's repeats), so 1,000 identical layers cost one block's validation,
and every block is read even when no layer uses it. Mistakes are collected (``Document.collecting``)
per group and per sublayer, so one run reports all of them.
"""

from __future__ import annotations

import dataclasses

from .errors import Origin, PathEntry, SpecError, nearest, raise_all
from .fields import (
    Sourced,
    check_identifier,
    coerce,
    expect_list,
    expect_mapping,
    read_dataclass,
    sourced_mapping,
    sublayer_name,
)
from .schema import MAX_LAYERS, SUBLAYER_KINDS, LayerSpec, NormSpec, SublayerSpec
from .sublayer_checks import check_ffn_sizing, check_sublayer
from .yaml_source import Document

GROUP_KEYS = ("block", "pattern", "repeat", "override")
SUBLAYER_KEYS = ("name", "norm", "parallel", "deliver_after")  # read here, beside each kind's own fields


def read_norm(doc: Document, item: Sourced) -> NormSpec | None:
    value = item.value
    if value is None or value == "none":
        return None
    if isinstance(value, str):
        return read_dataclass(doc, NormSpec, {"kind": item}, item.path)
    mapping = expect_mapping(doc, item, "a norm")
    return read_dataclass(doc, NormSpec, sourced_mapping(mapping, item.path), item.path)


def resolve_tucker_norms(config: object, norm: NormSpec | None) -> object:
    """``query_norm: auto`` / ``key_norm: auto`` of UltraMem(V2) -> the kind of the norm the sublayer
    reads (its own, else the model's; layer where there is none): the official code builds both with
    ``LayerNormBase.build(config)``, i.e. the model's ``layer_norm_type``
    (Ultra-Sparse-Memory-Network olmo/ultramem_layer_v2.py:193-194, olmo/ultramem_layer.py:104-105)."""
    if not hasattr(config, "key_norm"):
        return config
    kind = norm.kind if norm is not None else "layer"
    return dataclasses.replace(config, **{f: kind for f in ("query_norm", "key_norm") if getattr(config, f) == "auto"})


def read_sublayer(
    doc: Document, item: Sourced, overrides: dict[str, dict[str, Sourced]], hidden: int | None,
    default_norm: Sourced,
) -> SublayerSpec:
    """One ``- kind: {...}`` entry; ``hidden`` is None when hidden_size itself was wrong (the checks
    that need it are skipped, the rest still run)."""
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
    config = read_dataclass(doc, SUBLAYER_KINDS[kind], items, kind_path, also=SUBLAYER_KEYS)
    config = check_sublayer(doc, config, items, kind_path, hidden)
    config = resolve_tucker_norms(config, norm or read_norm(doc, default_norm))
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


def read_block(doc: Document, blocks: Sourced, name: str, override: Sourced | None, hidden: int | None,
               default_norm: Sourced, first_layer: int) -> tuple[SublayerSpec, ...]:
    """Block ``name``'s sublayers under one group's ``override`` (None: as written); every sublayer's
    mistakes are reported together."""
    bpath = (*blocks.path, name)
    body = expect_list(doc, Sourced(blocks.value[name], bpath), f"block '{name}'")
    subs = [Sourced(s, (*bpath, i)) for i, s in enumerate(body)]
    if not subs:
        raise doc.error(bpath, f"block '{name}' has no sublayers")
    overrides = read_overrides(doc, override, subs) if override is not None else {}
    errors, sublayers = [], []
    for s in subs:
        try:
            sublayers.append(read_sublayer(doc, s, overrides, hidden, default_norm))
        except SpecError as exc:
            errors.append(exc)
    raise_all(errors)
    if sublayers[0].parallel:
        raise doc.error(subs[0].path, "the first sublayer of a block cannot be parallel (to what?)",
                        hint="put it after the sublayer it runs beside")
    seen: set[str] = set()
    for s, sub in zip(subs, sublayers):
        if sub.name in seen:
            raise doc.error(s.path, f"two sublayers named '{sub.name}' in block '{name}'",
                            hint="give one of them 'name: ...'")
        seen.add(sub.name)
    check_ffn_sizing(first_layer, name, tuple(sublayers))
    return tuple(sublayers)


def read_group(doc: Document, gpath: tuple[PathEntry, ...], group: object, blocks: Sourced) -> tuple[list[Sourced], int]:
    """(the block references, repeat) of one layer group, checked."""
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
        if not pattern:
            raise doc.error((*gpath, "pattern"), "pattern names no blocks", hint="e.g. 'pattern: [dense, moe]'")
    repeat = 1
    if "repeat" in gmap:
        repeat = coerce(doc, Sourced(gmap["repeat"], (*gpath, "repeat")), int)
        if repeat < 1:
            raise doc.error((*gpath, "repeat"), f"repeat must be at least 1, got {repeat}")
    for ref in pattern:
        check_identifier(doc, ref, "a block name")
        if ref.value not in blocks.value:
            guess = nearest(str(ref.value), blocks.value)
            raise doc.error(ref.path, f"no block named {ref.value!r}",
                            hint=(f"did you mean '{guess}'? " if guess else "") + "blocks: " + ", ".join(blocks.value))
    return pattern, repeat


def read_layers(doc: Document, model: dict[str, Sourced], hidden: int | None,
                default_norm: Sourced) -> tuple[LayerSpec, ...]:
    blocks_item = model.get("blocks")
    if blocks_item is None:
        raise doc.error(("model",), "missing required field 'blocks'", hint="add 'blocks: {dense: [...]}'")
    expect_mapping(doc, blocks_item, "blocks")
    for name in blocks_item.value:
        with doc.collecting():
            check_identifier(doc, Sourced(name, (*blocks_item.path, name)), "a block name")
    if "layers" not in model:
        raise doc.error(("model",), "missing required field 'layers'", hint="add 'layers: [{block: NAME, repeat: N}]'")
    groups = expect_list(doc, model["layers"], "layers")
    layers: list[LayerSpec] = []
    used: set[str] = set()
    for gi, group in enumerate(groups):
        gpath = (*model["layers"].path, gi)
        with doc.collecting():
            pattern, repeat = read_group(doc, gpath, group, blocks_item)
            used.update(ref.value for ref in pattern)
            if len(layers) + repeat * len(pattern) > MAX_LAYERS:
                where = (*gpath, "repeat") if "repeat" in group else (*gpath, "block" if "block" in group else "pattern")
                raise doc.error(where, f"this group makes the model {len(layers) + repeat * len(pattern):,} layers "
                                f"deep, more than the {MAX_LAYERS:,} a spec may have",
                                hint=f"lower repeat; ultraplan accepts at most {MAX_LAYERS} layers")
            override = Sourced(group["override"], (*gpath, "override")) if "override" in group else None
            read: dict[str, tuple[SublayerSpec, ...]] = {}
            for i, ref in enumerate(pattern):
                if ref.value not in read:
                    read[ref.value] = read_block(doc, blocks_item, ref.value, override, hidden, default_norm,
                                                 len(layers) + i)
            for _ in range(repeat):
                for ref in pattern:
                    layers.append(LayerSpec(index=len(layers), block=ref.value, sublayers=read[ref.value]))
    for name in blocks_item.value:
        if name not in used and isinstance(name, str):
            with doc.collecting():  # unused blocks are still checked: a mistake waits there for its first use
                read_block(doc, blocks_item, name, None, hidden, default_norm, 0)
    raise_all(doc.errors)
    if not layers:
        raise doc.error(model["layers"].path, "the model has no layers")
    check_across_layers(layers)
    return tuple(layers)


def check_across_layers(layers: list[LayerSpec]) -> None:
    """Facts that depend on a layer's place in the stack: the paper's init needs an ffn in the block,
    and an output delivered later must land on a layer that exists."""
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
