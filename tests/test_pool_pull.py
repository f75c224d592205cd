"""The cluster-wide prefix pool on the real path: a prefill worker pulls a prompt's cached
prefix from the worker holding it instead of computing it, exactly and without leaks.

The block-level contract (leases pin, pulled blocks enter the cache only once committed) is
checked on the engine in-process; the service tests run 2 prefill workers and 1 decode
worker (real Ray actors, NIXL, gRPC) with the ``kv_pool`` balancer.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pdserve.engine.block_leases import BlockLeases
from pdserve.engine.block_pool import BlockPool
from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.engine import Engine
from pdserve.engine.hashing import hash_blocks
from pdserve.engine.sampling import SamplingParams

BS = 16
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 500) for _ in range(n)]


# ------------------------------------------------------------------ engine, in-process


def test_lent_blocks_stay_pinned_until_given_back() -> None:
    pool = BlockPool(8, 4)
    tokens = list(range(12))
    hashes = hash_blocks(tokens, 4)
    blocks = pool.allocate(3)
    for i, b in enumerate(blocks):
        pool.cache_block(b, hashes[i], hashes[i - 1] if i else None, tokens[i * 4:(i + 1) * 4])
    pool.free(blocks)
    assert pool.num_used_blocks == 0
    leases = BlockLeases(pool)
    assert leases.lend("p", tokens, 1, 3) == [blocks[1].block_id, blocks[2].block_id]
    assert pool.num_used_blocks == 2
    pool.allocate(pool.num_free_blocks)  # every other block: the lent ones are not evicted
    assert pool.num_cached_blocks == 2  # block 0 was evicted, blocks 1 and 2 stay cached
    with pytest.raises(ValueError, match="already held"):
        leases.lend("p", tokens, 1, 3)
    assert leases.give_back("p") and not leases.give_back("p")
    assert [b.ref_cnt for b in blocks[1:]] == [0, 0]
    # Block 0 is gone: a lend that needs it pins nothing.
    assert leases.lend("q", tokens, 0, 3) is None
    assert [b.ref_cnt for b in blocks[1:]] == [0, 0]
    with pytest.raises(ValueError, match="not full blocks"):
        leases.lend("r", tokens, 0, 4)


def _engine(num_blocks: int = 64, caching: bool = True) -> Engine:
    return Engine(EngineConfig(
        model="tiny", dtype="float32", device="cpu",
        cache=CacheConfig(block_size=BS, num_blocks=num_blocks, enable_prefix_caching=caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=256)))


@pytest.fixture(scope="module")
def reference() -> Engine:
    """A colocated engine without prefix caching: every prompt recomputed."""
    return _engine(num_blocks=512, caching=False)


def _run(engine: Engine, rid: str, prompt: list[int]) -> list[int]:
    engine.add_request(rid, prompt, GREEDY)
    while True:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return out.token_ids


def test_a_pulled_prefix_decodes_as_its_recomputation(reference: Engine) -> None:
    """The lender and the puller of two workers, over in-process connectors (the same
    contract as NIXL): the holder pins its cached blocks only while they are sent, the
    puller caches them only once landed, computes only the suffix and samples the tokens of
    a recomputation; a refused pull frees the puller's reserved blocks at once."""
    from pdserve.kvtransfer.inprocess import InProcessConnector, LocalFabric
    from pdserve.prefill_worker.pull import Puller
    from pdserve.worker.lending import Lender
    from pdserve.worker.protocol import PrefillRequest, PullSource, SamplingSpec

    rng = random.Random(5)
    prefix, suffix = _prompt(rng, 6 * BS), _prompt(rng, 7)
    prompt = prefix + suffix
    holder, puller = _engine(), _engine()
    fabric = LocalFabric()
    lender = Lender("h", holder, InProcessConnector(
        holder.runner.kv_cache, holder.kv_spec, fabric, "tiny", name="h"))
    pc = InProcessConnector(puller.runner.kv_cache, puller.kv_spec, fabric, "tiny", name="p")
    pulls = Puller("p", puller, pc)

    def request(rid: str) -> PrefillRequest:
        return PrefillRequest(rid, prompt, SamplingSpec(max_tokens=1), pc.describe(), [], 0,
                              pull=PullSource("h", None, 6, 5.0))

    _run(holder, "a", prefix + [1, 2])
    lend = pulls.begin(request("r1"))
    assert lend is not None and (lend.first_block, lend.num_blocks) == (0, 6)
    assert puller.pool.num_cached_blocks == 0  # reserved, not cached: nothing hits them yet
    assert lender.lend(lend) == ""
    assert holder.pool.num_used_blocks == 6  # pinned while they are sent
    lender.take(lender.connector.poll())
    assert holder.pool.num_used_blocks == 0 and lender.lent_tokens == 6 * BS
    landed, failed = pulls.take(pc.poll())
    assert [(rid, tokens) for rid, tokens, _ in landed] == [("r1", 6 * BS)] and not failed
    before = puller.scheduler.prefill_tokens_computed
    assert _run(puller, "r1", prompt) == _run(reference, "ref", prompt)
    assert puller.scheduler.prefill_tokens_computed - before == len(suffix)
    pulls.finish("r1")
    assert puller.pool.num_used_blocks == 0

    # The holder lost the blocks: it refuses, pins nothing; the puller's blocks come back.
    puller.pool.reset_prefix_cache()
    holder.pool.reset_prefix_cache()
    lend = pulls.begin(request("r2"))
    assert lend is not None and puller.pool.num_used_blocks == 6
    assert lender.lend(lend) == "blocks no longer cached here"
    assert holder.pool.num_used_blocks == 0
    pulls.fail("r2", "refused", writes_done=True)
    landed, failed = pulls.take(pc.poll())
    assert failed == ["r2"] and not landed and pulls.failures == 1
    assert puller.pool.num_used_blocks == 0 and puller.pool.num_cached_blocks == 0


# ------------------------------------------------------------------ the service


@pytest.fixture(scope="module")
def svc() -> Iterator[Any]:
    from tests.service import ServiceThread

    service = ServiceThread("tiny", 2, 1, balancer="kv_pool", num_blocks=1024, lease_s=6.0)
    try:
        yield service
    finally:
        service.stop()


def _stats(svc: Any) -> dict[str, dict[str, Any]]:
    return svc.worker_stats()


def _delta(after: dict[str, Any], before: dict[str, Any], key: str) -> int:
    return int(after.get(key, 0) - before.get(key, 0))


def _busy_holder(svc: Any, client: Any, prefix: list[int], tail: int,
                 rng: random.Random) -> tuple[str, threading.Thread, dict[str, Any]]:
    """Send ``prefix`` + a long tail (one prefill worker busy computing it) and wait until
    the router's index has that worker's prefix blocks confirmed; (holder, thread, result)."""
    result: dict[str, Any] = {}
    long_prompt = prefix + _prompt(rng, tail)

    def send() -> None:
        result["out"] = client.generate(long_prompt, max_tokens=1, temperature=0)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    hashes = hash_blocks(prefix, BS)

    async def holders() -> list[str]:
        index = svc.router.index
        return [w for w in index.workers()
                if index.match(w, hashes, confirmed_only=True) == len(hashes)]

    deadline = time.monotonic() + 30
    while not (held := svc.call(holders)):
        assert time.monotonic() < deadline and thread.is_alive(), "prefix never confirmed"
        time.sleep(0.005)
    return held[0], thread, result


def test_prefix_held_by_the_busy_worker_is_pulled_exactly(svc: Any, reference: Engine) -> None:
    """The holder is busy computing a long prompt that starts with the prefix; a request
    with that prefix goes to the other worker, which pulls the prefix and computes only its
    own suffix. (That the first token comes sooner than by recomputing is measured side by
    side by ``pdserve.bench.pool_pull``: too noisy on a shared CI machine to assert here.)"""
    from pdserve_client import Client

    rng = random.Random(11)
    n_prefix = 96 * BS
    with Client(svc.target) as client:
        prefix = _prompt(rng, n_prefix)
        before = _stats(svc)
        holder, thread, busy = _busy_holder(svc, client, prefix, 2400, rng)
        other = next(w for w in before if w.startswith("prefill") and w != holder)
        prompt = prefix + _prompt(rng, 9)
        pulled = client.generate(prompt, max_tokens=6, temperature=0)
        thread.join(60)
        after = _stats(svc)
    assert list(pulled.token_ids) == _run(reference, "pulled", prompt)
    assert busy["out"].token_ids
    assert _delta(after[other], before[other], "pool_pulled_tokens") == n_prefix
    assert _delta(after[other], before[other], "prefill_tokens_computed") == 9
    assert _delta(after[other], before[other], "pool_pull_failures") == 0
    assert _delta(after[holder], before[holder], "pool_lent_tokens") == n_prefix
    assert pulled.usage.cached_tokens == n_prefix
    idle = svc.wait_idle(10)
    assert {w: s["num_used_blocks"] for w, s in idle.items()} == dict.fromkeys(idle, 0)
    assert all(s.get("pool_lends_open", 0) == 0 for s in idle.values())
    # The counters reach the router's Prometheus exposition (worker stats as last polled),
    # beside the KV event lag histogram.
    line = f'pdserve:kv_pool_pulled_tokens_total{{role="prefill",worker="{other}"}} '
    deadline = time.monotonic() + 15
    while True:
        text = svc.router.metrics.render().decode()
        values = [ln[len(line):] for ln in text.splitlines() if ln.startswith(line)]
        if values and float(values[0]) == after[other]["pool_pulled_tokens"]:
            break
        assert time.monotonic() < deadline, values
        time.sleep(0.2)
    lag_count = [ln for ln in text.splitlines()
                 if ln.startswith("pdserve:kv_event_lag_seconds_count")]
    assert lag_count and float(lag_count[0].split()[-1]) > 0


def test_holder_dying_mid_pull_falls_back_to_recomputation(svc: Any,
                                                           reference: Engine) -> None:
    """The holder freezes (SIGSTOP) once asked, and is killed while the other worker waits
    for its blocks: the request is computed there instead, with the same tokens."""
    from pdserve_client import Client

    rng = random.Random(12)
    n_prefix = 64 * BS
    with Client(svc.target) as client:
        prefix = _prompt(rng, n_prefix)
        before = _stats(svc)
        holder, thread, _ = _busy_holder(svc, client, prefix, 2400, rng)
        other = next(w for w in before if w.startswith("prefill") and w != holder)
        pid = svc.router.cluster.workers[holder].info["pid"]
        os.kill(pid, signal.SIGSTOP)  # frozen: the pull asked of it cannot be answered
        try:
            prompt = prefix + _prompt(rng, 5)
            out: dict[str, Any] = {}
            sender = threading.Thread(
                target=lambda: out.setdefault("r", client.generate(prompt, max_tokens=6,
                                                                   temperature=0)),
                daemon=True)
            sender.start()
            deadline = time.monotonic() + 20
            actor = svc.router.cluster.workers[other].actor

            async def other_stats() -> dict[str, Any]:
                return await actor.stats.remote()

            while svc.call(other_stats).get("pool_pulls_open", 0) < 1:
                assert time.monotonic() < deadline and sender.is_alive(), "no pull started"
                time.sleep(0.01)
        finally:
            os.kill(pid, signal.SIGKILL)
        sender.join(60)
        thread.join(60)
    after = svc.wait_idle(15)
    assert list(out["r"].token_ids) == _run(reference, "fallback", prompt)
    assert _delta(after[other], before[other], "pool_pull_failures") == 1
    assert _delta(after[other], before[other], "pool_pulled_tokens") == 0
    assert _delta(after[other], before[other], "prefill_tokens_computed") >= len(prompt)
    assert {w: s["num_used_blocks"] for w, s in after.items()} == dict.fromkeys(after, 0)
