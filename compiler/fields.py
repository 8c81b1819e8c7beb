"""Read typed fields of a frozen dataclass out of positioned YAML data, with helpful errors.

A value travels with the path it came from (``Sourced``), so that a field set by a layer-group
``override`` is blamed at the override, not at the block it changed.
"""

from __future__ import annotations

import dataclasses
import keyword
import math
import re
import types
import typing
from typing import Any, Literal, NamedTuple, get_args, get_origin

from .errors import PathEntry, SpecError, nearest, raise_all
from .yaml_source import Document


def doc(text: str, *, minimum: float | None = None, exclusive: bool = False) -> dict:
    """Metadata for a spec field: its help text and an optional lower bound."""
    return {"doc": text, "min": minimum, "exclusive": exclusive}


INT64_MAX = 2**63 - 1


class Sourced(NamedTuple):
    value: Any
    path: tuple[PathEntry, ...]


def sourced_mapping(raw: dict, path: tuple[PathEntry, ...]) -> dict[str, Sourced]:
    return {key: Sourced(value, (*path, key)) for key, value in raw.items()}


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp) if a is not type(None))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def coerce(doc: Document, item: Sourced, tp: Any) -> Any:
    """Check ``item.value`` against the annotation ``tp`` and return it in that type."""
    value, path = item
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        guess = nearest(str(value), [str(c) for c in choices])
        raise doc.error(path, f"expected {type_name(tp)}, got {value!r}",
                        hint=f"did you mean {guess!r}?" if guess else None)
    if origin in (typing.Union, types.UnionType):
        alternatives = get_args(tp)
        if value is None and type(None) in alternatives:
            return None
        inner = [a for a in alternatives if a is not type(None)]
        if len(inner) == 1:
            return coerce(doc, item, inner[0])
        errors = []
        for alternative in inner:  # e.g. int | Literal["auto"]: the first that accepts the value
            try:
                return coerce(doc, item, alternative)
            except SpecError as exc:
                errors.append(exc)
        specific = [e for e in errors if not e.message.startswith("expected")]  # right type, bad value
        if specific:
            raise specific[0]
        hints = [e.hint for e in errors if e.hint]
        raise doc.error(path, f"expected {type_name(tp)}, got {value!r}", hint=hints[0] if hints else None)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise doc.error(path, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > INT64_MAX:  # no size or count here is that large, and torch could not take it
                raise doc.error(path, f"{item.value!r} is too large (more than 2^63 - 1)")
            return value
        raise doc.error(path, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads '1e-5' (no dot) as a string; accept it as the number it obviously is.
            try:
                out = float(value)
            except ValueError:
                raise doc.error(path, f"expected a number, got {value!r}") from None
        else:
            raise doc.error(path, f"expected a number, got {value!r}")
        if not math.isfinite(out):
            raise doc.error(path, f"expected a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        raise doc.error(path, f"expected a string, got {value!r}")
    raise TypeError(f"unsupported field type {tp!r}")  # programmer error


def check_bounds(doc: Document, item: Sourced, value: Any, meta: dict) -> None:
    low = meta.get("min")
    if low is None or not isinstance(value, (int, float)):  # None, or a word such as 'auto'
        return
    if meta.get("exclusive") and not value > low:
        raise doc.error(item.path, f"must be greater than {low:g}, got {value!r}")
    if not meta.get("exclusive") and not value >= low:
        raise doc.error(item.path, f"must be at least {low:g}, got {value!r}")


def read_dataclass(
    doc: Document,
    cls: type,
    items: dict[str, Sourced],
    path: tuple[PathEntry, ...],
    *,
    extra: dict[str, Any] | None = None,
    also: tuple[str, ...] = (),
) -> Any:
    """Build ``cls`` from ``items``; unknown keys, missing required keys and bad types are errors,
    all of them reported together.

    ``extra`` supplies fields that are not read from YAML (already resolved by the caller); ``also``
    names keys the caller has read itself (a sublayer's name, norm, ...), listed in hints as valid.
    """
    extra = extra or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in extra}
    errors: list[SpecError] = []
    misspelt: set[str] = set()  # fields an unknown key probably meant: their absence is the same mistake
    for key, item in items.items():
        if key not in fields:
            valid = [*fields, *also]
            guess = nearest(key, valid)
            misspelt.add(guess or "")
            errors.append(doc.error(item.path, f"unknown field '{key}'", key=True, hint=(
                f"did you mean '{guess}'? " if guess else "") + f"valid fields: {', '.join(valid)}"))
    kwargs = dict(extra)
    for name, f in fields.items():
        try:
            if name in items:
                value = coerce(doc, items[name], hints[name])
                check_bounds(doc, items[name], value, dict(f.metadata))
                kwargs[name] = value
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in misspelt:
                text = f.metadata.get("doc", "")
                raise doc.error(path, f"missing required field '{name}'" + (f" ({text})" if text else ""),
                                hint=f"add '{name}: ...' here")
        except SpecError as exc:
            errors.append(exc)
    raise_all(errors)
    return cls(**kwargs)


def expect_mapping(doc: Document, item: Sourced, what: str) -> dict:
    if not isinstance(item.value, dict):
        raise doc.error(item.path, f"{what} must be a mapping of 'key: value' lines, got {item.value!r}")
    return item.value


def expect_list(doc: Document, item: Sourced, what: str) -> list:
    if not isinstance(item.value, list):
        raise doc.error(item.path, f"{what} must be a list ('- ...' lines), got {item.value!r}")
    return item.value


IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_identifier(doc: Document, item: Sourced, what: str) -> str:
    value = item.value
    if not isinstance(value, str) or not IDENTIFIER.match(value) or keyword.iskeyword(value):
        raise doc.error(item.path, f"{what} must be a plain identifier (letters, digits, _), got {value!r}",
                        hint="names become Python identifiers in the emitted program; e.g. 'attn' or 'ffn_2'")
    return value


# A block is an nn.ModuleDict of its sublayers: their names must not shadow its own attributes. The
# public ones of torch 2.13's nn.ModuleDict are written out (names starting with _ are refused anyway)
# so that validation does not import torch; tests/unit/test_fast_cli.py checks the list against torch.
RESERVED_SUBLAYER_NAMES = frozenset("""
    T_destination add_module apply bfloat16 buffers call_super_init children clear compile cpu cuda double
    dump_patches eval extra_repr float forward get_buffer get_extra_state get_parameter get_submodule half
    ipu items keys load_state_dict modules mtia named_buffers named_children named_modules named_parameters
    parameters pop register_backward_hook register_buffer register_forward_hook register_forward_pre_hook
    register_full_backward_hook register_full_backward_pre_hook register_load_state_dict_post_hook
    register_load_state_dict_pre_hook register_module register_parameter register_state_dict_post_hook
    register_state_dict_pre_hook requires_grad_ set_extra_state set_submodule share_memory state_dict to
    to_empty train type update values xpu zero_grad
""".split()) | {"layer"}


def sublayer_name(doc: Document, item: Sourced, kind: str) -> str:
    """A sublayer's ``name`` (default: its kind), checked; overrides address sublayers by it."""
    body = item.value if isinstance(item.value, dict) else {}
    if "name" not in body:
        return kind
    name = check_identifier(doc, Sourced(body["name"], (*item.path, "name")), "a sublayer name")
    if name in RESERVED_SUBLAYER_NAMES or name.startswith("_"):
        raise doc.error((*item.path, "name"), f"sublayer name {name!r} is taken by the block's own attributes",
                        hint=f"choose another, e.g. '{name}_1'")
    return name
