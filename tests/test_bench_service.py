"""Smoke test of the service benchmark: its latency arithmetic and the ZMQ token path."""

from __future__ import annotations

import pytest

from pdserve.bench.common import Progress
from pdserve.bench.service import Options, Trace, part_token_path, report


def test_trace_splits_a_chunk_gap_evenly_over_its_tokens() -> None:
    trace = Trace(start=10.0)
    trace.add(10.5, [7])
    trace.add(10.6, [])  # a text-only chunk carries no token
    trace.add(10.7, [8])
    trace.add(11.1, [9, 9, 9, 9])
    assert trace.ttft() == pytest.approx(0.5)
    assert trace.itls() == pytest.approx([0.2, 0.1, 0.1, 0.1, 0.1])
    assert trace.tokens == [7, 8, 9, 9, 9, 9]


def test_zmq_token_path_reports_per_step_and_per_token_cost() -> None:
    opts = Options(steps=30, batch=8)
    part = part_token_path(opts, Progress("test", enabled=False), which=("zmq batch",))
    m = part["methods"]["zmq batch"]
    assert 0 < m["send_median_us"] <= m["rtt_median_us"] <= m["rtt_p99_us"]
    assert m["pipelined_us_per_token"] == pytest.approx(m["pipelined_us_per_step"] / 8)
    text = report({"cpus": 2, "load_before": [0.0], "load_after": [0.0], "token_path": part})
    assert "| zmq batch |" in text
