"""The /moa route helpers without a server: length parsing limits, handles, redaction of the engine report."""

from __future__ import annotations

import pytest
from fastapi import HTTPException

from moa_vllm.vllm_plugin.inspect.endpoint import MAX_LENGTHS, _lengths, redact, request_handle


def test_lengths_are_bounded_in_value_and_count():
    assert _lengths("1024, 2048", 4096) == [1024, 2048]
    for bad in ("0", "5000", "x", ",".join(["10"] * (MAX_LENGTHS + 1))):
        with pytest.raises(HTTPException) as e:
            _lengths(bad, 4096)
        assert e.value.status_code == 400


def test_redacted_rows_carry_a_keyed_handle_instead_of_the_id():
    report = {"serial": 7, "requests": [{"id": "cmpl-secret-trace-123-0", "n": 10}], "totals": {"requests": 1}}
    a, b = redact(report, b"k" * 32, show_ids=False), redact(report, b"j" * 32, show_ids=False)
    row = a["requests"][0]
    assert "id" not in row and "secret" not in str(a) and row["n"] == 10 and a["engine_reports"] == 7
    assert row["handle"] == request_handle(b"k" * 32, "cmpl-secret-trace-123-0") != b["requests"][0]["handle"]
    assert redact(report, b"k" * 32, show_ids=True)["requests"][0]["id"] == "cmpl-secret-trace-123-0"
