"""``ultraplan report DIR``: a run's loss curves and its measured against its predicted step time, as a PNG.

It reads what the program wrote (DIR/metrics.jsonl: one JSON line per step, backends/progress.py)
and the plan beside it (its modelled ``step_time``: compute at the hardware spec's peak FLOP/s plus
communication, no overlap; passes/build_plan.py). matplotlib is the ``examples`` extra; without it
the command says how to install it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ultraplan.api import read_plan


def read_metrics(path: Path) -> list[dict]:
    """The metrics file's records in order; a ValueError naming the line when one is not JSON."""
    if not path.is_file():
        raise ValueError(f"{path}: no metrics file; run the program first (`ultraplan run DIR`) or pass --metrics PATH")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            float(record["step"]), float(record["loss"]), float(record["step_s"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a metrics line with step, loss and step_s ({exc}); "
                             "rerun the program to rewrite the file") from None
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no steps recorded; run the program with --steps 1 or more")
    return records


def summary(records: list[dict], predicted_s: float) -> dict:
    """Figures the picture shows: final losses, the median measured step time (the first step,
    which includes start-up work, left out when there are others) and its ratio to the prediction."""
    timed = [r["step_s"] for r in records[1:]] or [records[0]["step_s"]]
    vals = [r for r in records if r.get("val_loss") is not None]
    measured = statistics.median(timed)
    return {"steps": len(records), "final_loss": records[-1]["loss"],
            "final_val_loss": vals[-1]["val_loss"] if vals else None,
            "step_time_measured_s": measured, "step_time_predicted_s": predicted_s,
            "measured_over_predicted": measured / predicted_s if predicted_s > 0 else None}


def draw(records: list[dict], plan, out: Path) -> None:
    """Two panels: train (and validation) loss by step; each step's measured seconds, their median
    and the plan's predicted step time."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("`ultraplan report` draws with matplotlib: pip install 'ultraplan[examples]' "
                         "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    facts = summary(records, plan.total("step_time").value)
    steps = [r["step"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(steps, [r["loss"] for r in records], label="train")
    vals = [r for r in records if r.get("val_loss") is not None]
    if vals:
        left.plot([r["step"] for r in vals], [r["val_loss"] for r in vals], "o-", label="validation")
    left.set(xlabel="step", ylabel="loss", title=f"{plan.spec_name}: loss")
    left.legend()
    right.plot(steps, [r["step_s"] * 1e3 for r in records], ".", label="measured, each step")
    right.axhline(facts["step_time_measured_s"] * 1e3, color="C0", linestyle="--",
                  label=f"measured median {facts['step_time_measured_s'] * 1e3:.3g} ms")
    right.axhline(facts["step_time_predicted_s"] * 1e3, color="C3",
                  label=f"plan ({plan.hardware}) {facts['step_time_predicted_s'] * 1e3:.3g} ms")
    right.set(xlabel="step", ylabel="ms per step", yscale="log",
              title=f"step time on mesh {'x'.join(map(str, plan.mesh))}, {plan.strategy}")
    right.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def report(out_dir: Path, output: Path | None = None, metrics: Path | None = None) -> dict:
    """Draw DIR's run into ``output`` (default DIR/report.png); return the summary and the path."""
    plan = read_plan(out_dir)
    records = read_metrics(metrics or out_dir / "metrics.jsonl")
    output = output or out_dir / "report.png"
    draw(records, plan, output)
    return {**summary(records, plan.total("step_time").value), "png": str(output)}
