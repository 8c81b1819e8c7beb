"""What a spec file may contain before it is composed: a size cap, a nesting cap and no tags.

Why a pre-scan of PyYAML's event stream: the composer and our builder recurse once per nesting
level, so a document nested a few hundred levels deep would end in a ``RecursionError`` with no
position; the event parser is a state machine and walks any depth in constant stack. The same
scan sees every explicit tag (``!!python/object``, ``!!set``, ``!foo``) with its position, so a
spec that asks for a constructor is refused at its line before anything is built. A path that
never ends (``/dev/zero``, a pipe) is read only up to ``MAX_SPEC_BYTES``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import SpecError

MAX_SPEC_BYTES = 4 * 2**20  # the largest bundled spec is ~3 KB; a spec past 4 MiB is not a hand-written spec
MAX_DEPTH = 32  # a spec nests 6 levels (model.blocks.NAME[i].kind.field); 32 leaves room for any flow style
CORE_TAGS = frozenset(f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "map", "seq"))


def read_capped(source: str | Path, limit: int = MAX_SPEC_BYTES) -> str:
    """The UTF-8 text of ``source``, refusing files (or endless devices) larger than ``limit`` bytes."""
    name = str(source)
    try:
        with open(source, "rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise SpecError("file not found", file=name, line=1, column=1,
                        hint="check the path; bundled specs live in specs/models/ and specs/hardware/") from None
    except OSError as exc:
        raise SpecError(f"cannot read file: {exc.strerror or exc}", file=name, line=1, column=1) from None
    check_size(name, len(data), limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SpecError(f"not UTF-8 text (byte 0x{data[exc.start]:02x})", file=name, line=line, column=column,
                        hint="save the spec as UTF-8") from None


def check_size(name: str, size: int, limit: int = MAX_SPEC_BYTES) -> None:
    if size > limit:
        raise SpecError(f"more than {limit:,} bytes: not a spec (is it a device or a data file?)", file=name,
                        line=1, column=1, hint=f"a spec is a page of YAML; the limit is {limit // 2**20} MiB")


def scan_events(name: str, text: str) -> None:
    """Refuse nesting deeper than ``MAX_DEPTH`` and any explicit non-core tag, at its position.
    YAML syntax errors are left to the composer, which reports them the same way."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line, column = event.start_mark.line + 1, event.start_mark.column + 1
        tag = getattr(event, "tag", None)
        if tag is not None and tag not in CORE_TAGS and not (isinstance(event, yaml.ScalarEvent) and tag == "!"):
            shown = tag.replace("tag:yaml.org,2002:", "!!")
            raise SpecError(f"YAML tag {shown!r} is not allowed", file=name, line=line, column=column,
                            hint="specs take plain numbers, strings, lists and mappings; remove the '!' tag")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise SpecError(f"nested more than {MAX_DEPTH} levels deep", file=name, line=line, column=column,
                                hint="a spec nests about 6 levels (model.blocks.NAME[i].kind.field)")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
