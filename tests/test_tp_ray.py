"""A tensor-parallel engine whose ranks 1..N-1 are Ray actors in a placement group (real
Ray, gloo on CPU): exact tokens, and a killed rank brings its worker down as one unit."""

from __future__ import annotations

import os
import random
import tempfile
import time

import pytest
import ray
import torch

from pdserve.engine import SamplingParams
from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.engine import Engine
from pdserve.engine.tp_group import TPGroup, TPGroupError
from pdserve.worker.tp_ranks import RankError, RankGroup
from tests.checkpoints import make_hf_checkpoint

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, logprobs=0)


@pytest.fixture(scope="module")
def ray_local():
    started = not ray.is_initialized()
    if started:
        tmp = os.environ.get("RAY_TMPDIR") or tempfile.mkdtemp(prefix="ray-tp-")
        os.environ["RAY_TMPDIR"] = tmp
        ray.init(address="local", num_cpus=4, namespace="pdserve-tp-test",
                 include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def engine_config(path) -> EngineConfig:
    return EngineConfig(model=str(path), dtype="float32", device="cpu", detokenize=False,
                        cache=CacheConfig(block_size=8, num_blocks=64),
                        scheduler=SchedulerConfig(max_num_batched_tokens=48, max_num_seqs=8))


def run(engine: Engine, prompts: list[list[int]], tag: str) -> list:
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}{i}", p, GREEDY)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[f"{tag}{i}"] for i in range(len(prompts))]


def test_rank_actors_follow_rank_0_exactly_and_a_killed_rank_stops_the_worker(
        ray_local, tmp_path) -> None:
    path = make_hf_checkpoint("llama", tmp_path / "gqa", seed=5, eos_token_id=None)
    config = engine_config(path)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 128) for _ in range(n)] for n in (3, 20, 61)]
    expected = run(Engine(config), prompts, "a")

    ranks = RankGroup(config, 2, cpus_per_rank=1, timeout_s=20, name="decode-test")
    group = TPGroup(ranks.address, 0, torch.device("cpu"), watch=ranks.check)
    engine = Engine(config, tp=group)
    try:
        got = run(engine, prompts, "b")
        assert [o.token_ids for o in got] == [o.token_ids for o in expected]
        for a, b in zip(got, expected, strict=True):
            assert max(abs(x.logprob - y.logprob)
                       for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-3
        ranks.check()  # the rank actor is alive and following

        # Mid-stream: kill rank 1. Rank 0's next steps fail (no hang), and check() names it.
        for i, p in enumerate(prompts):
            engine.add_request(f"c{i}", p, GREEDY)
        engine.step()
        ray.kill(ranks.actors[0], no_restart=True)
        start = time.monotonic()
        with pytest.raises((TPGroupError, RankError)):
            while True:
                ranks.check()
                engine.step()
        assert time.monotonic() - start < 20 + 5, "a dead rank must fail the step in its timeout"
        with pytest.raises(RankError, match="rank 1 of 2"):
            ranks.check()
        for i in range(len(prompts)):
            engine.abort(f"c{i}")
        assert engine.pool.num_used_blocks == 0
    finally:
        engine.close()
        ranks.close()
