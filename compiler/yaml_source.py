"""Load YAML while remembering where every key and value came from.

We compose the document with PyYAML's *safe* loader (no tags that build Python objects, nothing
executed) and construct plain dicts, lists and scalars ourselves, recording the 1-based line and
column of each key and each value by path. Validation uses those positions to point at the exact
place to fix. Duplicate keys, which plain ``yaml.safe_load`` silently accepts, are an error here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import PathEntry, SpecError
from .yaml_guard import check_size, read_capped, scan_events

Position = tuple[int, int]


@dataclass
class Document:
    """A parsed YAML file: plain Python data plus the source position of each path."""

    file: str
    data: Any
    value_pos: dict[tuple[PathEntry, ...], Position] = field(default_factory=dict)
    key_pos: dict[tuple[PathEntry, ...], Position] = field(default_factory=dict)
    text: str = ""
    errors: list[SpecError] = field(default_factory=list)  # collected so that one run reports them all

    @contextmanager
    def collecting(self) -> Iterator[None]:
        """Run the body; a ``SpecError`` it raises is kept in ``errors`` and reading goes on after it
        (the caller leaves a fallback in place), so one run shows every mistake, not only the first."""
        try:
            yield
        except SpecError as exc:
            self.errors.append(exc)

    def where(self, path: tuple[PathEntry, ...], *, key: bool = False) -> Position:
        """Position of ``path`` (its key if ``key``), falling back to the nearest enclosing path."""
        table = self.key_pos if key else self.value_pos
        probe = tuple(path)
        while probe:
            if probe in table:
                return table[probe]
            if probe in self.value_pos:
                return self.value_pos[probe]
            probe = probe[:-1]
        return self.value_pos.get((), (1, 1))

    def error(
        self, path: tuple[PathEntry, ...], message: str, *, hint: str | None = None, key: bool = False
    ) -> SpecError:
        line, column = self.where(path, key=key)
        return SpecError(message, file=self.file, line=line, column=column, path=path, hint=hint)


def _mark(node: yaml.Node) -> Position:
    return node.start_mark.line + 1, node.start_mark.column + 1


class _Builder:
    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.constructor = yaml.constructor.SafeConstructor()
        self.seen: set[int] = set()  # collection nodes already built: a second visit is an alias

    def build(self, node: yaml.Node, path: tuple[PathEntry, ...]) -> Any:
        self.doc.value_pos[path] = _mark(node)
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            if id(node) in self.seen:  # '*name' of an '&name' mapping or list: may recurse or explode
                raise self.doc.error(path, "YAML anchors and aliases (&name / *name) of mappings and lists are "
                                     "not supported", hint="write the value out in full", key=True)
            self.seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise self.doc.error(path, "mapping keys must be plain names")
                key = str(self.constructor.construct_object(key_node))
                child = (*path, key)
                if key in out:
                    first = self.doc.key_pos[child]
                    line, col = _mark(key_node)
                    raise SpecError(
                        f"duplicate key '{key}' (first given at line {first[0]})",
                        file=self.doc.file, line=line, column=col, path=child,
                        hint="remove one of the two entries",
                    )
                self.doc.key_pos[child] = _mark(key_node)
                out[key] = self.build(value_node, child)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        if node.tag in SEXAGESIMAL_TAGS and ":" in node.value:  # YAML 1.1 reads 1:20 as 80
            raise self.doc.error(path, f"{node.value!r} is a base-60 number in YAML 1.1 (1:20 reads as 80)",
                                 hint="write the number out, or quote it if you meant text")
        return self.constructor.construct_object(node)


SEXAGESIMAL_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


def load_document(source: str | Path, text: str | None = None) -> Document:
    """Parse ``source`` (a path; ``text`` overrides reading it) into a positioned ``Document``."""
    name = str(source)
    if text is None:
        text = read_capped(source)
    else:
        check_size(name, len(text.encode("utf-8", "surrogatepass")))
    doc = Document(file=name, data=None, text=text)
    try:
        scan_events(name, text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise SpecError(f"invalid YAML: {exc.problem or exc}", file=name, line=line, column=col,
                        hint="check indentation and that every 'key: value' has a space after the colon") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"invalid YAML: {exc}", file=name, line=1, column=1) from None
    if node is None:
        raise SpecError("the file is empty", file=name, line=1, column=1)
    try:
        doc.data = _Builder(doc).build(node, ())
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise SpecError(f"unsupported YAML value: {exc.problem}", file=name, line=line, column=col,
                        hint="specs take plain numbers, strings, lists and mappings only") from None
    return doc
