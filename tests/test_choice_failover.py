"""A decode worker dying under requests that already streamed tokens, with real Ray workers:
each unfinished choice of a request with ``n`` > 1 resumes on its own from exactly its own
tokens, and every request's output (greedy, and seeded at temperature > 0) equals that of
the same request run without the failure; finish reasons and usage too, and no block stays
referenced anywhere.

The decode workers step slowly (fault injection) so that the kill lands mid-stream.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import ray

from pdserve_client import Client, Unavailable
from tests.service import ServiceThread

PROMPT = list(range(200, 250))  # 3 full blocks of 16 tokens, then 2
PROMPT_BLOCK_TOKENS = 48
MAX_TOKENS = 40
KILL_AFTER = 10  # tokens of every unfinished choice


@pytest.fixture(scope="module")
def svc():
    service = ServiceThread("tiny", 1, 2)
    yield service
    service.stop()


def _slow_steps(worker: object) -> None:
    """Fault injection: every engine step of the decode worker takes 30 ms more."""
    engine = worker.engine  # type: ignore[attr-defined]
    if "step" in vars(engine):
        return  # slowed already
    step = engine.step

    def slow_step(*args, **kwargs):
        time.sleep(0.03)
        return step(*args, **kwargs)

    engine.step = slow_step


def _decode_pool(svc: ServiceThread) -> list[Any]:
    """The decode workers once both are up (a killed one is replaced), slowed down."""
    deadline = time.monotonic() + 60
    while len(svc.router.cluster.pool("decode")) < 2:
        assert time.monotonic() < deadline, "the decode pool was not replenished"
        time.sleep(0.1)
    pool = svc.router.cluster.pool("decode")
    ray.get([h.actor.__ray_call__.remote(_slow_steps) for h in pool])
    return pool


def _run(svc: ServiceThread, n: int, kill: bool, kills: int = 1,
         **sampling: Any) -> dict[str, Any]:
    """Stream one request; with ``kill``, kill its decode worker once every unfinished
    choice has ``KILL_AFTER`` tokens (``kills`` times, ``KILL_AFTER`` more tokens apart).
    Per choice: tokens, text, finish reason, usage."""
    _decode_pool(svc)
    tokens: dict[int, list[int]] = {i: [] for i in range(n)}
    text = {i: "" for i in range(n)}
    finish: dict[int, str] = {}
    usage: dict[int, tuple[int, int]] = {}
    at_kill: dict[int, int] | None = None
    killed = ""
    with Client(svc.target) as client:
        for chunk in client.stream(PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True,
                                   sampling={"n": n}, **sampling):
            assert chunk.index not in finish, "a chunk after its choice's last one"
            tokens[chunk.index] += chunk.token_ids
            text[chunk.index] += chunk.text
            if chunk.finish_reason is not None:
                finish[chunk.index] = chunk.finish_reason
                usage[chunk.index] = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
            done = 0 if at_kill is None else 1  # kills so far (at most 2 here)
            if kill and kills and all(len(tokens[i]) >= KILL_AFTER * (done + 1)
                                      for i in range(n) if i not in finish):
                pool = svc.router.cluster.pool("decode")
                busy = [h for h in pool if ray.get(h.actor.stats.remote())["num_running"]]
                assert len(busy) == 1, "the request is not on one decode worker"
                if at_kill is None:
                    at_kill = {i: len(tokens[i]) for i in range(n)}
                killed = busy[0].worker_id
                ray.kill(busy[0].actor, no_restart=True)
                kills -= 1
    return {"tokens": tokens, "text": text, "finish": finish, "usage": usage,
            "at_kill": at_kill, "killed": killed}


def _assert_no_block_held(svc: ServiceThread) -> None:
    stats = svc.wait_idle()
    assert {w: s["num_used_blocks"] for w, s in stats.items()} == {w: 0 for w in stats}


def _early_stop(outputs: dict[int, list[int]]) -> tuple[int, int] | None:
    """(choice, token): a token that ends that choice before ``KILL_AFTER`` tokens and
    none of the others by then."""
    for i, tokens in outputs.items():
        for t in tokens[:KILL_AFTER - 2]:
            if all(t not in other[:KILL_AFTER + 1] for j, other in outputs.items() if j != i):
                return i, t
    return None


def test_seeded_choices_resume_each_from_its_own_tokens(svc) -> None:
    n = 3
    for seed in range(4321, 4331):  # one whose choices differ and allow an early stop
        sampling: dict[str, Any] = {"temperature": 3.0, "seed": seed}  # tiny is peaked
        first = _run(svc, n, kill=False, **sampling)["tokens"]
        stop_at = _early_stop(first)
        if len({tuple(t) for t in first.values()}) == n and stop_at is not None:
            break
    else:
        pytest.fail("no seed of ten gives differing choices and one that stops early")
    assert stop_at is not None
    sampling["stop_token_ids"] = [stop_at[1]]
    ref = _run(svc, n, kill=False, **sampling)
    assert ref["finish"][stop_at[0]] == "stop"
    failovers = svc.router.flow.failovers
    got = _run(svc, n, kill=True, **sampling)
    assert got["at_kill"] is not None and got["at_kill"][stop_at[0]] < KILL_AFTER
    assert svc.router.flow.failovers > failovers
    for key in ("tokens", "text", "finish", "usage"):
        assert got[key] == ref[key], key
    _assert_no_block_held(svc)


def _hits(stats: dict[str, dict[str, Any]], role: str) -> int:
    return sum(s["prefix_hit_tokens"] for s in stats.values() if s["role"] == role)


def test_greedy_choices_resume_and_equal_the_single_choice_output(svc) -> None:
    one = _run(svc, 1, kill=False, temperature=0.0)
    failovers = svc.router.flow.failovers
    _decode_pool(svc)
    before = svc.worker_stats()
    got = _run(svc, 4, kill=True, temperature=0.0)
    assert got["at_kill"] is not None and svc.router.flow.failovers > failovers
    assert got["tokens"] == {i: one["tokens"][0] for i in range(4)}
    assert got["text"] == {i: one["text"][0] for i in range(4)}
    assert got["finish"] == {i: "length" for i in range(4)}
    assert got["usage"] == {i: one["usage"][0] for i in range(4)}
    # The first attempt and each resumed choice found the prompt's full blocks in the
    # prefill worker's prefix cache (the prompt is computed once, not once per choice), and
    # the choices resumed after the first found them on the decode worker that holds it.
    stats = svc.wait_idle()
    assert _hits(stats, "prefill") - _hits(before, "prefill") >= 5 * PROMPT_BLOCK_TOKENS
    (survivor,) = [w for w, s in before.items() if s["role"] == "decode" and w != got["killed"]]
    hits = stats[survivor]["prefix_hit_tokens"] - before[survivor]["prefix_hit_tokens"]
    assert hits >= 3 * PROMPT_BLOCK_TOKENS
    assert {w: s["num_used_blocks"] for w, s in stats.items()} == {w: 0 for w in stats}


def test_a_seeded_single_choice_resumes_with_its_own_draws(svc) -> None:
    sampling = {"temperature": 3.0, "seed": 99}
    ref = _run(svc, 1, kill=False, **sampling)
    got = _run(svc, 1, kill=True, **sampling)
    assert got["at_kill"] is not None
    assert got["tokens"] == ref["tokens"] and got["text"] == ref["text"]
    assert got["usage"] == ref["usage"] and got["finish"] == {0: "length"}
    _assert_no_block_held(svc)


def test_choices_resumed_on_a_worker_that_dies_too_fail_as_one_request(svc) -> None:
    """The choices resumed on one decode worker that dies count one more death of the
    request (not one per choice), which makes two: UNAVAILABLE, as for one choice."""
    with pytest.raises(Unavailable, match="on 2 workers that died"):
        _run(svc, 3, kill=True, kills=2, temperature=0.0)
    _assert_no_block_held(svc)
