"""Expert parallelism over several mesh axes (backends/expert_parallel.py, the op table's spanning
``expert_parallel`` variant): planned by --place and ep,ep, priced as one group spanning the axes on the
slowest of their links, and chosen by the search where it is cheapest. tests/dist/test_placement.py and
tests/dist/runtime_cases.py run it and count its bytes."""

from __future__ import annotations

import math

import pytest
from ultraplan.compiler.validate import load_hardware_spec
from ultraplan.passes.context import PlanError

from tests.conftest import MODELS, ROOT
from ultraplan import api


def placed(spec, mesh: str, place: str, **kw):
    return api.plan(spec, mesh, force=[place], **kw)


def _sbp(plan, name: str) -> str:
    return next(p.sbp for p in plan.params if p.name == name)


def _inside(plan, node: str) -> list:
    return [c for c in plan.collectives if c.node == node and c.reason.startswith("inside")]


def test_experts_route_over_both_mesh_axes(tmp_path):
    """Experts number-wise on both axes of 2x2 (--place number,number, or ep,ep) are split in quarters
    and routed in one all_to_all per step over the group of all four devices (expert_parallel.py): the
    call gets both axes, and each of its 6 collectives per layer is one call on a group of 4; one axis
    keeps ``axis=``. ep on both axes needs the experts to divide by 4."""
    for plan in (placed("moe-tiny", "2x2", "layers.*.moe.w_*=number,number"),
                 api.plan("moe-tiny", "2x2", strategy="ep,ep", batch=64)):
        assert _sbp(plan, "layers.1.moe.w_up") == "S(0),S(0)" and _sbp(plan, "layers.1.moe.w_down") == "S(0),S(0)"
        routed = plan.node("layers_1_moe_routed")
        assert routed.splits == ("expert_parallel", "expert_parallel") and dict(routed.local_attrs)["axes"] == (0, 1)
        inside = _inside(plan, "layers_1_moe_routed")
        assert len(inside) == 6 and all(c.group_size == 4 and "mesh axes 0, 1" in c.reason for c in inside)
    one = placed("moe-tiny", "2x2", "layers.*.moe.w_*=number,dim")
    assert _sbp(one, "layers.1.moe.w_up") == "S(0),S(1)" and dict(one.node("layers_1_moe_routed").local_attrs)["axis"] == 0
    six = tmp_path / "moe-six.yaml"
    six.write_text((MODELS / "moe-tiny.yaml").read_text().replace("experts: 16,", "experts: 6,"))
    assert _sbp(api.plan(six, "2x2", force=["layers.*.moe.w_*=number,number"]), "layers.1.moe.w_up") == "S(0),S(0)"
    with pytest.raises(PlanError, match=r"ep on mesh axes 0, 1 splits the experts .* over 4 devices, but there are 6"):
        api.plan(six, "2x2", strategy="ep,ep", batch=64)


def test_a_group_across_nodes_is_priced_on_the_slower_link():
    """On two nodes of 8 (h200-2x8, mesh 2x8) the group spanning both axes crosses nodes: its collectives
    take the inter-node link's latency and bandwidth, though the inner axis alone is intra-node."""
    hw = load_hardware_spec(ROOT / "specs" / "hardware" / "h200-2x8.yaml")
    plan = api.plan("moe-tiny", "2x8", hardware="h200-2x8", batch=16, force=["layers.*.moe.w_*=number,number"])
    for c in _inside(plan, "layers_1_moe_routed"):
        assert c.group_size == 16
        expected = 15 * hw.inter_node.latency + c.wire_bytes.value / hw.inter_node.bandwidth
        assert math.isclose(c.time.value, expected, rel_tol=1e-12), c


WIDE_MOE = ("experts: 16, topk: 4, hidden: 24,", "experts: 256, topk: 1, hidden: 64,")  # many small experts, top-1


def test_the_search_takes_expert_parallelism_on_both_axes_where_cheapest(tmp_path):
    """256 experts, top-1, batch 256 on 2x2 (cpu): the search routes the experts over both axes, cheaper
    than every placement with one axis (number,dim, number,replicate) or none (dim,dim); its objective is
    the plan's step time (it priced the one group of four as the plan does), and the plan's bytes inside
    the call are the runtime's count (expert_parallel_ffn's docstring; tests/dist/test_placement.py
    measures them): per layer A = 256 * 16 / 4 assignments per device, 8 n B of counts, 8 A B of ids and
    four row exchanges of A * 32 * 4 B."""
    spec = tmp_path / "moe-wide.yaml"
    text = (MODELS / "moe-tiny.yaml").read_text().replace(*WIDE_MOE)
    spec.write_text(text.replace("batch_size: 8", "batch_size: 256"))
    plan = api.plan(spec, "2x2", strategy="auto")
    routed = plan.node("layers_1_moe_routed")
    assert routed.splits == ("expert_parallel", "expert_parallel") and dict(routed.local_attrs)["axes"] == (0, 1)
    assert math.isclose(plan.total("search_objective").value, plan.total("step_time").value, rel_tol=1e-9)
    for place in ("number,dim", "number,replicate", "dim,dim"):
        forced = api.plan(spec, "2x2", strategy="auto", force=[f"layers.*.moe.w_*={place}"])
        assert forced.total("step_time").value > plan.total("step_time").value, place
    a = 256 * 16 // 4
    expected = [8 * 4, 8 * a] + [a * 32 * 4] * 4
    assert sorted(c.payload_bytes.value for c in _inside(plan, "layers_1_moe_routed")) == sorted(expected)
