"""bench/collective_waits.py's report: per call medians and means, the tail, who waited, per-step sums."""

from __future__ import annotations

import json
import runpy

from tests.conftest import ROOT


def test_report_separates_a_calls_median_from_its_mean(tmp_path, capsys):
    bench = runpy.run_path(str(ROOT / "bench" / "collective_waits.py"))
    ms = 1e-3
    # 7 steps, the first 2 warm-up: a blocking all_reduce (rank 0 waits 9 ms once, rank 1 never) and an
    # asynchronous bucket launch; the warm-up steps' 50 ms calls must not count
    rank0 = [[["all_reduce", 2 * ms, 50 * ms, False], ["all_reduce", 5 * ms, 0.1 * ms, True]]] * 2
    rank0 += [[["all_reduce", 2 * ms, t * ms, False], ["all_reduce", 5 * ms, 0.1 * ms, True]] for t in (1, 1, 9, 1, 1)]
    rank1 = [[["all_reduce", 2 * ms, 1 * ms, False], ["all_reduce", 5 * ms, 0.1 * ms, True]]] * 7
    (tmp_path / "rank0.json").write_text(json.dumps(rank0))
    (tmp_path / "rank1.json").write_text(json.dumps(rank1))
    (tmp_path / "plan.json").write_text(json.dumps({"hardware": "hw", "totals": [["comm_time", {"value": 0.004}]],
                                                   "collectives": [{}, {}]}))
    bench["report"](tmp_path, tmp_path, 2)
    out = capsys.readouterr().out
    assert "2 ranks, 5 steps after 2 of warm-up, 2 collectives a step" in out
    call0 = next(line for line in out.splitlines() if line.startswith("   0  all_reduce "))
    assert "1.00 /   2.60" in call0 and "1.00 /   1.00" in call0  # rank 0's median and mean, rank 1's
    assert "(async)" in next(line for line in out.splitlines() if line.startswith("   1  "))
    # the blocking calls of both ranks: nine of 1 ms and one of 9 ms
    assert "p50 1.00 ms, p75 1.00, p90 9.00, max 9.00, mean 1.80" in out
    # long: over 3 x the 1 ms median, so rank 0's 9 ms call alone
    assert "calls over 3.00 ms (3 x the median): on every rank 0 of 5 (the collective slow), on some 1" in out
    assert "rank 0: blocking collectives a step: median 1.00 ms, mean 2.60" in out
    assert "comm_time 4.00 ms a step over 2 collectives" in out


def test_a_directory_without_a_compiled_program_is_named_with_the_fix(tmp_path):
    bench = runpy.run_path(str(ROOT / "bench" / "collective_waits.py"))
    try:
        bench["main"]([str(tmp_path)])
    except SystemExit as exc:
        assert f"{tmp_path}: not a compiled program" in str(exc) and "ultraplan compile" in str(exc)
    else:
        raise AssertionError("no error for a directory without plan.json")
