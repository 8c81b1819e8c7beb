"""Where should a 120B model's value tables (or experts) live? The placements, priced by the plans.

    python bench/placement.py                        # the 120B UltraMemV2 and a 120B MoE, 8 / 8x8 / 128x8 H200s
    python bench/placement.py --tiny                 # ultramem-v2-tiny and moe-tiny on 2 and 2x2 (seconds)
    python bench/placement.py --plot docs/placement.png --markdown docs/placement-table.md

For each model and mesh, every placement of its value tables (UltraMemV2's values and pre-values) or
experts (the MoE's expert weights) is planned (``--place TABLE=number|dim|replicate``, the same word on
every mesh axis, and on a 2-D mesh number-wise across nodes with dimension-wise inside, ``number,dim``;
the rest of the model data-parallel): once in inference (one new token per sequence, ``--mode infer
--seq 1``) and once in training (the spec's batch and sequence). A plan's costs are sympy in the
batch B, so each is evaluated at inference batch 1, 64 and 4096 and at the training batch without
planning again. Per point: memory per device, bytes sent per token (all devices' wire bytes per step
divided by the tokens of the step), the modelled step time, and the chosen placement: the fastest
one whose memory fits the device (the cost model's choice among placements; ``--strategy auto``
makes it inside the search, with everything else). The plan at B = 1 is the plan made at a
divisible batch, evaluated at 1: the per-token model, not a program that runs a batch of one on
1024 devices.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

# An MoE of the 120B UltraMemV2's total size on its dense skeleton (hidden 2048, 24 blocks, 16 heads,
# vocabulary 50304, specs/models/paper/ultramem-v2-2.5b-120b-top256.yaml): 128 experts of SwiGLU width
# 6144 per layer (24 * 128 * 3 * 2048 * 6144 = 116B expert parameters), top-2, so about 2.4B activated
# per token, as the UltraMemV2's 2.5B. Constructed for this comparison, not a published model.
MOE_120B = """\
model:
  name: MoE-2.4B/120B (constructed)
  vocab_size: 50304
  hidden_size: 2048
  seq_len: 4096
  tie_embeddings: false
  norm: rms
  blocks:
    block:
      - attention: {heads: 16, rotary: true, rope_theta: 10000.0}
      - moe: {experts: 128, topk: 2, hidden: 6144, router: softmax}
  layers:
    - {block: block, repeat: 24}
train:
  batch_size: 1024
  lr: 4.0e-4
"""
PAPER = "specs/models/paper/ultramem-v2-2.5b-120b-top256.yaml"
# The paper spec as it is: its 3092^2 rows per table (2^4 * 597529) split over 64 or 1024 devices in
# torch.chunk's shares (uneven rows, passes/sbp.fits).
ULTRAMEM_120B = PAPER
FULL = {"models": {"UltraMemV2-120B": (ULTRAMEM_120B, "memory_tables.*"), "MoE-120B": (MOE_120B, "layers.*.moe.w_*")},
        "meshes": [("8", "h200-8"), ("8x8", "h200-128x8"), ("128x8", "h200-128x8")]}
TINY = {"models": {"ultramem-v2-tiny": ("ultramem-v2-tiny", "memory_tables.ring.*"),
                   "moe-tiny": ("moe-tiny", "layers.*.moe.w_*")},
        "meshes": [("2", "cpu"), ("2x2", "h200-2x8")]}
TABLE_BATCHES = (1, 64, 4096)  # inference batches in the table; the plot has every power of two to 4096
PLOT_BATCHES = tuple(2**i for i in range(13))


def placements(mesh: str) -> list[str]:
    axes = len(mesh.split("x"))
    words = [",".join([w] * axes) for w in ("number", "dim", "replicate")]
    return words + (["number,dim"] if axes == 2 else [])


def _spec_path(source: str, tmp: Path, model: str) -> str:
    if "\n" not in source:
        return source
    path = tmp / f"{model}.yaml"
    path.write_text(source)
    return str(path)


def plan_points(model: str, spec: str, glob: str, mesh: str, hardware: str, infer: tuple[int, ...]) -> list[dict]:
    """Every placement of one model on one mesh, at each inference batch and the training batch."""
    from ultraplan.compiler.shapes import B
    from ultraplan.passes.context import Mesh, PlanError
    from ultraplan.passes.pipeline import make_context
    from ultraplan.passes.placement_report import _expr
    from ultraplan.passes.symbols import evaluate

    from ultraplan import api

    devices = math.prod(int(n) for n in mesh.split("x"))
    spec_obj, hw = api.load(spec), api.load_hardware(hardware)
    rows = []
    for words in placements(mesh):
        for mode, batches in (("infer", infer), ("train", (None, *infer))):
            start = time.perf_counter()
            try:
                plan = api.plan(spec, mesh, hardware=hardware, mode=mode, force=[f"{glob}={words}"],
                                batch=devices if mode == "infer" else None, seq=1 if mode == "infer" else None)
            except PlanError as exc:
                rows += [{"model": model, "mesh": mesh, "placement": words, "mode": mode, "batch": b, "error": str(exc),
                          "planned": b is None or mode == "infer"} for b in batches]
                continue
            seconds = time.perf_counter() - start
            print(f"planned {model} on {mesh}, {words}, {mode}: {seconds:.1f} s", file=sys.stderr, flush=True)
            totals = dict(plan.totals)
            exprs = {k: _expr(totals[k].expr) for k in ("step_time", "memory_per_device", "comm_wire_bytes")}
            values = make_context(spec_obj, hw, Mesh.parse(mesh), batch=plan.batch, seq=plan.seq, mode=mode).values()
            for batch in batches:
                b = plan.batch if batch is None else batch
                if batch is not None and mode == "train" and b == plan.batch:
                    continue
                got = {k: evaluate(e, {**values, B: b}) for k, e in exprs.items()}
                rows.append({"model": model, "mesh": mesh, "placement": words, "mode": mode, "batch": b,
                             "planned": batch is None or mode == "infer",
                             "seq": plan.seq, "step_time": got["step_time"], "memory": got["memory_per_device"],
                             "fits": got["memory_per_device"] <= plan.device_memory,
                             "bytes_per_token": got["comm_wire_bytes"] * devices / (b * plan.seq),
                             "plan_seconds": seconds})
    return rows


def choose(rows: list[dict]) -> dict[tuple, str]:
    """(model, mesh, mode, batch) -> the fastest placement that fits ("none fits" when none does)."""
    best: dict[tuple, tuple[float, str]] = {}
    for r in rows:
        key = (r["model"], r["mesh"], r["mode"], r["batch"])
        best.setdefault(key, (math.inf, "none fits"))
        if "error" not in r and r["fits"] and r["step_time"] < best[key][0]:
            best[key] = (r["step_time"], r["placement"])
    return {k: v[1] for k, v in best.items()}


def markdown(rows: list[dict]) -> str:
    chosen = choose(rows)
    lines = ["| model | mesh | mode | batch | placement | memory/device (GB) | bytes/token | step time (s) | chosen |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if (r["mode"] == "infer" and r["batch"] not in TABLE_BATCHES) or not r.get("planned", True):
            continue
        key = (r["model"], r["mesh"], r["mode"], r["batch"])
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mesh']} | {r['mode']} | {r['batch']} | {r['placement']} | "
                         f"not possible | | | |")
            continue
        lines.append(f"| {r['model']} | {r['mesh']} | {r['mode']} | {r['batch']} | {r['placement']} | "
                     f"{r['memory'] / 1e9:.4g}{'' if r['fits'] else ' (no fit)'} | {r['bytes_per_token']:.4g} | "
                     f"{r['step_time']:.4g} | {'**yes**' if chosen[key] == r['placement'] else ''} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], models: list[str], mesh: str, path: str) -> None:
    """Bytes sent per token against the batch, one line per placement: one panel per model and mode
    (inference: one token per sequence; training: sequences of the spec's length), all from the same
    symbolic plans evaluated at every power of two. A symmetric-log axis shows replication's zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7.5), squeeze=False)
    colour = {p: f"C{i}" for i, p in enumerate(placements(mesh))}  # one colour per placement in every panel
    for col, model in enumerate(models):
        for row, mode in enumerate(("infer", "train")):
            ax = axes[row][col]
            for placement, curve in curves(rows, model, mesh, mode).items():
                ax.plot([b for b, _ in curve], [v for _, v in curve], marker=".", label=placement,
                        color=colour.get(placement))
            ax.set(xscale="log", xlabel=f"{'inference' if mode == 'infer' else 'training'} batch (sequences)",
                   ylabel="bytes sent per token (all devices)", title=f"{model}, {mode}, mesh {mesh}")
            top = max((v for c in curves(rows, model, mesh, mode).values() for _, v in c), default=1.0)
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_ylim(bottom=0, top=max(top, 1.0) * 5)
            ax.legend(fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def curves(rows: list[dict], model: str, mesh: str, mode: str) -> dict[str, list[tuple[int, float]]]:
    """Bytes per token at every batch per placement (``model`` on ``mesh`` in ``mode``)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in sorted((r for r in rows if "error" not in r), key=lambda r: r["batch"]):
        if r["model"] == model and r["mesh"] == mesh and r["mode"] == mode:
            out.setdefault(r["placement"], []).append((r["batch"], r["bytes_per_token"]))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny specs on 2 and 2x2 devices (a smoke run)")
    parser.add_argument("--markdown", default=None, help="write the table here")
    parser.add_argument("--plot", default=None, help="write the bytes-per-token plot (PNG) here")
    parser.add_argument("--models", default=None, help="comma separated: only these of the set's models")
    parser.add_argument("--meshes", default=None, help="comma separated: only these of the set's meshes")
    parser.add_argument("--save", default=None, help="also write the rows as JSON here")
    parser.add_argument("--load", default=None, help="comma separated JSON files of --save: table and plot from them")
    args = parser.parse_args(argv)
    setup = dict(TINY if args.tiny else FULL)
    if args.models:
        setup["models"] = {m: v for m, v in setup["models"].items() if m in args.models.split(",")}
    if args.meshes:
        setup["meshes"] = [(m, h) for m, h in setup["meshes"] if m in args.meshes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        specs = {m: (_spec_path(s, Path(tmp), m), g) for m, (s, g) in setup["models"].items()}
        if args.load:  # the runs of several processes (one per model, say), put together
            rows = [r for f in args.load.split(",") for r in json.loads(Path(f).read_text())]
            specs = {m: specs[m] for m in dict.fromkeys(r["model"] for r in rows)}
        for model, (spec, glob) in specs.items():
            for mesh, hardware in setup["meshes"] if not args.load else []:
                rows += plan_points(model, spec, glob, mesh, hardware, PLOT_BATCHES)
        if args.save:
            Path(args.save).write_text(json.dumps(rows))
        table = markdown(rows)
        print(table, end="")
        if args.markdown:
            Path(args.markdown).write_text(table)
        if args.plot:
            mesh, _ = setup["meshes"][len(setup["meshes"]) // 2]
            plot(rows, list(specs), mesh, args.plot)
            print(f"wrote {args.plot} (mesh {mesh})")
    return rows


if __name__ == "__main__":
    main()
