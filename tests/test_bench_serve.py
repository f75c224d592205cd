"""``pdserve bench serve``: the metric definitions on a synthetic timeline with exact
expected values, the workload's arrivals and trace readers, and short real runs against a
running service (gRPC and its OpenAI endpoint) and the in-process colocated engine."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pdserve.bench.serve_metrics import RequestResult, meets, parse_goodput, summarize
from pdserve.bench.serve_workload import (
    WorkItem,
    read_azure_trace,
    replay,
    synthetic_prompts,
    trace_prompts,
    with_arrivals,
)
from pdserve.cli import main as cli_main
from tests.service import SHARED_API_KEY, shared_service


def timeline() -> list[RequestResult]:
    return [
        RequestResult(10, 5, 0.0, [0.1, 0.2, 0.3, 0.4, 0.5]),  # TTFT 100, TPOT 100 ms
        RequestResult(20, 3, 0.3, [0.2, 0.5]),  # 3 tokens in 2 chunks: TPOT 150 ms
        RequestResult(30, 1, 0.6, [0.4]),  # one token: no TPOT, no ITL
        RequestResult(40, 0, 0.9, [], ok=False, error="boom"),
    ]


def test_ttft_tpot_itl_e2e_and_throughput_definitions_are_exact() -> None:
    r = summarize(timeline(), duration_s=2.0)
    assert (r["completed"], r["failed"]) == (3, 1)
    assert (r["input_tokens"], r["output_tokens"]) == (60, 9)
    assert r["request_throughput"] == pytest.approx(1.5)
    assert r["output_throughput"] == pytest.approx(4.5)
    assert r["total_token_throughput"] == pytest.approx(34.5)
    exact = {
        # ms over [100, 200, 400]: p90 = 200 + 0.8 * 200, p99 = 200 + 0.98 * 200
        "ttft": (700 / 3, 200, 360, 396),
        # per request (E2E - TTFT) / (tokens - 1): [100, 150]
        "tpot": (125, 125, 145, 149.5),
        # every gap: [100, 100, 100, 100, 300]
        "itl": (140, 100, 220, 292),
        "e2el": (1400 / 3, 500, 500, 500),
    }
    for key, (mean, median, p90, p99) in exact.items():
        d = r[key]
        got = (d["mean_ms"], d["median_ms"], d["p90_ms"], d["p99_ms"])
        assert got == pytest.approx((mean, median, p90, p99)), key
    assert r["errors"] == ["boom"]
    assert "goodput" not in r


def test_goodput_counts_requests_meeting_every_slo() -> None:
    results = timeline()
    strict = summarize(results, 2.0, parse_goodput(["ttft:150", "tpot:120"]))
    assert strict["goodput_requests"] == 1 and strict["goodput"] == pytest.approx(0.5)
    # TTFT 500 lets all three in; TPOT 120 drops the 150 ms one; no TPOT meets a TPOT SLO.
    loose = summarize(results, 2.0, parse_goodput(["ttft:500", "tpot:120"]))
    assert loose["goodput_requests"] == 2 and loose["goodput"] == pytest.approx(1.0)
    assert summarize(results, 2.0, {"e2el": 0.45})["goodput_requests"] == 1
    assert not meets(results[3], {})  # a failed request never counts
    assert parse_goodput(["e2el:2500"]) == {"e2el": 2.5}
    for bad in ("ttft", "itl:5", "tpot:-1"):
        with pytest.raises(ValueError):
            parse_goodput([bad])


def test_arrivals_poisson_gamma_all_at_once_and_replay() -> None:
    items = [WorkItem([5], 1, 1, float(i)) for i in range(4000)]
    assert [it.arrival_s for it in with_arrivals(items[:3], math.inf)] == [0.0, 0.0, 0.0]
    poisson = np.diff([it.arrival_s for it in with_arrivals(items, 4.0, 1.0, seed=1)])
    bursty = np.diff([it.arrival_s for it in with_arrivals(items, 4.0, 0.25, seed=1)])
    assert with_arrivals(items, 4.0, seed=1)[0].arrival_s == 0.0
    assert poisson.mean() == pytest.approx(0.25, rel=0.05)
    assert bursty.mean() == pytest.approx(0.25, rel=0.1)
    # gamma(k, 1/(rate k)): coefficient of variation 1/sqrt(k): 1 for Poisson, 2 for k=1/4
    assert poisson.std() / poisson.mean() == pytest.approx(1.0, rel=0.1)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.15)
    shifted = [WorkItem([5], 1, 1, t) for t in (10.0, 12.0, 16.0)]
    assert [it.arrival_s for it in replay(shifted, 0.5)] == [0.0, 1.0, 3.0]


def test_trace_readers_and_prompt_lengths() -> None:
    rows = read_azure_trace(limit=3)
    assert (rows[0].timestamp_s, rows[0].input_len, rows[0].output_len) == (0.0, 4808, 10)
    assert rows[1].timestamp_s == pytest.approx(0.052) and rows[1].input_len == 3180
    items = trace_prompts(rows, vocab_size=100, length_scale=0.1, max_input_len=400)
    assert [it.prompt_len for it in items] == [400, 318, min(400, round(rows[2].input_len
                                                                         / 10))]
    assert all(len(it.prompt) == it.prompt_len and 3 <= min(it.prompt) for it in items)
    assert items[0].output_len == 10 and items[1].arrival_s == rows[1].timestamp_s
    synth = synthetic_prompts(50, 100, 10, vocab_size=50, range_ratio=0.5, seed=2)
    assert all(50 <= it.prompt_len <= 150 and 5 <= it.output_len <= 15 for it in synth)


@pytest.fixture(scope="module")
def svc():
    return shared_service("tiny")


@pytest.mark.parametrize("front", ["grpc", "openai"])
def test_bench_serve_runs_against_a_running_service(svc, front, tmp_path) -> None:
    where = (["--endpoint", svc.http_url] if front == "openai" else ["--target", svc.target])
    out = tmp_path / "bench.json"
    code = cli_main(["bench", "serve", *where, "--api-key", SHARED_API_KEY,
                     "--dataset", "synthetic", "--num-prompts", "6", "--input-len", "40",
                     "--output-len", "8", "--request-rate", "20", "--goodput", "ttft:60000",
                     "--json", str(out), "--plot", str(tmp_path / "cdf.png"),
                     "--no-progress"])
    assert code == 0
    (run,) = json.loads(out.read_text())["runs"]
    report = run["report"]
    assert report["completed"] == 6 and report["failed"] == 0
    assert report["output_tokens"] == 6 * 8 and report["input_tokens"] == 6 * 40
    assert report["goodput_requests"] == 6
    assert 0 < report["ttft"]["median_ms"] <= report["e2el"]["median_ms"]
    assert len(run["samples"]["tpot"]) == 6 and report["itl"]["mean_ms"] > 0
    assert (tmp_path / "cdf.png").stat().st_size > 0


def test_bench_serve_colocated_engine_and_sweep(tmp_path) -> None:
    out = tmp_path / "colocated.json"
    code = cli_main(["bench", "serve", "--colocated", "--model", "tiny", "--threads", "1",
                     "--dataset", "synthetic", "--num-prompts", "4", "--input-len", "30",
                     "--output-len", "6", "--sweep", "50,100", "--json", str(out),
                     "--plot", str(tmp_path / "c.png"), "--no-progress"])
    assert code == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["request_rate"] for r in runs] == [50.0, 100.0]
    assert all(r["report"]["output_tokens"] == 24 for r in runs)
    assert (tmp_path / "c_goodput.png").exists()
