"""Where a SPEC or HW argument points: a file as given, or a bundled spec by name.

Kept apart from api.py (which imports the planner and torch) so that the CLI can find and
validate a spec, and report its mistakes, without importing torch.
"""

from __future__ import annotations

import glob
from importlib import resources
from pathlib import Path


def bundled(kind: str, name: str) -> Path:
    """Path of a bundled spec, e.g. ``bundled("hardware", "cpu")``."""
    return Path(str(resources.files("ultraplan.specs") / kind / f"{name}.yaml"))


def resolve_spec_path(text: str | Path, kind: str) -> Path:
    """A file path as given, or the name of a bundled spec (``dense-tiny``, ``h200-8``, ``olmoe-1b-7b``
    from specs/models/paper/)."""
    path = Path(text)
    if path.is_file() or (not path.exists() and path.suffix in (".yaml", ".yml")):
        return path
    candidate = bundled(kind, str(text))
    if candidate.exists():
        return candidate
    if len(path.parts) > 1:
        return path
    nested = sorted(candidate.parent.glob(f"*/{glob.escape(candidate.name)}"))  # a bare name: models/paper/olmoe-1b-7b.yaml
    return nested[0] if len(nested) == 1 else path
