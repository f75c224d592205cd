"""Scheduler: token budget, decode-first batching, preemption, progress, no leaks.

Driven by a pure-Python stand-in for the model step (each sequence's next token is a
function of its length), so thousands of schedules run in milliseconds.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine.block_pool import BlockPool
from pdserve.engine.config import SchedulerConfig
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.scheduler import ScheduledBatch, Scheduler
from pdserve.engine.sequence import Sequence, SequenceStatus


class Sim:
    """Scheduler + KV manager + a fake model; applies a batch the way the engine does."""

    def __init__(self, num_blocks: int, block_size: int, budget: int, max_seqs: int = 64):
        self.pool = BlockPool(num_blocks, block_size)
        self.kv = KVCacheManager(self.pool)
        self.sched = Scheduler(SchedulerConfig(budget, max_seqs), self.kv)
        self.finished: list[Sequence] = []
        self.order = 0

    def add(self, prompt: list[int], max_tokens: int) -> Sequence:
        seq = Sequence(f"r{self.order}", prompt, SamplingParams(max_tokens=max_tokens),
                       float(self.order), self.order)
        seq.max_len = len(prompt) + max_tokens
        self.order += 1
        self.sched.add(seq)
        return seq

    def step(self) -> ScheduledBatch:
        batch = self.sched.schedule()
        for seq in batch.decodes:
            seq.num_computed_tokens += 1
        for seq, n in batch.prefills:
            seq.num_computed_tokens += n
        for seq in batch.decodes + [s for s, _ in batch.prefills]:
            self.kv.cache_computed_blocks(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(seq.num_tokens % 50)
                if seq.num_tokens >= seq.max_len:
                    self.sched.remove(seq)
                    seq.status = SequenceStatus.FINISHED
                    self.kv.free(seq)
                    self.finished.append(seq)
        return batch


def test_decodes_first_then_prefill_chunks_within_budget() -> None:
    sim = Sim(num_blocks=64, block_size=4, budget=10)
    a = sim.add(list(range(6)), 3)
    b1 = sim.step()
    assert b1.prefills == [(a, 6)] and not b1.decodes
    b = sim.add(list(range(100, 120)), 2)
    b2 = sim.step()
    assert b2.decodes == [a]
    assert b2.prefills == [(b, 9)]  # 10-token budget minus one decode
    b3 = sim.step()
    assert b3.decodes == [a] and b3.prefills == [(b, 9)]
    b4 = sim.step()
    assert b4.prefills == [(b, 2)] and b4.num_tokens == 2  # a finished: 6 + 3 tokens


def test_prefix_hit_skips_cached_tokens() -> None:
    sim = Sim(num_blocks=64, block_size=4, budget=64)
    shared = list(range(16))
    first = sim.add(shared + [90, 91], 1)
    while not first.is_finished:
        sim.step()
    second = sim.add(shared + [70, 71, 72], 1)
    batch = sim.step()
    assert batch.prefills == [(second, 3)]
    assert second.num_cached_tokens == 16
    assert sim.kv.hit_tokens == 16 and sim.kv.queried_tokens == 18 + 19


def test_preempts_youngest_and_oldest_progresses() -> None:
    # 6 blocks of 4 tokens; three sequences that would need 4 blocks each when done.
    sim = Sim(num_blocks=6, block_size=4, budget=64)
    seqs = [sim.add(list(range(i * 10, i * 10 + 5)), 10) for i in range(3)]
    preempted: list[str] = []
    for _ in range(200):
        if len(sim.finished) == 3:
            break
        oldest = min((s for s in seqs if not s.is_finished), key=lambda s: s.sort_key)
        before = oldest.num_computed_tokens
        batch = sim.step()
        preempted += [s.request_id for s in batch.preempted]
        assert oldest.num_computed_tokens > before or oldest.is_finished
    assert len(sim.finished) == 3
    assert "r0" not in preempted and preempted  # the oldest is never the victim
    assert sim.pool.num_used_blocks == 0


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=12),
    block_size=st.sampled_from([1, 2, 4, 16]),
    budget=st.integers(1, 48),
    extra_blocks=st.integers(0, 30),
    aborts=st.lists(st.integers(0, 11), max_size=4),
    shared_prefix=st.integers(0, 20),
)
def test_any_workload_finishes_without_leaks(
    lengths: list[tuple[int, int]], block_size: int, budget: int, extra_blocks: int,
    aborts: list[int], shared_prefix: int,
) -> None:
    # The pool always fits the largest single request: the guarantee the engine checks.
    need = max(-(-(p + shared_prefix + o) // block_size) for p, o in lengths)
    sim = Sim(num_blocks=need + extra_blocks, block_size=block_size, budget=budget, max_seqs=5)
    seqs = [sim.add(list(range(shared_prefix)) + [1000 + i] * p, o)
            for i, (p, o) in enumerate(lengths)]
    steps = 0
    while sim.sched.num_unfinished:
        steps += 1
        if steps in aborts and steps - 1 < len(seqs) and not seqs[steps - 1].is_finished:
            victim = seqs[steps - 1]
            sim.sched.remove(victim)
            victim.status = SequenceStatus.FINISHED
            sim.kv.free(victim)
        batch = sim.step()
        assert batch.num_tokens <= budget
        assert not batch.is_empty or not sim.sched.num_unfinished
        held = sum(sim.kv.num_held(s) for s in sim.sched.running)
        shared = {b for s in sim.sched.running for b in s.block_ids}
        assert sim.pool.num_used_blocks == len(shared) <= held
        assert all(s.status is SequenceStatus.RUNNING for s in sim.sched.running)
        assert steps < 10_000
    for seq in seqs:
        assert seq.is_finished
    assert sim.pool.num_used_blocks == 0
    assert all(b.ref_cnt == 0 for b in sim.pool.blocks)
