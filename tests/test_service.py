"""The disaggregated service end to end: real gRPC channel, real Ray actors, real NIXL.

Outputs are checked token for token against the colocated engine (itself checked against
transformers in test_engine.py); leaks are checked from the workers' own block counters.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch

from pdserve.engine import LLM, SamplingParams
from pdserve.worker.protocol import PrefillRequest, ReserveRequest, SamplingSpec
from pdserve_client import (
    Client,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
)
from tests.service import ServiceThread

KEY = "test-key"
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog",
    "In a hole in the ground there lived a hobbit. " * 6,
    "0123456789 " * 30,
]


@pytest.fixture(scope="module")
def svc():
    service = ServiceThread("tiny", 1, 1, api_key=KEY, lease_s=3.0, max_waiting=2,
                            admission_timeout_s=5.0)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def tiny_llm() -> LLM:
    return LLM(model="tiny", dtype="float32", device="cpu")


def reference(llm: LLM, prompts: list, max_tokens: int, ignore_eos: bool = False) -> list:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
    return llm.generate(prompts, params)


def test_greedy_through_router_equals_colocated_and_transformers(svc, tiny_llm) -> None:
    from transformers import AutoModelForCausalLM

    rng = random.Random(0)
    prompts: list = PROMPTS + [[rng.randrange(3, 500) for _ in range(300)]]
    expected = reference(tiny_llm, prompts, 24)
    with Client(svc.target, api_key=KEY) as client:
        for prompt, ref in zip(prompts, expected, strict=True):
            got = client.generate(prompt, max_tokens=24, temperature=0.0)
            assert list(got.token_ids) == ref.token_ids
            assert got.text == ref.text
            assert got.finish_reason == ref.finish_reason
            assert got.usage.prompt_tokens == len(ref.prompt_token_ids)
            assert got.usage.completion_tokens == len(ref.token_ids)
            assert got.timing.first_token_s > 0 and got.timing.total_s >= got.timing.first_token_s
    model = AutoModelForCausalLM.from_pretrained(tiny_llm.engine.model_path, dtype=torch.float32)
    ids = torch.tensor([expected[1].prompt_token_ids])
    hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                        do_sample=False)
    assert hf[0, ids.shape[1]:].tolist()[: len(expected[1].token_ids)] == expected[1].token_ids
    stats = svc.wait_idle()
    assert all(s["num_used_blocks"] == 0 for s in stats.values())


def test_streamed_chunks_concatenate_to_the_completion(svc, tiny_llm) -> None:
    (ref,) = reference(tiny_llm, [PROMPTS[2]], 40, ignore_eos=True)
    with Client(svc.target, api_key=KEY) as client:
        chunks = list(client.stream(PROMPTS[2], max_tokens=40, temperature=0.0,
                                    ignore_eos=True))
    assert [t for c in chunks for t in c.token_ids] == ref.token_ids
    assert "".join(c.text for c in chunks) == ref.text
    assert [c.finish_reason for c in chunks][-1] == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])


def _slow_commits(worker: object) -> None:
    """Fault injection: the decode worker admits a request 1 s after its KV landed."""
    engine = worker.engine  # type: ignore[attr-defined]
    commit = engine.commit_kv

    def slow_commit(*args, **kwargs):
        time.sleep(1.0)
        return commit(*args, **kwargs)

    engine.commit_kv = slow_commit


def _undo_slow_commits(worker: object) -> None:
    del worker.engine.commit_kv  # type: ignore[attr-defined]


def test_workers_at_rest_tick_rarely_and_serve_the_next_request_exactly(svc, tiny_llm) -> None:
    """With nothing to do and nothing in flight, a worker's loop waits up to 50 ms a turn
    instead of 2 ms (and its KV connector's progress thread 20 ms): at rest a worker cost 15%
    of a core. A request then wakes both at once and comes out as it would have."""
    actors = [h.actor for role in ("prefill", "decode") for h in svc.router.cluster.pool(role)]
    time.sleep(0.5)  # the module's earlier requests are over: the waits reach their cap
    before = ray.get([a.stats.remote() for a in actors])
    time.sleep(2.0)
    after = ray.get([a.stats.remote() for a in actors])
    for b, a in zip(before, after, strict=True):
        turns = a["loop_turns"] - b["loop_turns"]
        cpu = a["process_cpu_seconds"] - b["process_cpu_seconds"]
        assert turns <= 60, (a["worker_id"], turns)  # 2 ms turns: ~1,000 in 2 s
        assert cpu < 0.2, (a["worker_id"], cpu)  # under 10% of a core (was 0.3 s)
    (ref,) = reference(tiny_llm, [PROMPTS[2]], 12, ignore_eos=True)
    with Client(svc.target, api_key=KEY) as client:
        got = client.generate(PROMPTS[2], max_tokens=12, temperature=0.0, ignore_eos=True)
    assert list(got.token_ids) == ref.token_ids


def test_the_first_token_streams_before_the_decode_worker_admits_the_request(
        svc, tiny_llm) -> None:
    """The prefill worker's answer (every block landed) carries the first token: the router
    streams it at once instead of after the decode worker's commit, and the decode worker's
    stream, which starts with the same token, goes on after it without a duplicate."""
    (ref,) = reference(tiny_llm, [PROMPTS[1]], 6, ignore_eos=True)
    decode = svc.router.cluster.pool("decode")[0].actor
    ray.get(decode.__ray_call__.remote(_slow_commits))
    try:
        with Client(svc.target, api_key=KEY) as client:
            start = time.monotonic()
            chunks, times = [], []
            for chunk in client.stream(PROMPTS[1], max_tokens=6, temperature=0.0,
                                       ignore_eos=True, logprobs=1):
                chunks.append(chunk)
                times.append(time.monotonic() - start)
    finally:
        ray.get(decode.__ray_call__.remote(_undo_slow_commits))
    assert chunks[0].token_ids and times[0] < 0.8, times
    assert times[-1] >= 1.0
    assert [t for c in chunks for t in c.token_ids] == ref.token_ids
    assert [lp.token_id for c in chunks for lp in c.logprobs] == ref.token_ids
    assert svc.wait_idle() and all(
        s["num_used_blocks"] == 0 for s in svc.worker_stats().values())


def test_stop_string_ends_the_stream_and_is_excluded(svc, tiny_llm) -> None:
    (ref,) = reference(tiny_llm, [PROMPTS[1]], 40, ignore_eos=True)
    stop = ref.text[5:8]
    with Client(svc.target, api_key=KEY) as client:
        got = client.generate(PROMPTS[1], max_tokens=40, temperature=0.0, ignore_eos=True,
                              stop=[stop])
    assert got.finish_reason == "stop"
    assert got.text == ref.text[: ref.text.index(stop)]
    assert svc.wait_idle() and all(
        s["num_used_blocks"] == 0 for s in svc.worker_stats().values())


@pytest.mark.parametrize(
    ("prompt", "kwargs", "message"),
    [
        ("", {}, "prompt is empty"),
        ([], {}, "prompt is empty"),
        ("hi", {"max_tokens": 5000}, "exceeds the model's length"),
        ("hi", {"temperature": -1.0}, "temperature"),
        ("hi", {"top_p": 1.5}, "top_p"),
        ("hi", {"logprobs": 50}, "logprobs"),
        ([5, 999_999], {}, "out of range"),
    ],
)
def test_bad_input_is_invalid_argument_and_service_keeps_serving(svc, prompt, kwargs,
                                                                  message) -> None:
    with Client(svc.target, api_key=KEY) as client:
        with pytest.raises(InvalidArgument, match=message):
            client.generate(prompt, **kwargs)
        assert client.generate("still here", max_tokens=3, temperature=0).token_ids


def test_missing_or_wrong_api_key_is_unauthenticated(svc) -> None:
    for key in (None, "wrong"):
        with Client(svc.target, api_key=key, retries=0) as client:
            with pytest.raises(Unauthenticated, match="API key"):
                client.generate("hi", max_tokens=2)


def test_cancel_mid_stream_and_deadline_free_every_block(svc) -> None:
    with Client(svc.target, api_key=KEY) as client:
        stream = client.stream(PROMPTS[3], max_tokens=1500, temperature=0.0, ignore_eos=True)
        received = 0
        for chunk in stream:
            received += len(chunk.token_ids)
            if received >= 5:
                break
        stream.close()
        busy = svc.worker_stats()
        with pytest.raises(DeadlineExceeded):
            client.generate(PROMPTS[3], max_tokens=1500, temperature=0.0, ignore_eos=True,
                            timeout=0.5)
    assert received >= 5 and busy is not None
    stats = svc.wait_idle()
    assert {w: s["num_used_blocks"] for w, s in stats.items()} == {w: 0 for w in stats}
    assert all(s["num_running"] == 0 and s["num_awaiting_kv"] == 0 for s in stats.values())


def test_reservation_whose_prefill_never_arrives_expires(svc) -> None:
    router = svc.router
    decode = router.cluster.pool("decode")[0]
    req = ReserveRequest("orphan", list(range(3, 60)), SamplingSpec(max_tokens=4),
                         router.inbox.endpoint, lease_s=0.5)
    result = ray.get(decode.actor.reserve.remote(req))
    assert result is not None and len(result.block_ids) == 4
    assert ray.get(decode.actor.stats.remote())["num_used_blocks"] == 4
    deadline = time.monotonic() + 15
    while ray.get(decode.actor.stats.remote())["num_used_blocks"] and time.monotonic() < deadline:
        time.sleep(0.2)
    stats = ray.get(decode.actor.stats.remote())
    assert stats["num_used_blocks"] == 0 and stats["num_awaiting_kv"] == 0


def test_prefill_past_its_write_deadline_writes_nothing(svc) -> None:
    router = svc.router
    decode = router.cluster.pool("decode")[0]
    prefill = router.cluster.pool("prefill")[0]
    prompt = list(range(3, 70))
    spec = SamplingSpec(max_tokens=4)
    res = ray.get(decode.actor.reserve.remote(
        ReserveRequest("late", prompt, spec, router.inbox.endpoint, lease_s=0.5)))
    result = ray.get(prefill.actor.prefill.remote(PrefillRequest(
        "late", prompt, spec, res.target, res.block_ids, 0, write_deadline=time.time() - 1)))
    assert not result.ok and result.retryable and "lease over" in result.error
    stats = svc.wait_idle()
    assert all(s["num_used_blocks"] == 0 for s in stats.values())


def test_overload_beyond_the_bounded_queue_is_resource_exhausted(svc) -> None:
    # Each request reserves ~64 of the decode worker's 512 blocks; the waiting queue holds 2.
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 500) for _ in range(1000)] for _ in range(16)]

    def one(prompt: list[int]) -> str:
        with Client(svc.target, api_key=KEY, retries=0) as client:
            try:
                client.generate(prompt, max_tokens=200, temperature=0.0, ignore_eos=True)
                return "ok"
            except ResourceExhausted as exc:
                assert "retry later" in exc.message
                return "exhausted"

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(one, prompts))
    assert "exhausted" in outcomes and "ok" in outcomes
    with Client(svc.target, api_key=KEY) as client:
        assert client.generate("after the storm", max_tokens=3, temperature=0).token_ids
    stats = svc.wait_idle()
    assert all(s["num_used_blocks"] == 0 for s in stats.values())


def test_two_by_two_workers_serve_32_concurrent_requests_exactly(tiny_llm) -> None:
    svc22 = ServiceThread("tiny", 2, 2)
    try:
        rng = random.Random(11)
        prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(1, 400))]
                   for _ in range(32)]
        lengths = [rng.randrange(1, 48) for _ in range(32)]
        expected = [reference(tiny_llm, [p], n, ignore_eos=True)[0].token_ids
                    for p, n in zip(prompts, lengths, strict=True)]

        def one(i: int) -> list[int]:
            with Client(svc22.target) as client:
                return list(client.generate(prompts[i], max_tokens=lengths[i],
                                            temperature=0.0, ignore_eos=True).token_ids)

        with ThreadPoolExecutor(32) as pool:
            got = list(pool.map(one, range(32)))
        assert got == expected
        stats = svc22.wait_idle()
        assert all(s["num_used_blocks"] == 0 for s in stats.values())
        computed = {w: s["prefill_tokens_computed"] for w, s in stats.items()
                    if w.startswith("prefill")}
        assert len(computed) == 2
    finally:
        svc22.stop()


@pytest.fixture(scope="module")
def small_svc():
    service = ServiceThread("small", 2, 2, max_num_batched_tokens=128, num_blocks=256)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def small_llm() -> LLM:
    return LLM(model="small", dtype="float32", device="cpu")


def _busy_worker(svc: ServiceThread, role: str, key: str) -> tuple[str, object]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for h in svc.router.cluster.pool(role):
            if ray.get(h.actor.stats.remote()).get(key, 0):
                return h.worker_id, h.actor
        time.sleep(0.02)
    raise AssertionError(f"no {role} worker became busy")


@pytest.mark.slow
def test_killing_prefill_mid_prefill_retries_with_exact_output(small_svc, small_llm) -> None:
    rng = random.Random(21)
    prompt = [rng.randrange(3, 8000) for _ in range(1200)]
    (ref,) = reference(small_llm, [prompt], 8, ignore_eos=True)
    failovers = small_svc.router.flow.failovers
    result: dict[str, object] = {}

    def run() -> None:
        with Client(small_svc.target) as client:
            try:
                result["out"] = client.generate(prompt, max_tokens=8, temperature=0.0,
                                                ignore_eos=True)
            except Exception as exc:
                result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    worker_id, actor = _busy_worker(small_svc, "prefill", "pending_jobs")
    ray.kill(actor, no_restart=True)
    thread.join(120)
    assert "error" not in result, result.get("error")
    assert list(result["out"].token_ids) == ref.token_ids
    # One failover: the dead worker leaves the pool at its first failed call, so the retry
    # goes to the other worker instead of failing again on the dead one.
    assert small_svc.router.flow.failovers == failovers + 1
    deadline = time.monotonic() + 60  # the pool replaces the dead worker
    while time.monotonic() < deadline and len(small_svc.router.cluster.pool("prefill")) < 2:
        time.sleep(0.2)
    assert len(small_svc.router.cluster.pool("prefill")) == 2


@pytest.mark.slow
def test_killing_decode_mid_stream_resumes_without_gap_or_duplicate(small_svc,
                                                                     small_llm) -> None:
    prompt = "Once upon a time, in a land far away, " * 4
    (ref,) = reference(small_llm, [prompt], 60, ignore_eos=True)
    failovers = small_svc.router.flow.failovers
    tokens: list[int] = []
    text = ""
    killed = False
    with Client(small_svc.target) as client:
        for chunk in client.stream(prompt, max_tokens=60, temperature=0.0, ignore_eos=True):
            tokens += list(chunk.token_ids)
            text += chunk.text
            if len(tokens) >= 10 and not killed:
                _, actor = _busy_worker(small_svc, "decode", "num_running")
                ray.kill(actor, no_restart=True)
                killed = True
    assert tokens == ref.token_ids
    assert text == ref.text
    assert small_svc.router.flow.failovers > failovers
