"""Escaping for emitted code: spec text only ever enters a program as a comment or a literal."""

from __future__ import annotations

import keyword
import re


def comment(text: str) -> str:
    """``text`` made safe for a ``#`` comment: one line, ASCII, every control character escaped."""
    return str(text).encode("unicode_escape").decode("ascii")


def literal(value: object) -> str:
    """A Python literal for a plain value (str, int, float, bool, None, or tuples of them)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return repr(value)
    if isinstance(value, (tuple, list)):
        inner = ", ".join(literal(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    raise TypeError(f"not a plain literal: {value!r}")


def layer_group(layer: str) -> str:
    """The heading a node is shown under: its module path, with a sublayer's pre-norm folded
    into the sublayer (``layers.0.attention.norm`` -> ``layers.0.attention``)."""
    return layer.removesuffix(".norm")


def fmt_bytes(value: float) -> str:
    """A byte count for a comment: ``4.10 kB``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def identifier(text: str) -> str:
    """A valid, non-keyword Python identifier derived from ``text``."""
    out = re.sub(r"\W", "_", str(text), flags=re.ASCII) or "_"
    if out[0].isdigit() or keyword.iskeyword(out):
        out = "_" + out
    return out
