"""The field reference of the spec language, generated from the schema's dataclasses and metadata.

Why generated: the field types, defaults, bounds and help texts live once, on the dataclasses
(compiler/schema.py, compiler/memory_specs.py, with ``fields.doc`` metadata); docs/spec-reference.md
and ``ultraplan fields [KIND]`` are both printed from here, and a test fails when the file is stale.
Torch-free, so ``ultraplan fields`` answers at once.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any

from .fields import type_name
from .layers import GROUP_KEYS
from .schema import MAX_LAYERS, MODEL_FIELDS, SUBLAYER_KINDS, LinkSpec, NormSpec, TrainSpec
from .validate import _HardwareFields

HEADER = """# Spec field reference

Generated from the schema (compiler/schema.py, compiler/memory_specs.py, compiler/fields.py) by
`make docs` (`tools/gen_spec_reference.py`); do not edit by hand. `ultraplan fields [KIND]` prints
the same sections. docs/spec-language.md describes the language; the checks beyond each field's
type and bound (divisibility, pairs of fields) are listed there and in compiler/sublayer_checks.py.
"""

# The model-level fields are read one by one in compiler/validate.py (read_model): their types and bounds.
MODEL_TYPES: dict[str, tuple[str, str, str]] = {  # field -> (type, default, constraint)
    "name": ("a string", "the file's name", ""),
    "vocab_size": ("an integer", "required", ">= 2"),
    "hidden_size": ("an integer", "required", ">= 1"),
    "seq_len": ("an integer", "required", ">= 1"),
    "tie_embeddings": ("true or false", "false", ""),
    "position_embedding": ("'none' or 'learned'", "none", ""),
    "norm": ("rms, layer, none or a norm mapping", "rms", ""),
    "final_norm": ("rms, layer or a norm mapping", "the value of norm", "not none"),
    "blocks": ("a mapping of block name -> list of sublayers", "required", "names are identifiers"),
    "layers": ("a list of layer groups", "required", f"at most {MAX_LAYERS} layers in all"),
}
GROUP_DOCS = {
    "block": ("a block name", "one of block or pattern", "the block every layer of the group is"),
    "pattern": ("a list of block names", "one of block or pattern", "blocks in turn, e.g. [dense, moe]"),
    "repeat": ("an integer", "1", f"how many times the group repeats (>= 1; at most {MAX_LAYERS} layers in all)"),
    "override": ("a mapping 'sublayer.field: value'", "none", "changes fields of the block's sublayers in this group"),
}
SUBLAYER_COMMON = {
    "name": ("an identifier", "the kind", "names the sublayer (unique in its block); overrides address it"),
    "norm": ("rms, layer, none or a norm mapping", "the model's norm", "the pre-norm of this sublayer"),
    "parallel": ("true or false", "false", "reads the stream the previous sublayer read and adds beside it"),
    "deliver_after": ("an integer", "0", "adds its output that many layers later (>= 0; UltraMem's skip-layer)"),
}


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
        return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return "required"


def _bound(meta: dict) -> str:
    low = meta.get("min")
    if low is None:
        return ""
    return f"{'>' if meta.get('exclusive') else '>='} {low:g}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def dataclass_table(cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines = [_row(["field", "type", "default", "constraint", "meaning"]), "|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        lines.append(_row([f"`{f.name}`", type_name(hints[f.name]), _default(f), _bound(meta), meta.get("doc", "")]))
    return lines


def _docstring(cls: type) -> str:
    return " ".join(inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].split())


def sections() -> dict[str, list[str]]:
    """KIND -> its markdown lines; the order is the reference's."""
    out: dict[str, list[str]] = {}
    out["model"] = ["The top-level `model:` mapping.", "", _row(["field", "type", "default", "constraint", "meaning"]),
                    "|---|---|---|---|---|",
                    *(_row([f"`{k}`", *MODEL_TYPES[k], MODEL_FIELDS[k]]) for k in MODEL_FIELDS)]
    out["layers"] = ["Each entry of `model.layers` (a layer group).", "",
                     _row(["field", "type", "default", "meaning"]), "|---|---|---|---|",
                     *(_row([f"`{k}`", *GROUP_DOCS[k]]) for k in GROUP_KEYS)]
    out["sublayer"] = ["Fields every sublayer kind accepts beside its own (`- ffn: {hidden: 64, name: mlp}`).", "",
                       _row(["field", "type", "default", "meaning"]), "|---|---|---|---|",
                       *(_row([f"`{k}`", *v]) for k, v in SUBLAYER_COMMON.items())]
    for kind, cls in SUBLAYER_KINDS.items():
        out[kind] = [f"Sublayer `- {kind}: {{...}}`. {_docstring(cls)}", "", *dataclass_table(cls)]
    out["norm"] = [f"`norm:` / `final_norm:` as a mapping. {_docstring(NormSpec)}", "", *dataclass_table(NormSpec)]
    out["train"] = [f"The optional top-level `train:` mapping. {_docstring(TrainSpec)}", "", *dataclass_table(TrainSpec)]
    out["hardware"] = ["A hardware spec's `hardware:` mapping; also `peak_flops: {fp32: FLOP/s, bf16: ...}` "
                       "(fp32 required), the links `intra_node` and `inter_node` (see link) and, from `ultraplan "
                       "calibrate`, `collective_by_kind: {all_reduce: s, all_gather: s, reduce_scatter: s, "
                       "all_to_all: s}` (seconds per call beyond the link; a kind not listed: "
                       "`collective_overhead`) and `collective_by_group: {all_gather: {2: s, 4: s}, ...}` (the "
                       "same per group size, ranks in the call's group; a size not listed: the nearest one "
                       "listed, a kind not listed: its `collective_by_kind`) and `collective_wire_factor: "
                       "{all_gather: x, ...}` (each kind's seconds per wire byte against the link's; not "
                       "listed: 1) and `collective_drift: {2: x, 4: y}` (per group size, seconds per square "
                       "root of a second: a blocking call waits this times the square root of the compute "
                       "since its ranks last synced longer, `passes/sync_drift.py`; a size not listed: the "
                       "nearest listed; not given: no such term).", "",
                       *dataclass_table(_HardwareFields)]
    out["link"] = [f"`intra_node:` / `inter_node:` of a hardware spec. {_docstring(LinkSpec)}", "",
                   *dataclass_table(LinkSpec)]
    return out


def render(kind: str | None = None) -> str:
    """The whole reference (markdown), or the section of one ``kind``; KeyError for an unknown kind."""
    all_sections = sections()
    chosen: dict[str, Any] = all_sections if kind is None else {kind: all_sections[kind]}
    parts = [HEADER] if kind is None else []
    for name, lines in chosen.items():
        parts.append(f"## {name}\n\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)
