"""Shared fixtures: the repo root, bundled spec paths, and a helper to write spec text to a file."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "specs" / "models"
HARDWARE = ROOT / "specs" / "hardware"
RUNNABLE_SPECS = ["dense-tiny", "dense-gqa-tied", "dense-deep-groups", "moe-tiny", "pkm-tiny", "peer-tiny",
                  "ultramem-tiny", "ultramem-v2-tiny", "memory-plus-tiny"]


@pytest.fixture
def write_spec(tmp_path):
    """Write YAML text to ``tmp_path/name`` and return the path."""

    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
