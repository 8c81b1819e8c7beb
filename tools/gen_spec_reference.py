"""Regenerate docs/spec-reference.md from the schema (``make docs``); --check exits 1 when it is stale."""

from __future__ import annotations

import sys
from pathlib import Path

from ultraplan.compiler.reference import render

TARGET = Path(__file__).resolve().parent.parent / "docs" / "spec-reference.md"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        stale = not TARGET.exists() or TARGET.read_text(encoding="utf-8") != text
        if stale:
            print(f"{TARGET} is stale: run `make docs`", file=sys.stderr)
        return int(stale)
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
