"""Priority scheduling (``--scheduling-policy priority``): lower values first in the
engine's waiting queue and the router's admission queue, the lowest-priority youngest
running request preempted first, FCFS among equals, and aging so nothing starves.

The scheduler tests drive the pure scheduler with a fake clock and a stand-in model step
(milliseconds); the router's admission queue is pure too.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytest

from pdserve.engine.block_pool import BlockPool
from pdserve.engine.config import SchedulerConfig
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import Sequence, SequenceStatus
from pdserve.router.admission import AdmissionQueue


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Sim:
    def __init__(self, num_blocks: int, block_size: int = 4, budget: int = 64,
                 max_seqs: int = 64, policy: str = "priority", aging_s: float = 100.0):
        self.clock = Clock()
        self.kv = KVCacheManager(BlockPool(num_blocks, block_size, False))
        self.sched = Scheduler(SchedulerConfig(budget, max_seqs, policy=policy,
                                               priority_aging_s=aging_s),
                               self.kv, clock=self.clock)
        self.order = 0

    def add(self, prompt_len: int, max_tokens: int, priority: int = 0) -> Sequence:
        seq = Sequence(f"r{self.order}", list(range(1, prompt_len + 1)),
                       SamplingParams(max_tokens=max_tokens), self.clock.now, self.order,
                       priority=priority)
        seq.max_len = prompt_len + max_tokens
        self.order += 1
        self.sched.add(seq)
        return seq

    def step(self) -> list[Sequence]:
        """One step; returns the sequences that finished."""
        batch = self.sched.schedule()
        done = []
        for seq in batch.decodes:
            seq.num_computed_tokens += 1
        for seq, n in batch.prefills:
            seq.num_computed_tokens += n
        for seq in batch.decodes + [s for s, _ in batch.prefills]:
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(7)
                if seq.num_tokens >= seq.max_len:
                    self.sched.remove(seq)
                    seq.status = SequenceStatus.FINISHED
                    self.kv.free(seq)
                    done.append(seq)
        self.clock.now += 0.01
        return done


def test_waiting_queue_admits_lower_priority_values_first() -> None:
    sim = Sim(num_blocks=64, max_seqs=1)
    low = sim.add(4, 2, priority=5)
    high = sim.add(4, 2, priority=-1)
    mid = sim.add(4, 2, priority=0)
    order = []
    for _ in range(20):
        order += sim.step()
    assert order == [high, mid, low]


def test_equal_priorities_keep_arrival_order() -> None:
    for policy in ("fcfs", "priority"):
        sim = Sim(num_blocks=64, max_seqs=1, policy=policy)
        seqs = [sim.add(4, 2, priority=3) for _ in range(4)]
        order = []
        for _ in range(20):
            order += sim.step()
        assert order == seqs, policy


def test_fcfs_ignores_priority() -> None:
    sim = Sim(num_blocks=64, max_seqs=1, policy="fcfs")
    a = sim.add(4, 2, priority=9)
    b = sim.add(4, 2, priority=-9)
    order = []
    for _ in range(20):
        order += sim.step()
    assert order == [a, b]


def test_out_of_blocks_preempts_lowest_priority_youngest_first() -> None:
    # 6 blocks of 4 tokens; three running sequences of 8 tokens take 2 blocks each.
    sim = Sim(num_blocks=6, budget=64)
    old_low = sim.add(8, 20, priority=5)
    sim.clock.now += 1
    high = sim.add(8, 20, priority=0)
    sim.clock.now += 1
    young_low = sim.add(8, 20, priority=5)
    sim.step()
    assert all(s.status is SequenceStatus.RUNNING for s in (old_low, high, young_low))
    victims = []
    for _ in range(3):
        victims += sim.sched.schedule().preempted
        if victims:
            break
    assert victims and victims[0] is young_low
    assert old_low.status is SequenceStatus.RUNNING and high.status is SequenceStatus.RUNNING


def test_better_priority_waiting_request_preempts_a_worse_running_one() -> None:
    sim = Sim(num_blocks=4, budget=64)
    low = sim.add(12, 30, priority=5)  # 3 blocks, growing
    sim.step()
    high = sim.add(8, 2, priority=0)  # needs 2 blocks: only 1 is free
    batch = sim.sched.schedule()
    assert low in batch.preempted and low.status is SequenceStatus.WAITING
    assert high.status is SequenceStatus.RUNNING
    # Equal priority never preempts.
    sim2 = Sim(num_blocks=4, budget=64)
    first = sim2.add(12, 30, priority=1)
    sim2.step()
    second = sim2.add(8, 2, priority=1)
    batch2 = sim2.sched.schedule()
    assert not batch2.preempted and second.status is SequenceStatus.WAITING
    assert first.status is SequenceStatus.RUNNING


def test_make_room_preempts_only_strictly_lower_priorities() -> None:
    sim = Sim(num_blocks=4, budget=64)
    low = sim.add(12, 30, priority=2)
    sim.step()
    incoming = Sequence("in", list(range(8)), SamplingParams(), sim.clock.now, 99,
                        priority=2)
    fitted, preempted = sim.sched.make_room(incoming, lambda: sim.kv.allocate(incoming, 8))
    assert not fitted and not preempted
    incoming.priority = 1
    fitted, preempted = sim.sched.make_room(incoming, lambda: sim.kv.allocate(incoming, 8))
    assert fitted and preempted == [low] and low.status is SequenceStatus.WAITING


def test_aging_lets_an_old_low_priority_request_run_despite_a_stream_of_high_ones() -> None:
    sim = Sim(num_blocks=64, max_seqs=1, aging_s=0.5)
    low = sim.add(4, 1, priority=10)
    finished: list[Sequence] = []
    for _ in range(2000):  # a new high-priority request every step, forever
        sim.add(4, 1, priority=0)
        finished += sim.step()
        if low in finished:
            break
    assert low in finished
    # priority 10 ranks with fresh priority-0 requests after 10 * 0.5 s (500 steps of 10 ms)
    assert sim.clock.now < 10 * 0.5 + 1.0


def test_router_admission_queue_orders_by_priority_then_arrival() -> None:
    clock = Clock()
    q = AdmissionQueue(by_priority=True, aging_s=100.0, clock=clock)
    a = q.enter(5)
    b = q.enter(0)
    c = q.enter(0)
    assert q.may_try(b) and not q.may_try(a)
    assert q.may_try(c)  # equal priorities poll side by side, as under FCFS
    q.leave(b)
    q.leave(c)
    assert q.may_try(a)
    fcfs = AdmissionQueue(by_priority=False, aging_s=100.0, clock=clock)
    x = fcfs.enter(5)
    fcfs.enter(0)
    assert fcfs.may_try(x)


def test_router_admission_queue_ages_waiters() -> None:
    clock = Clock()
    q = AdmissionQueue(by_priority=True, aging_s=1.0, clock=clock)
    old = q.enter(3)
    clock.now = 3.0
    q.enter(0)
    assert q.may_try(old)  # 3 levels better after 3 s: ranks with the fresh priority 0


# ------------------------------------------------------------------ the engine, for real


def _engine(policy: str, num_blocks: int) -> Any:
    from pdserve.engine.config import CacheConfig, EngineConfig
    from pdserve.engine.engine import Engine

    return Engine(EngineConfig(
        model="tiny", dtype="float32", device="cpu", detokenize=False,
        cache=CacheConfig(block_size=16, num_blocks=num_blocks, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=16,
                                  policy=policy)))


def _ttft(engine: Any, rid: str, prompt: list[int], priority: int) -> float:
    start = time.perf_counter()
    engine.add_request(rid, prompt, SamplingParams(max_tokens=4, temperature=0.0),
                       priority=priority)
    while True:
        for out in engine.step():
            if out.request_id == rid and out.new_token_ids:
                ttft = time.perf_counter() - start
                engine.abort(rid)
                return ttft


def test_high_priority_ttft_under_a_full_pool_stays_within_2x_of_idle() -> None:
    engine = _engine("priority", num_blocks=24)
    prompt = list(range(1, 41))  # 3 blocks
    idle = statistics.median(_ttft(engine, f"idle{i}", prompt, 0) for i in range(5))
    # Fill the pool: 8 low-priority requests of 2 blocks that grow until blocks run out.
    for i in range(8):
        engine.add_request(f"low{i}", list(range(100 + i, 120 + i)),
                           SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True),
                           priority=10)
    while engine.pool.num_free_blocks > 0 or engine.stats().num_waiting == 0:
        engine.step()
    assert engine.stats().num_running >= 6
    loaded = []
    for i in range(5):
        loaded.append(_ttft(engine, f"high{i}", prompt, 0))
        engine.step()  # the low-priority requests take their blocks back
    full = statistics.median(loaded)
    assert engine.stats().num_preemptions > 0
    assert full <= 2 * idle, (full, idle)
    assert engine.stats().num_running + engine.stats().num_waiting == 8  # none lost


def test_decode_reservation_preempts_lower_priority_only_under_priority_policy() -> None:
    for policy in ("fcfs", "priority"):
        engine = _engine(policy, num_blocks=8)
        for i in range(3):  # three running requests of 2 blocks, admitted with their KV
            assert engine.reserve(f"low{i}", list(range(10 * i + 1, 10 * i + 31)),
                                  SamplingParams(max_tokens=50, ignore_eos=True),
                                  priority=5) is not None
            engine.commit_kv(f"low{i}", 7)
        got = engine.reserve("high", list(range(200, 240)), SamplingParams(max_tokens=4),
                             priority=0)
        if policy == "fcfs":
            assert got is None and engine.stats().num_preemptions == 0
        else:
            assert got is not None and engine.stats().num_preemptions >= 1
            assert engine.request_status("low2") == "waiting"  # the youngest went first
            assert engine.request_status("low0") == "running"
        assert engine.reserve("equal", list(range(300, 340)), SamplingParams(max_tokens=4),
                              priority=5) is None  # equal priority never preempts


def test_a_reservation_that_preemption_cannot_fit_preempts_nobody() -> None:
    engine = _engine("priority", num_blocks=8)
    for i in range(2):  # two running low-priority requests of 2 blocks
        assert engine.reserve(f"low{i}", list(range(10 * i + 1, 10 * i + 31)),
                              SamplingParams(max_tokens=50, ignore_eos=True),
                              priority=5) is not None
        engine.commit_kv(f"low{i}", 7)
    assert engine.reserve("flight", list(range(100, 130)), SamplingParams(max_tokens=4),
                          priority=5) is not None  # its KV is still to come
    assert engine.reserve("peer", list(range(200, 230)), SamplingParams(max_tokens=4),
                          priority=0) is not None
    assert engine.blocks_in_flight(0) == 2 and engine.blocks_in_flight(5) == 0
    # 5 blocks wanted; preempting both low-priority requests frees 4: nobody is preempted.
    assert engine.reserve("high", list(range(300, 380)), SamplingParams(max_tokens=4),
                          priority=0) is None
    assert engine.stats().num_preemptions == 0
    assert engine.request_status("low0") == engine.request_status("low1") == "running"
    # 4 blocks wanted: both go.
    assert engine.reserve("high", list(range(300, 364)), SamplingParams(max_tokens=4),
                          priority=0) is not None
    assert engine.stats().num_preemptions == 2


# ------------------------------------------------------------------ through the service


def test_the_decode_worker_keeps_a_high_priority_reservation_until_low_priority_kv_lands(
        ) -> None:
    """Every block the high-priority reservation needs is held by low-priority reservations
    whose KV is in flight: the decode worker keeps the call (refusing lower priorities
    meanwhile) and answers it once one of them landed and could be preempted, preempting
    exactly that one; a kept call ends with None at its ``wait_s`` or on an abort."""
    from dataclasses import replace

    import ray

    from pdserve.worker.protocol import PrefillRequest, ReserveRequest, SamplingSpec
    from tests.service import ServiceThread

    service = ServiceThread("tiny", 1, 1, api_key=None, num_blocks=16,
                            scheduling_policy="priority")
    try:
        router = service.router
        assert router is not None
        decode = router.cluster.pool("decode")[0].actor
        prefill = router.cluster.pool("prefill")[0].actor
        spec = SamplingSpec(max_tokens=40, temperature=0.0, ignore_eos=True)
        inbox = router.inbox.endpoint
        lows = []
        for i in range(7):  # 14 of the 16 blocks, every one awaiting its KV
            req = ReserveRequest(f"low{i}", [50 + i, *range(100 + 20 * i, 116 + 20 * i)], spec,
                                 inbox, 30.0, priority=10)
            res = ray.get(decode.reserve.remote(req))
            assert res is not None and len(res.block_ids) == 2
            lows.append((req, res))
        high = ReserveRequest("high", list(range(1, 41)), spec, inbox, 30.0, priority=0,
                              wait_s=30.0)  # 3 blocks: 2 are free
        kept = decode.reserve.remote(high)
        assert not ray.wait([kept], timeout=0.5)[0]
        # 2 blocks are free, but they go to the kept reservation first.
        assert ray.get(decode.reserve.remote(replace(lows[0][0], request_id="low7"))) is None
        req, res = lows[0]
        result = ray.get(prefill.prefill.remote(PrefillRequest(
            req.request_id, req.prompt_token_ids, spec, res.target, res.block_ids, 0,
            time.time() + 20, priority=10)))
        assert result.ok
        got = ray.get(kept, timeout=10)
        assert got is not None and len(got.block_ids) == 3
        stats = ray.get(decode.stats.remote())
        assert stats["num_preemptions"] == 1 and stats["kept_reservations"] == 1
        # Kept, then refused when its wait is over.
        start = time.monotonic()
        assert ray.get(decode.reserve.remote(replace(high, request_id="late",
                                                     wait_s=0.3))) is None
        assert time.monotonic() - start >= 0.3
        # Kept, then refused by an abort.
        aborted = decode.reserve.remote(replace(high, request_id="gone"))
        assert not ray.wait([aborted], timeout=0.3)[0]
        ray.get(decode.abort.remote("gone", True))
        assert ray.get(aborted, timeout=5) is None
        for rid in ["high", "low0", *(req.request_id for req, _ in lows[1:])]:
            ray.get(decode.abort.remote(rid, True))
        stats = service.wait_idle()
        assert all(s["num_used_blocks"] == 0 for s in stats.values()), stats
    finally:
        service.stop()


def test_the_decode_worker_yields_its_steps_to_a_better_reservation_until_its_kv_lands(
        ) -> None:
    """A reservation of strictly better priority than every request on the decode worker
    stops its steps (the CPU goes to that request's prefill) until its KV lands, or for
    ``priority_yield_s`` at most; a reservation of no better priority stops nothing."""
    import ray

    from pdserve.worker.protocol import PrefillRequest, ReserveRequest, SamplingSpec
    from tests.service import ServiceThread

    service = ServiceThread("tiny", 1, 1, api_key=None, num_blocks=64,
                            scheduling_policy="priority", priority_yield_s=1.0)
    try:
        router = service.router
        assert router is not None
        decode = router.cluster.pool("decode")[0].actor
        prefill = router.cluster.pool("prefill")[0].actor
        inbox = router.inbox.endpoint

        def steps() -> int:
            return int(ray.get(decode.stats.remote())["steps"])

        def stepped_in(seconds: float) -> int:
            before = steps()
            time.sleep(seconds)
            return steps() - before

        def run(rid: str, prompt: list[int], max_tokens: int, priority: int) -> None:
            spec = SamplingSpec(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            res = ray.get(decode.reserve.remote(ReserveRequest(rid, prompt, spec, inbox, 30.0,
                                                               priority=priority)))
            assert res is not None
            result = ray.get(prefill.prefill.remote(PrefillRequest(
                rid, prompt, spec, res.target, res.block_ids, 0, time.time() + 20,
                priority=priority)))
            assert result.ok

        run("low", list(range(100, 117)), 1000, 10)  # decodes for the whole test
        assert stepped_in(0.3) >= 5
        spec = SamplingSpec(max_tokens=4, temperature=0.0)
        peer = ReserveRequest("peer", list(range(200, 240)), spec, inbox, 30.0, priority=10)
        assert ray.get(decode.reserve.remote(peer)) is not None
        assert stepped_in(0.3) >= 5  # equal priority: no yield
        high = ReserveRequest("high", list(range(1, 41)), spec, inbox, 30.0, priority=0)
        res = ray.get(decode.reserve.remote(high))
        assert res is not None
        time.sleep(0.05)  # a step in progress may end
        assert stepped_in(0.4) == 0
        result = ray.get(prefill.prefill.remote(PrefillRequest(
            "high", high.prompt_token_ids, spec, res.target, res.block_ids, 0,
            time.time() + 20, priority=0)))
        assert result.ok
        assert stepped_in(0.3) >= 5  # its KV landed: steps again
        # Its KV never comes: steps stop for priority_yield_s, then go on.
        lost = ReserveRequest("lost", list(range(300, 340)), spec, inbox, 30.0, priority=0)
        assert ray.get(decode.reserve.remote(lost)) is not None
        time.sleep(0.05)
        assert stepped_in(0.4) == 0
        time.sleep(0.7)
        assert stepped_in(0.3) >= 5
        stats = ray.get(decode.stats.remote())
        assert stats["yields"] == 2 and stats["held_turns"] > 0
        for rid in ("low", "peer", "high", "lost"):
            ray.get(decode.abort.remote(rid, True))
        stats = service.wait_idle()
        assert all(s["num_used_blocks"] == 0 for s in stats.values()), stats
    finally:
        service.stop()


def _stream_ttft(client: Any, prompt: list[int], priority: int) -> float:
    """Seconds to the first streamed token of a short high-priority request."""
    start = time.perf_counter()
    for chunk in client.stream(prompt, max_tokens=2, temperature=0.0, ignore_eos=True,
                               priority=priority, timeout=60):
        if chunk.token_ids:
            return time.perf_counter() - start
    raise AssertionError("no token streamed")


@pytest.mark.validation
def test_service_high_priority_ttft_under_a_full_decode_pool_stays_within_2x_of_idle(
        ) -> None:
    """On an idle 2-core machine within 2x in 11 runs of 11 (1.08-1.87x, median 1.33x);
    left out of ``make test`` (``pytest -m validation``) because a machine shared with
    other work fails it about one run in four: there (load average 4-24), since the decode worker
    yields its steps to a better reservation, the ratio was 0.54-2.54x, median 1.67x, within
    2x in 17 of 23 runs (the code before, interleaved: 0.99-5.94x, median 1.96x, 13 of 23;
    before the first token came with the prefill worker's answer and reservations were
    kept for KV in flight: 1.58-3.12x, median 2.35x, 1 of 12). The extra time is now mostly
    the reservation call (12.5 ms against 4.6-5.2 ms idle: the Ray call into the decode
    worker's busy process, its step in progress, the way back), then the prefill call
    (16.2 ms against 12.4 ms), while both workers, the router and the load share two cores.

    The real service (router + Ray workers, priority policy) with a small decode pool:
    12 clients (their own process) send low-priority requests back to back, more than the
    pool holds (the rest wait in the router's admission queue). A high-priority request
    goes before the waiting ones and its reservation preempts a running low-priority one:
    its TTFT stays within 2x of the idle pool's (medians of 5, interleaved with pauses of
    the load). Under FCFS the same test sees no preemption and the request queues behind
    them (measured 14.6x)."""
    import re
    import subprocess
    import sys

    from pdserve_client import Client
    from tests.service import ServiceThread

    # 16 blocks of 16 tokens per worker; a low-priority request holds 2 (17 + 15 tokens,
    # no growth past them), so 8 run and 4 wait. The clients run at the lowest CPU
    # priority: on a 2-core machine they would otherwise take the CPU the service needs.
    service = ServiceThread("tiny", 1, 1, api_key=None, num_blocks=16,
                            scheduling_policy="priority", admission_timeout_s=120.0)
    load = None
    try:
        with Client(service.target) as client:
            prompt = list(range(1, 41))  # 3 blocks
            _stream_ttft(client, prompt, 0)  # warm-up (first request's one-off costs)
            load = subprocess.Popen(["nice", "-n", "19", sys.executable, "-m",
                                     "tests.low_priority_load", service.target, "12"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert load.stdin is not None and load.stdout is not None
            router = service.router
            assert router is not None

            def full_pool() -> None:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:  # the pool is full and requests wait
                    stats = service.worker_stats()["decode-0"]
                    if stats["num_used_blocks"] >= 14 and router.flow.waiting >= 2:
                        return
                    time.sleep(0.02)
                raise AssertionError(f"the decode pool never filled: {stats}")

            def command(word: str, answer: str) -> None:
                load.stdin.write(word + "\n")
                load.stdin.flush()
                assert load.stdout.readline().strip() == answer

            # Idle and full-pool measurements interleaved (the machine's other load drifts).
            idle, loaded, waiting, preempted = [], [], [], 0
            for _ in range(5):
                full_pool()
                before = service.worker_stats()["decode-0"]["num_preemptions"]
                waiting.append(router.flow.waiting)
                loaded.append(_stream_ttft(client, prompt, 0))
                preempted += service.worker_stats()["decode-0"]["num_preemptions"] - before
                command("pause", "paused")
                service.wait_idle()
                idle.append(_stream_ttft(client, prompt, 0))
                command("resume", "resumed")
            out, _ = load.communicate("", timeout=60)
        kept = service.worker_stats()["decode-0"]["kept_reservations"]
        full, alone = statistics.median(loaded), statistics.median(idle)
        served = re.search(r"done (\d+) errors (\d+)", out)
        assert served is not None, out
        print(f"high-priority TTFT: idle {alone * 1e3:.0f} ms, full pool {full * 1e3:.0f} ms "
              f"({full / alone:.2f}x); preemptions {preempted}, kept reservations {kept}, "
              f"router waiting {waiting}, "
              f"low-priority requests served {served[1]}")
        assert served[2] == "0", out
        assert min(waiting) >= 1, waiting  # low-priority requests waited at the router
        assert preempted >= 1  # and running ones were preempted for the high-priority one
        assert full <= 2 * alone, (full, alone, loaded, idle)
        assert int(served[1]) >= 16  # the low-priority ones were served meanwhile
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait(10)
        service.stop()
