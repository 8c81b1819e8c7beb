"""From calibrate's raw measurements to a hardware spec's figures: pure functions, no torchrun.

``ultraplan/calibrate.py`` runs the measuring job (``calibrate_worker.py``) and the reference
program; this file fits what they measured: the links (``fit_link``, least squares on the ring
model ``passes/sbp.box`` prices), each kind's wire factor and in-place wait, the sync drift
(``drift_fit``), the matmul peak. calibrate.py's docstring says what each figure is for.
"""

from __future__ import annotations

import math
import statistics

import sympy
import torch

from ultraplan.compiler.schema import HardwareSpec
from ultraplan.passes.sbp import Broadcast, PartialSum, Split, box

# each kind's (source, destination) SBP on the axis, and the logical bytes box() sizes it by from the
# payload handed over (an all_gather's and an all_to_all's payload is one shard of n)
PAIRS = {"all_reduce": (PartialSum(), Broadcast(), 1), "all_gather": (Split(0), Broadcast(), None),
         "reduce_scatter": (PartialSum(), Split(0), 1), "all_to_all": (Split(0), Split(1), None)}


def ring_terms(kind: str, n: int, payload: float) -> tuple[float, float]:
    """(messages, wire bytes per device) of one collective as the cost model prices it (sbp.box)."""
    src, dst, scale = PAIRS[kind]
    nbytes = payload * (scale or n)
    step = box(src, dst, axis=0, nbytes=sympy.Float(nbytes), n=sympy.Integer(n))
    return float(step.messages), float(step.wire)


def fit_link(rows: list[dict]) -> dict:
    """Least-squares (latency, 1 / bandwidth) of ``seconds = messages * latency + wire / bandwidth``
    over ``rows``, each row weighted by 1 / seconds (relative errors: small and large messages count
    alike). A negative coefficient (noise on a link whose one term is negligible) is refitted at zero.
    Returns latency, bandwidth, and the median relative error of the fit."""
    terms = [ring_terms(r["kind"], r["n"], r["payload_bytes"]) for r in rows]
    a = torch.tensor([[m / r["seconds"], w / r["seconds"]] for (m, w), r in zip(terms, rows)], dtype=torch.float64)
    y = torch.ones(len(rows), dtype=torch.float64)
    lat, inv_bw = torch.linalg.lstsq(a, y.unsqueeze(1)).solution.squeeze(1).tolist()
    if lat < 0:
        lat, inv_bw = 0.0, float((a[:, 1] @ y) / (a[:, 1] @ a[:, 1]))
    elif inv_bw <= 0:
        lat, inv_bw = float((a[:, 0] @ y) / (a[:, 0] @ a[:, 0])), 0.0
    inv_bw = max(inv_bw, 1e-15)  # a link too fast to see still has a finite bandwidth in the spec
    errors = [abs(m * lat + w * inv_bw - r["seconds"]) / r["seconds"] for (m, w), r in zip(terms, rows)]
    return {"latency": lat, "bandwidth": 1 / inv_bw, "median_rel_error": statistics.median(errors)}


def summarise(raw: dict, links_from: HardwareSpec | None = None) -> dict:
    """The spec's figures from the worker's measurements (medians over ranks); a one-rank measure (no
    collectives) takes its link from ``links_from``."""
    peak = peak_flops(raw["matmul"])
    rows = [r for r in raw["collectives"] if not r.get("in_place")]
    per_size = {n: fit_link([r for r in rows if r["n"] == n]) for n in sorted({r["n"] for r in rows})}
    if rows:
        link = fit_link(rows)
        link["wire_factor"] = wire_factors(link, rows)
    else:
        kept = links_from.intra_node
        link = {"latency": kept.latency, "bandwidth": kept.bandwidth, "median_rel_error": float("nan"),
                "wire_factor": {}, "kept_from": links_from.name,
                "inter_node": {"latency": links_from.inter_node.latency, "bandwidth": links_from.inter_node.bandwidth}}
    beyond: dict[str, dict[int, list[float]]] = {}  # kind -> group size -> seconds beyond the link, per size
    for r in raw["collectives"]:
        if r.get("in_place"):
            beyond.setdefault(r["kind"], {}).setdefault(r["n"], []).append(max(r["seconds"] - in_link(link, r), 0.0))
    by_kind = {kind: statistics.median(v for vs in by_n.values() for v in vs) for kind, by_n in beyond.items()}
    by_group = {kind: {n: statistics.median(vs) for n, vs in sorted(by_n.items())} for kind, by_n in beyond.items()}
    return {"collective_overhead": statistics.median(by_kind.values()) if by_kind else 0.0,
            "collective_drift": drift_fit(raw.get("drift", [])),
            "collective_by_kind": by_kind, "collective_by_group": by_group, "collective_beyond": beyond,
            "drift_rows": raw.get("drift", []),
            "collective_wire_factor": link["wire_factor"],
            "host_cores": raw.get("host_cores", 0),
            "loop_pass": statistics.median(raw.get("loop_pass", [0.0])),
            "peak_flops": peak, "memory_bandwidth": statistics.median(raw["copy"]),
            "op_overhead": statistics.median(raw["op_overhead"]),
            "optimizer_tensor": statistics.median(raw["optimizer"]["tensor"]),
            "optimizer_element": statistics.median(raw["optimizer"]["element"]),
            "link": link, "link_by_group_size": per_size,
            "wire_fit_error": statistics.median(abs(in_link(link, r) - r["seconds"]) / r["seconds"] for r in rows)
            if rows else float("nan")}


def drift_fit(rows: list[dict]) -> dict[int, float]:
    """``collective_drift`` per group size from ``drift_rows``: the least-squares slope, through the
    shortest chain's point, of what a call adds against the square root of the chain's seconds
    (passes/sync_drift.py: ``drift * sqrt(busy)``), at least 0 (noise on a quiet host). The longest
    chain weighs most: its difference stands furthest above the noise of a call's figure."""
    out = {}
    for n in sorted({r["n"] for r in rows}):
        mine = sorted((r for r in rows if r["n"] == n), key=lambda r: r["busy_s"])
        base = mine[0]
        steps = [(math.sqrt(r["busy_s"]) - math.sqrt(base["busy_s"]), r["added_s"] - base["added_s"]) for r in mine[1:]]
        square = sum(x * x for x, _ in steps)
        if square > 0:
            out[n] = max(0.0, sum(x * y for x, y in steps) / square)
    return out


def wire_factors(link: dict, rows: list[dict]) -> dict[str, float]:
    """Each kind's seconds per wire byte against the joint fit's ``link``: the least-squares scale s of
    its rows' bandwidth term in ``seconds = messages * latency + s * wire / bandwidth``, relative errors
    weighted alike (as ``fit_link``). On gloo over loopback an all_gather or a reduce_scatter moves a
    byte about 3 times slower than an all_reduce (torch's ProcessGroupGloo stages them through
    per-rank lists), which one link fits to half of each."""
    out = {}
    for kind in sorted({r["kind"] for r in rows}):
        mine = [r for r in rows if r["kind"] == kind]
        terms = [ring_terms(kind, r["n"], r["payload_bytes"]) for r in mine]
        a = [w / link["bandwidth"] / r["seconds"] for (_, w), r in zip(terms, mine)]
        y = [(r["seconds"] - m * link["latency"]) / r["seconds"] for (m, _), r in zip(terms, mine)]
        out[kind] = max(0.05, sum(p * q for p, q in zip(a, y)) / sum(p * p for p in a)) if any(a) else 1.0
    return out


def in_link(link: dict, row: dict) -> float:
    """Seconds the link's formula gives one measured collective (``row``), its wire at the kind's factor."""
    messages, wire = ring_terms(row["kind"], row["n"], row["payload_bytes"])
    factor = link.get("wire_factor", {}).get(row["kind"], 1.0)
    return messages * link["latency"] + factor * wire / link["bandwidth"]


def peak_flops(matmul: dict) -> dict[str, float]:
    """The spec's ``peak_flops`` from the worker's matmul rates: per dtype, the largest size's median."""
    out = {}
    for dtype, by_size in matmul.items():
        largest = max(by_size, key=int)  # the largest product: the least overhead per FLOP
        out[{"float32": "fp32", "bfloat16": "bf16"}[dtype]] = statistics.median(by_size[largest])
    return out
