"""benchmarks/inspect_load.py's arithmetic: decode gaps per request and the per-phase medians and ratios."""

from __future__ import annotations

import pytest

from benchmarks.inspect_load import Phase, decode_gaps, summarise


def test_gaps_never_span_two_requests():
    stamps = [1.0, 1.5, 1.7, None, 5.0, 5.2]
    gaps = decode_gaps(stamps)
    assert [t for t, _ in gaps] == [1.5, 1.7, 5.2] and [g for _, g in gaps] == pytest.approx([0.5, 0.2, 0.2])


def test_phases_take_the_gaps_that_end_inside_them_and_count_engine_reports():
    quiet, moa, control = Phase("quiet", 0, 10), Phase("moa", 10, 20), Phase("control", 20, 30)
    moa.gets_ok, moa.reports_first, moa.reports_last, moa.ages = 200, 5, 14, [0.5, 0.4]
    gaps = [(1, 0.10), (2, 0.10), (11, 0.12), (12, 0.12), (21, 0.11), (29.9, 0.11), (30, 9.0)]
    out = summarise([quiet, moa, control], gaps, interval_s=1.0)
    assert out["median_step_ms"] == {"quiet": 100.0, "moa": 120.0, "control": 110.0}
    assert out["ratio_moa_vs_quiet"] == 1.2 and out["ratio_moa_vs_control"] == round(0.12 / 0.11, 4)
    row = out["phases"][1]
    assert row["engine_reports_seen"] == 9 and row["expected_reports"] == 10.0 and row["gets_per_s"] == 20.0
