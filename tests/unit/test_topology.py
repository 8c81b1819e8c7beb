"""Mesh axes priced by where their ranks sit: ranks row-major (the last axis fastest), an axis at
NVLink speed when each of its groups lies on one node (PlanContext.axis_link)."""

from __future__ import annotations

import pytest
from ultraplan.passes.context import Mesh
from ultraplan.passes.pipeline import make_context

from ultraplan import api

INTRA, INTER = "intra", "inter"


def links(hardware: str, mesh: str) -> tuple[str, ...]:
    hw = api.load_hardware(hardware)
    m = Mesh.parse(mesh)
    ctx = make_context(api.load("dense-tiny"), hw, m, batch=16)
    return tuple(INTRA if ctx.axis_link(a) == hw.intra_node else INTER for a in range(len(m.shape)))


@pytest.mark.parametrize(("hardware", "mesh", "expected"), [
    ("h200-8", "2x4", (INTRA, INTRA)),  # one node: every group inside it
    ("h200-8", "4x2", (INTRA, INTRA)),
    ("h200-8", "8", (INTRA,)),
    ("h200-2x8", "2x4", (INTRA, INTRA)),  # 8 ranks fill node 0 of two
    ("h200-2x8", "4x2", (INTRA, INTRA)),
    ("h200-2x8", "2x8", (INTER, INTRA)),  # axis 1: ranks 8i..8i+7, one node; axis 0: {r, r+8}
    ("h200-2x8", "8x2", (INTER, INTRA)),  # axis 1: {2i, 2i+1}; axis 0: stride 2 over 16 ranks
    ("h200-2x8", "4x4", (INTER, INTRA)),  # axis 0: {r, r+4, r+8, r+12} spans both nodes
    ("h200-2x8", "16", (INTER,)),
    ("h200-2x8", "2x2x4", (INTER, INTRA, INTRA)),
])
def test_axis_links(hardware, mesh, expected):
    assert links(hardware, mesh) == expected


def test_values_and_comm_time_follow_the_links():
    hw = api.load_hardware("h200-8")
    ctx = make_context(api.load("dense-tiny"), hw, Mesh.parse("2x4"), batch=16)
    values = {str(k): v for k, v in ctx.values().items()}
    assert values["bw0"] == values["bw1"] == hw.intra_node.bandwidth
    assert values["lat0"] == values["lat1"] == hw.intra_node.latency
    one_node = api.plan("dense-tiny", "2x4", hardware="h200-8", batch=16)
    first_node = api.plan("dense-tiny", "2x4", hardware="h200-2x8", batch=16)
    assert one_node.total("comm_time").value == pytest.approx(first_node.total("comm_time").value)
    spread = api.plan("dense-tiny", "2x8", hardware="h200-2x8", batch=16)
    assert spread.total("comm_time").value > one_node.total("comm_time").value
