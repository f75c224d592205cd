"""The prefill rate a worker reports: tokens over seconds across its last prefills only."""

from __future__ import annotations

import pytest

from pdserve.planner.costs import parse_costs
from pdserve.planner.workers import PrefillSim, SimRequest
from pdserve.worker.prefill_rate import PrefillRate


def test_a_slow_first_prefill_stops_counting_once_the_window_has_moved_past_it() -> None:
    rate = PrefillRate(window=4)
    rate.record(1000, 0.8)  # a cold worker's first prefill: 1,250 tokens/s
    for _ in range(3):
        rate.record(1000, 0.1)
    assert rate.tokens_per_s == pytest.approx(4000 / 1.1)
    rate.record(1000, 0.1)
    assert rate.tokens_per_s == pytest.approx(10_000.0)
    assert len(rate) == 4


def test_the_rate_weighs_prefills_by_their_duration() -> None:
    rate = PrefillRate(window=8)
    rate.record(16, 0.004)  # a short prompt's fixed costs: 4,000 tokens/s
    rate.record(2048, 0.2)  # 10,240 tokens/s
    assert rate.tokens_per_s == pytest.approx(2064 / 0.204)


def test_no_rate_before_the_first_prefill_and_none_from_fully_cached_prompts() -> None:
    rate = PrefillRate()
    assert rate.tokens_per_s == 0.0
    rate.record(0, 0.003)  # every prompt token was cached: no rate to learn
    rate.record(100, 0.0)
    assert rate.tokens_per_s == 0.0 and len(rate) == 0


def test_a_window_must_hold_a_prefill() -> None:
    with pytest.raises(ValueError, match="window"):
        PrefillRate(window=0)


def test_the_simulated_worker_reports_the_windowed_rate() -> None:
    data = {"schema": "pdserve.planner.costs/1", "kv_bytes_per_token": 1024,
            "prefill_steps": [{"tokens": 16, "context": 0, "ms": 1.0},
                              {"tokens": 512, "context": 0, "ms": 10.0}],
            "decode_steps": [{"batch": 1, "context": 64, "ms": 1.0},
                             {"batch": 8, "context": 64, "ms": 2.0}]}
    worker = PrefillSim("prefill-0", parse_costs(data), 16)
    assert worker.reported_rate == 0.0
    worker.rate.record(512, 0.1)
    assert worker.reported_rate == pytest.approx(5120.0)
    worker.add(SimRequest(0, 0.0, 300, 4, ()))
    assert worker.pending_tokens == 300
