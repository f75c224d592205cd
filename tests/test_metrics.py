"""``/metrics`` after real traffic: counters move by exactly what the traffic implies
(requests by outcome, prompt and output tokens, balancer decisions, KV bytes, prefix-cache
queries and hits), histograms gain one observation per request, and gRPC ``GetStats``
carries the same samples."""

from __future__ import annotations

import random
import time
import urllib.request
from collections.abc import Callable

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.engine.config import KVCacheSpec
from pdserve.router.metrics import RequestTimer, RouterMetrics
from pdserve_client import Client, InvalidArgument
from tests.service import SHARED_API_KEY as KEY
from tests.service import ServiceThread, shared_service


@pytest.fixture(scope="module")
def svc() -> ServiceThread:
    return shared_service("tiny")


def scrape(svc: ServiceThread) -> dict[str, float]:
    """Every sample of /metrics as ``name{k="v",...}`` -> value (labels sorted)."""
    request = urllib.request.Request(f"{svc.http_url}/metrics",
                                     headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "metrics did not catch up"
        time.sleep(0.1)


def test_counters_and_histograms_follow_real_traffic(svc) -> None:
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (40, 70, 100)]
    outputs = (5, 9, 13)
    repeat = [rng.randrange(3, 500) for _ in range(90)]
    svc.wait_idle()
    before = scrape(svc)
    with Client(svc.target, api_key=KEY) as client:
        for prompt, n in zip(prompts, outputs, strict=True):
            assert len(client.generate(prompt, max_tokens=n, temperature=0,
                                       ignore_eos=True).token_ids) == n
        cached = [client.generate(repeat, max_tokens=3, temperature=0,
                                  ignore_eos=True).usage.cached_tokens for _ in range(2)]
        with pytest.raises(InvalidArgument):
            client.generate([], max_tokens=3)
    oai = openai.OpenAI(base_url=f"{svc.http_url}/v1", api_key=KEY, max_retries=0)
    stream = oai.completions.create(model="tiny", prompt=prompts[0], max_tokens=7,
                                    temperature=0, stream=True,
                                    extra_body={"ignore_eos": True})
    assert sum(1 for c in stream if c.choices and c.choices[0].text) >= 1
    requests = 3 + 2 + 1
    prompt_tokens = sum(map(len, prompts)) + 2 * len(repeat) + len(prompts[0])
    gen_tokens = sum(outputs) + 2 * 3 + 7
    assert cached[0] == 0 and cached[1] == 80  # the repeat's full blocks, less the last token's

    svc.wait_idle()

    def router_caught_up() -> bool:
        # The router reads worker stats on its monitor's schedule: wait until its view has
        # both the prefill worker's queries and the decode worker's release of every block.
        now = scrape(svc)
        queries = 'pdserve:prefix_cache_queries_total{role="prefill",worker="prefill-0"}'
        return (now[queries] - before[queries] >= prompt_tokens
                and now['pdserve:kv_blocks_used{role="decode",worker="decode-0"}'] == 0)

    wait_for(router_caught_up)
    after = scrape(svc)

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert moved('pdserve:requests_total{outcome="length"}') == requests
    assert moved('pdserve:requests_total{outcome="invalid_argument"}') == 1
    assert moved("pdserve:prompt_tokens_total") == prompt_tokens
    assert moved("pdserve:generation_tokens_total") == gen_tokens
    for hist in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert moved(f"pdserve:{hist}_seconds_count") == requests, hist
        assert moved(f"pdserve:{hist}_seconds_sum") > 0, hist
    assert 0 < moved("pdserve:inter_token_latency_seconds_count") <= gen_tokens - requests
    assert moved('pdserve:time_to_first_token_seconds_bucket{le="+Inf"}') == requests
    assert moved('pdserve:balancer_decisions_total{policy="prefix_aware"}') == requests
    for hist in ("predicted_ttft_seconds", "actual_ttft_seconds", "cached_prefix_tokens"):
        assert moved(f"pdserve:balancer_{hist}_count") == requests, hist
    assert moved("pdserve:balancer_cached_prefix_tokens_sum") == 80 + 32
    mc = svc.router.model_config
    block_bytes = KVCacheSpec(mc.num_layers, mc.num_kv_heads, mc.head_dim, 16,
                              "float32").block_bytes
    # Blocks the decode worker did not already hold: the repeat's second run and the
    # streamed prompt reuse the decode worker's own cached prefix (80 and 32 tokens).
    blocks = sum(-(-len(p) // 16) for p in prompts) + 6 + (6 - 5) + (-(-40 // 16) - 2)
    assert moved("pdserve:kv_transfer_bytes_total") == blocks * block_bytes
    assert moved("pdserve:kv_transfer_seconds_count") == requests
    assert moved("pdserve:kv_transfer_failures_total") == 0
    prefill = 'role="prefill",worker="prefill-0"'
    decode = 'role="decode",worker="decode-0"'
    assert moved(f"pdserve:prefix_cache_queries_total{{{prefill}}}") == prompt_tokens
    assert moved(f"pdserve:prefix_cache_hits_total{{{prefill}}}") == 80 + 32
    assert after[f"pdserve:kv_blocks_total{{{decode}}}"] == 512
    assert after[f"pdserve:kv_blocks_used{{{decode}}}"] == 0
    assert after[f"pdserve:num_requests_running{{{decode}}}"] == 0
    assert after[f"pdserve:worker_up{{{prefill}}}"] == 1
    with Client(svc.target, api_key=KEY) as client:
        grpc_metrics = client.stats().metrics
    for name in ("pdserve:prompt_tokens_total", "pdserve:generation_tokens_total",
                 'pdserve:requests_total{outcome="length"}'):
        assert grpc_metrics[name] == after[name]


def test_request_timer_observes_ttft_itl_and_e2e_from_its_timeline() -> None:
    metrics = RouterMetrics(policy="round_robin", workers=lambda: [])
    timer = metrics.track(prompt_tokens=10, arrival=100.0)
    assert isinstance(timer, RequestTimer)
    timer.on_tokens(1, now=100.5)
    timer.on_tokens(0, now=100.6)  # text-only deltas are not tokens
    timer.on_tokens(2, now=100.75)
    timer.on_tokens(1, now=101.0)
    timer.finish("stop", queue_s=0.125, now=101.5)
    s = metrics.samples()
    assert s["pdserve:prompt_tokens_total"] == 10 and s["pdserve:generation_tokens_total"] == 4
    assert s["pdserve:time_to_first_token_seconds_sum"] == 0.5
    assert s["pdserve:inter_token_latency_seconds_count"] == 2
    assert s["pdserve:inter_token_latency_seconds_sum"] == 0.5
    assert s["pdserve:e2e_request_latency_seconds_sum"] == 1.5
    assert s["pdserve:request_queue_time_seconds_sum"] == 0.125
    assert s['pdserve:requests_total{outcome="stop"}'] == 1
    cancelled = metrics.track(prompt_tokens=3, arrival=0.0)
    cancelled.finish("cancelled", now=1.0)
    s = metrics.samples()
    assert s['pdserve:requests_total{outcome="cancelled"}'] == 1
    assert s["pdserve:e2e_request_latency_seconds_count"] == 1  # finished requests only
