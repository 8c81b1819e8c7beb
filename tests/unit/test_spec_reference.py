"""docs/spec-reference.md is the schema, printed: stale when the schema changes (`make docs`)."""

from __future__ import annotations

import dataclasses

from ultraplan.compiler.reference import render, sections
from ultraplan.compiler.schema import SUBLAYER_KINDS

from tests.conftest import ROOT
from ultraplan.cli import main


def test_reference_is_up_to_date():
    assert (ROOT / "docs" / "spec-reference.md").read_text(encoding="utf-8") == render(), \
        "docs/spec-reference.md is stale: run `make docs` (tools/gen_spec_reference.py)"


def test_every_kind_and_field_is_documented():
    text = render()
    for kind, cls in SUBLAYER_KINDS.items():
        assert f"## {kind}\n" in text
        section = "\n".join(sections()[kind])
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in section and f.metadata.get("doc"), (kind, f.name)


def test_fields_command(capsys):
    assert main(["fields", "ffn"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## ffn") and "`multiple_of`" in out
    assert main(["fields", "atention"]) == 2
    assert "did you mean 'attention'" in capsys.readouterr().err
