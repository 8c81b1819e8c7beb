"""User-facing spec errors that name the file, line, column and field path.

Why a dedicated type: the CLI turns a ``SpecError`` into one readable message and exit code 2,
never a traceback; everything else that goes wrong is our bug and may show a traceback.
"""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PathEntry = str | int


def printable(text: str) -> str:
    """``text`` with control and format characters escaped (``\\x1b``, ``\\u202e``): a name in a spec
    must not move the cursor, recolour the terminal or reorder the line of the error that quotes it."""
    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in UNPRINTABLE else ch
                   for ch in str(text))


UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def format_path(path: Sequence[PathEntry]) -> str:
    """``("model", "blocks", "dense", 1, "ffn")`` -> ``model.blocks.dense[1].ffn``."""
    out = ""
    for entry in path:
        if isinstance(entry, int):
            out += f"[{entry}]"
        else:
            out += ("." if out else "") + str(entry)
    return out or "<document>"


def nearest(word: str, choices: Iterable[str]) -> str | None:
    """The closest valid spelling of ``word``, for 'did you mean' hints."""
    by_lower = {str(c).lower(): c for c in choices}
    found = difflib.get_close_matches(str(word).lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[found[0]] if found else None


class SpecError(Exception):
    """A problem in a spec file that the user can fix."""

    def __init__(
        self,
        message: str,
        *,
        file: str,
        line: int,
        column: int,
        path: Sequence[PathEntry] = (),
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.column = column
        self.path = tuple(path)
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{printable(self.file)}:{self.line}:{self.column}: {printable(format_path(self.path))}: " \
               f"{printable(self.message)}"
        if self.hint:
            text += f"\n  hint: {printable(self.hint)}"
        return text


class SpecErrors(SpecError):
    """Every problem one read of a spec found, in the order it was read; behaves as the first for callers that
    look at one (``.line``, ``.message``), and prints them all."""

    def __init__(self, errors: Sequence[SpecError]) -> None:
        flat: list[SpecError] = []
        for error in errors:
            flat.extend(error.errors if isinstance(error, SpecErrors) else [error])
        unique = {str(e): e for e in flat}  # a block read by two layer groups reports its mistake once
        self.errors = list(unique.values())  # reading order: fields before the absences they explain
        first = self.errors[0]
        super().__init__(first.message, file=first.file, line=first.line, column=first.column, path=first.path,
                         hint=first.hint)

    def __str__(self) -> str:
        text = "\n".join(SpecError.__str__(e) for e in self.errors)
        return text + (f"\n({len(self.errors)} errors)" if len(self.errors) > 1 else "")


def raise_all(errors: Sequence[SpecError]) -> None:
    """Raise the collected ``errors``: the one, or a ``SpecErrors`` of several; nothing when empty."""
    if len(errors) == 1 and not isinstance(errors[0], SpecErrors):
        raise errors[0]
    if errors:
        raise SpecErrors(errors)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a spec value was written, kept on the spec so that a later stage (a spec pass that finds
    the value unworkable) can still blame the file, line, column and field, not raise a traceback."""

    file: str
    path: tuple[PathEntry, ...]
    line: int
    column: int

    def error(self, message: str, *, hint: str | None = None) -> SpecError:
        return SpecError(message, file=self.file, line=self.line, column=self.column, path=self.path, hint=hint)

    @property
    def from_override(self) -> bool:
        """Set by a layer group's ``override`` (model.layers[i].override...) rather than in its block."""
        return self.path[:2] == ("model", "layers")


def blame(origins: Iterable[Origin | None]) -> Origin | None:
    """Which of the values behind a conflict to point at: one a layer group's override wrote (the
    block may be fine in its other groups), else the first."""
    known = [o for o in origins if o is not None]
    return next((o for o in known if o.from_override), known[0] if known else None)
