"""Re-price a step_time bench's cases with each collective at its kind's calibrated figure.

    python bench/step_time_kinds.py st.json HW_DIR      # HW_DIR: the bench's --hardware-dir

For a run recorded when plans priced every collective call at the spec's one ``collective_overhead``
(session 10's, docs/cost-model.md); plans now price each call at its kind's figure. calibrate measures
each kind in place on every group size (the spec's ``collective_by_kind``, the median over group
sizes, and each group size's figures in its comment). For each case and round this plans the case
again with the round's spec (HW_DIR/this-machine-N-roundR.yaml) and prints two predictions beside the
bench's: ``by kind`` (each call at its kind's figure: the plan now, for these specs without
``collective_by_group``) and ``by kind at n`` (each call at its kind's figure measured on groups of the
program's size, all N ranks: the bench's programs have one mesh axis; what a plan now makes of a
spec calibrate writes since session 11, ``collective_by_group``). Nothing is fitted here: the
figures are calibrate's, the measured times the bench's.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

from ultraplan.passes.host_cost import collective_figure

from ultraplan import api

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import print_table

KIND_LINE = re.compile(r"group size: us at each size: (.*)\.$", re.M)


def figures_by_group_size(spec: Path) -> dict[str, dict[int, float]]:
    """kind -> group size -> seconds beyond the link (the median over the sizes timed), from the
    spec's comment (``calibrate.render_spec`` writes them there, in microseconds)."""
    out: dict[str, dict[int, float]] = {}
    for part in KIND_LINE.search(spec.read_text()).group(1).split("; "):
        kind, rest = part.split(" ", 1)
        for size, times in re.findall(r"(\d+): ([\d/]+)", rest):
            out.setdefault(kind, {})[int(size)] = statistics.median(float(t) for t in times.split("/")) * 1e-6
    return out


def reprice(case: dict, hw_dir: Path) -> tuple[float, float]:
    """(by kind, by kind at the program's group size): medians over the case's rounds."""
    by_kind, at_n = [], []
    for r in range(len(case["at_run"])):
        spec = hw_dir / f"this-machine-{case['nproc']}-round{r}.yaml"
        hardware = api.load_hardware(spec)
        plan = api.plan(case["spec"], str(case["nproc"]), hardware=str(spec), strategy=case["strategy"])
        step, calls = plan.total("step_time").value, Counter(c.collective for c in plan.collectives)
        by_kind.append(step)
        figures = figures_by_group_size(spec)
        at_n.append(step + sum(count * (figures[kind][case["nproc"]] - collective_figure(hardware, kind))
                               for kind, count in calls.items()))
    return statistics.median(by_kind), statistics.median(at_n)


def main(argv: list[str]) -> int:
    rows, hw_dir = json.loads(Path(argv[0]).read_text()), Path(argv[1])
    for case in rows:
        case["by_kind"], case["by_kind_at_n"] = reprice(case, hw_dir)
    columns = [("predicted", "at run"), ("by_kind", "by kind"), ("by_kind_at_n", "by kind at n")]
    print_table(rows, columns)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
