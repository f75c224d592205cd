"""A request the engine cannot run fails alone: with the router's validation bypassed, a
poisoned request (a seed wider than the sampler's 64-bit generator) sharing steps with
others is ended with a clear error, and every other request's tokens are exactly those of a
run without it, greedy and seeded alike; no block is left held."""

from __future__ import annotations

import pytest

from pdserve.engine import SamplingParams
from pdserve.engine.config import CacheConfig, EngineConfig
from pdserve.engine.engine import Engine

PROMPTS = {"greedy": [5, 6, 7, 8, 9], "seeded": [11, 12, 13], "plain": [20, 21, 22, 23]}
PARAMS = {
    "greedy": SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
    "seeded": SamplingParams(max_tokens=12, temperature=0.9, top_k=50, seed=1234,
                             ignore_eos=True),
    "plain": SamplingParams(max_tokens=12, temperature=0.0, seed=77, ignore_eos=True),
}


def poisoned(temperature: float) -> SamplingParams:
    """Params that ``SamplingParams`` itself refuses, built as a buggy caller might."""
    params = SamplingParams(max_tokens=12, temperature=temperature, ignore_eos=True)
    object.__setattr__(params, "seed", 2**64 + 5)
    object.__setattr__(params, "top_k", 2**63 + 1)
    return params


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(model="tiny", dtype="float32", device="cpu",
                               cache=CacheConfig(block_size=16, num_blocks=64)))


def run(engine: Engine, extra: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    requests = {name: (PROMPTS[name], PARAMS[name]) for name in PROMPTS} | extra
    for name, (prompt, params) in requests.items():
        engine.add_request(name, prompt, params)
    done = {}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
        assert steps < 200
    assert engine.stats().num_used_blocks == 0
    return done


def test_a_poisoned_request_fails_alone_and_the_others_are_exact(engine: Engine) -> None:
    reference = run(engine, {})
    for temperature in (0.8, 0.0):  # sampled: fails; greedy: its seed is never used
        got = run(engine, {"poison": ([30, 31, 32], poisoned(temperature))})
        for name in PROMPTS:
            assert got[name].token_ids == reference[name].token_ids, name
            assert got[name].finish_reason == "length" and got[name].error is None
        poison = got["poison"]
        if temperature:
            assert poison.finish_reason == "error"
            assert "seed" in poison.error.lower() or "overflow" in poison.error.lower()
            assert len(poison.error) < 300 and "Traceback" not in poison.error
            assert poison.token_ids == []
        else:
            assert poison.finish_reason == "length" and len(poison.token_ids) == 12


def test_a_poisoned_prefill_only_request_keeps_its_blocks_until_release(
        engine: Engine) -> None:
    engine.add_request("p", [40] * 40, poisoned(1.0), prefill_only=True)
    engine.add_request("ok", [41] * 40, PARAMS["greedy"], prefill_only=True)
    outs = {}
    while len(outs) < 2:
        outs |= {o.request_id: o for o in engine.step() if o.finished}
    assert outs["p"].finish_reason == "error" and outs["ok"].finish_reason == "prefill_done"
    assert len(outs["p"].block_ids) == 3  # still held: its KV may be in flight
    assert engine.release("p") and engine.release("ok")
    assert engine.stats().num_used_blocks == 0
