"""The hardware spec ``ultraplan calibrate`` writes: its YAML, and the comment that says how, when and
where each figure was measured (ultraplan/calibrate.py measures them, calibrate_fit.py fits them)."""

from __future__ import annotations

import datetime
import os
import platform

import torch

# the program op_overhead is fitted on: small enough that op overhead is most of its step
REFERENCE = ("dense-tiny", "dp")


def device_memory(nproc: int) -> float:
    """Bytes one rank may use: a GPU's memory, else the host's memory shared by the ranks."""
    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / nproc


def render_spec(name: str, nproc: int, figures: dict, raw: dict, command: str) -> str:
    """The hardware spec's YAML, its comment saying how, when and where each figure was measured."""
    link = figures["link"]
    inter = link.get("inter_node", link)  # measured: one host, inter_node repeats intra_node
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    lines = [
        f"# {name}: this machine as measured by `{command}`",
        f"# on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()} "
        f"({os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}), torch {torch.__version__}.",
        f"# {nproc} ranks measured at once ({raw['threads_per_rank']} thread(s) each): one device here is one rank's",
        "# share of the machine; calibrate again for another rank count. Medians over repeats and ranks.",
        "# peak_flops: square matmuls (2 n^3 FLOPs, the largest size timed); memory_bandwidth: a tensor",
        "# copy (bytes read + written); optimizer_*: AdamW steps on many tiny and one large tensor;",
        "# op_overhead: per plan op, fitted on the reference program " + f"{REFERENCE[0]} {REFERENCE[1]} "
        + (f"({figures['reference_measured'] * 1e3:.1f} ms measured, {figures['reference_launches']:.0f} launches; "
           f"floor {figures['op_overhead_floor'] * 1e6:.1f} us, a tiny op's forward + backward)"
           if "reference_measured" in figures else "(not yet: a tiny op's forward + backward)") + ";",
        "# passes/host_cost.py says how each enters step_time.",
        *(_measured_links(figures) if "kept_from" not in link else [
            f"# links: not measured (one rank times no collective): intra_node and inter_node are {link['kept_from']}'s",
            "# (--links-from); collective_*: none timed (0)."]),
        "# host_cores: the cores the ranks share (affinity; 0: a GPU's rank runs on its device); the rates are",
        f"# one core's, timed by {min(nproc, figures['host_cores'] or nproc)} rank(s) at once; a plan of more ranks "
        "than cores shares them",
        "# out (oversub). loop_pass: one expert of the MoE's loop.",
        "hardware:",
        f"  name: {name}",
        f"  devices_per_node: {nproc}",
        "  nodes: 1",
        "  peak_flops: {" + ", ".join(f"{k}: {v:.4g}" for k, v in figures["peak_flops"].items()) + "}",
        f"  memory_bytes: {device_memory(nproc):.4g}",
        f"  memory_bandwidth: {figures['memory_bandwidth']:.4g}",
        f"  op_overhead: {figures['op_overhead']:.4g}",
        f"  optimizer_tensor: {figures['optimizer_tensor']:.4g}",
        f"  optimizer_element: {figures['optimizer_element']:.4g}",
        f"  collective_overhead: {figures['collective_overhead']:.4g}",
        f"  loop_pass: {figures['loop_pass']:.4g}",
        "  collective_by_kind: {" + ", ".join(f"{k}: {v:.4g}" for k, v in figures["collective_by_kind"].items()) + "}",
        "  collective_by_group: {" + ", ".join(
            f"{k}: {{" + ", ".join(f"{n}: {v:.4g}" for n, v in by_n.items()) + "}"
            for k, by_n in figures.get("collective_by_group", {}).items()) + "}",
        "  collective_wire_factor: {" + ", ".join(
            f"{k}: {v:.4g}" for k, v in figures.get("collective_wire_factor", {}).items()) + "}",
        *([("  collective_drift: {" + ", ".join(f"{n}: {v:.4g}" for n, v in figures["collective_drift"].items()) + "}")]
          if figures.get("collective_drift") else []),
        f"  host_cores: {figures['host_cores']}",
        f"  intra_node: {{bandwidth: {link['bandwidth']:.4g}, latency: {link['latency']:.4g}}}",
        f"  inter_node: {{bandwidth: {inter['bandwidth']:.4g}, latency: {inter['latency']:.4g}}}",
    ]
    return "\n".join(lines) + "\n"


def _measured_links(figures: dict) -> list[str]:
    """The spec comment's lines on the links and collectives a calibration of several ranks measured."""
    link = figures["link"]
    return [
        "# links: the fit of every collective timed to messages * latency + wire bytes / bandwidth",
        f"# (passes/sbp.py's ring model), median relative error {link['median_rel_error']:.0%}; by group size: "
        + "; ".join(f"{n}: {f['latency'] * 1e6:.0f} us, {f['bandwidth'] / 1e9:.2f} GB/s ({f['median_rel_error']:.0%})"
                    for n, f in figures["link_by_group_size"].items()) + ".",
        "# collective_by_kind: each kind timed in place (between tiny ops, no barrier) less the link's",
        "# formula, per call, the median over sizes and group sizes (collective_overhead: their median);",
        "# collective_by_group: the same per group size (a plan prices each call at its group's);",
        "# collective_wire_factor: each kind's seconds per wire byte against the link's (least squares on",
        "# its rows timed after a barrier, the link's latency kept); median relative error with them "
        + f"{figures.get('wire_fit_error', float('nan')):.0%}.",
        "# group size: us at each size: " + "; ".join(
            f"{kind} " + ", ".join(f"{n}: " + "/".join(f"{v * 1e6:.0f}" for v in vs) for n, vs in by_n.items())
            for kind, by_n in figures["collective_beyond"].items()) + ".",
        "# collective_drift: per group size, seconds per square root of a second: how much longer a 1 KiB",
        "# all_reduce waits after 400 and 1600 tiny ops than after 8, against the square root of the ops'",
        "# seconds (least squares; passes/sync_drift.py); ms added after ms of ops: " + "; ".join(
            f"{n}: " + ", ".join(f"{r['added_s'] * 1e3:.2f}/{r['busy_s'] * 1e3:.2f}" for r in figures["drift_rows"]
                                 if r["n"] == n) for n in figures.get("collective_drift", {})) + ".",
        "# One host: inter_node repeats intra_node (no axis of a plan for this machine crosses nodes).",
    ]
