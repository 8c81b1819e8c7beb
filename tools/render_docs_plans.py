"""Render the example drawings of docs/visualisation.md: one plan per strategy, drawn by ``viz``.

    .venv/bin/python tools/render_docs_plans.py          (needs graphviz's ``dot``)

Writes docs/plans/NAME.svg for each case below (dense-tiny on 2 devices for the 1-D strategies,
moe-tiny for ep, a 2x2 mesh for the 2-D pair) and prints each plan's step time and memory.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "plans"
# (file name, spec, mesh, strategy per axis)
CASES = [("dp", "dense-tiny", "2", "dp"), ("fsdp", "dense-tiny", "2", "fsdp"), ("tp", "dense-tiny", "2", "tp"),
         ("sp", "dense-tiny", "2", "sp"), ("ep", "moe-tiny", "2", "ep"), ("auto", "dense-tiny", "2", "auto"),
         ("fsdp-tp", "dense-tiny", "2x2", "fsdp,tp")]


def main() -> int:
    from ultraplan.backends.graphviz import plan_to_dot, render_svg
    from ultraplan.backends.plan_summary import headline

    from ultraplan import api

    OUT.mkdir(parents=True, exist_ok=True)
    for name, spec, mesh, strategy in CASES:
        plan = api.plan(spec, mesh, strategy=strategy)
        if not render_svg(plan_to_dot(plan), OUT / f"{name}.svg"):
            print("graphviz 'dot' is not installed (apt-get install graphviz)", file=sys.stderr)
            return 1
        print(f"docs/plans/{name}.svg  {headline(plan)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
