"""Priority scheduling (``--scheduling-policy priority``): lower values first in the
engine's waiting queue and the router's admission queue, the lowest-priority youngest
running request preempted first, FCFS among equals, and aging so nothing starves.

The scheduler tests drive the pure scheduler with a fake clock and a stand-in model step
(milliseconds); the router's admission queue is pure too.
"""

from __future__ import annotations

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
