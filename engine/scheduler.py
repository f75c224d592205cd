"""Continuous batching with chunked prefill and preemption by recompute.

Each step has a budget of ``max_num_batched_tokens`` new tokens. Running sequences are
served oldest first, decodes before prefill chunks (stall-free batching, as in
Sarathi-Serve); waiting sequences are admitted first-come first-served with the rest of the
budget. When blocks run out, the youngest running sequence is preempted: its blocks are
freed and it waits to recompute (prompt + output so far). The oldest sequence therefore
always makes progress: no deadlock, and no starvation since admission is FCFS.

Under the "priority" policy (``SchedulerConfig.policy``), a sequence's rank is its
effective priority (``priority`` minus one level per ``priority_aging_s`` seconds since
arrival; lower runs first), then its age. The waiting queue is served in rank order; the
victim of preemption is the running sequence of the worst rank (lowest priority, then
youngest); a waiting sequence whose effective priority is strictly better than a running
one's may preempt it to be admitted (``make_room`` does the same for a decode-role
reservation). Equal priorities behave exactly as FCFS. Aging bounds every wait: a request
of priority p that has waited ``(p - q) * priority_aging_s`` ranks with fresh requests of
priority q (and, being older, before them), and can no longer be preempted by them.
Pure Python, no torch. Not thread-safe.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pdserve.engine.config import SchedulerConfig
from pdserve.engine.kv_cache_manager import KVCacheManager, PrefixMatch
from pdserve.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    """One step's work: ``decodes`` take one token each; ``prefills`` pairs a sequence with
    the number of its next tokens to compute (a chunk of its prompt, or of its recompute)."""

    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    """Owns the waiting queue and the running list; asks the KV manager for blocks."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # kept in age order
        self.prefill_tokens_computed = 0  # tokens computed in prefill chunks, ever
        self.by_priority = config.policy == "priority"
        self.clock = clock  # arrival times of sequences are on this clock

    # ------------------------------------------------------------------ priority

    def effective_priority(self, seq: Sequence, now: float) -> int:
        """``seq.priority``, one level better per ``priority_aging_s`` of waiting."""
        waited = max(0.0, now - seq.arrival_time)
        return seq.priority - int(waited // self.config.priority_aging_s)

    def rank(self, seq: Sequence, now: float) -> tuple[int, float, int]:
        """Lower ranks run first and are preempted last."""
        prio = self.effective_priority(seq, now) if self.by_priority else 0
        return (prio, *seq.sort_key)

    def _victim(self, now: float) -> Sequence:
        """The running sequence to preempt first: the worst rank."""
        if not self.by_priority:
            return self.running[-1]
        return max(self.running, key=lambda s: self.rank(s, now))

    def _worse_victim(self, seq: Sequence, now: float) -> Sequence | None:
        """A running sequence of strictly lower effective priority than ``seq`` (the worst
        ranked), or None (never under FCFS)."""
        if not self.by_priority or not self.running:
            return None
        victim = self._victim(now)
        if self.effective_priority(victim, now) > self.effective_priority(seq, now):
            return victim
        return None

    def reclaimable(self, seq: Sequence, blocks_of: Callable[[Sequence], int]) -> int:
        """Blocks that ``make_room`` could free for ``seq``: ``blocks_of`` each running
        sequence of strictly lower effective priority (0 under FCFS)."""
        if not self.by_priority:
            return 0
        now = self.clock()
        mine = self.effective_priority(seq, now)
        return sum(blocks_of(s) for s in self.running if self.effective_priority(s, now) > mine)

    def make_room(self, seq: Sequence,
                  fits: Callable[[], bool]) -> tuple[bool, list[Sequence]]:
        """Try ``fits()`` (an allocation for ``seq``); while it fails, preempt a running
        sequence of strictly lower priority than ``seq`` (worst first) and try again.
        Returns whether it fitted and who was preempted (FCFS: nobody)."""
        preempted: list[Sequence] = []
        now = self.clock()
        while not fits():
            victim = self._worse_victim(seq, now)
            if victim is None:
                return False, preempted
            self._preempt(victim, ScheduledBatch())
            preempted.append(victim)
        return True, preempted

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)  # priority order is restored at each schedule()

    def add_running(self, seq: Sequence) -> None:
        """Join a sequence that already holds its blocks (KV filled from outside)."""
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.sort_key)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues (finished or aborted); the caller frees it."""
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.RUNNING and seq in self.running:
            self.running.remove(seq)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        # Preempted sequences are older than any never-admitted one: back to the front,
        # oldest first.
        if self.by_priority:
            now = self.clock()
            key = self.rank(seq, now)
            index = 0
            while index < len(self.waiting) and self.rank(self.waiting[index], now) < key:
                index += 1
        else:
            index = 0
            while index < len(self.waiting) and self.waiting[index].sort_key < seq.sort_key:
                index += 1
        self.waiting.insert(index, seq)
        batch.preempted.append(seq)

    def _unschedule(self, seq: Sequence, batch: ScheduledBatch) -> int:
        """Drop ``seq`` from this step's batch; return the tokens it had been given."""
        if seq in batch.decodes:
            batch.decodes.remove(seq)
            return 1
        for i, (s, n) in enumerate(batch.prefills):
            if s is seq:
                del batch.prefills[i]
                return n
        return 0

    def _running_in_order(self, now: float) -> Iterable[Sequence]:
        running = self.running
        if self.by_priority:
            running = sorted(running, key=lambda s: self.rank(s, now))
        decodes = [s for s in running if s.num_uncomputed_tokens == 1]
        chunks = [s for s in running if s.num_uncomputed_tokens > 1]
        return decodes + chunks

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        now = self.clock()
        if self.by_priority and len(self.waiting) > 1:
            self.waiting = deque(sorted(self.waiting, key=lambda s: self.rank(s, now)))
        for seq in list(self._running_in_order(now)):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self.kv.allocate(seq, num_new):
                victim = self._victim(now)
                budget += self._unschedule(victim, batch)
                self._preempt(victim, batch)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if num_new == 1 and seq.num_uncomputed_tokens == 1:
                batch.decodes.append(seq)
            else:
                batch.prefills.append((seq, num_new))
            budget -= num_new

        # Under FCFS nothing is admitted in a step that preempted (it would thrash); under
        # the priority policy a waiting sequence may preempt strictly lower priorities.
        while self.waiting and budget > 0 and (self.by_priority or not batch.preempted):
            seq = self.waiting[0]
            if len(self.running) >= self.config.max_num_seqs:
                victim = self._worse_victim(seq, now)
                if victim is None:
                    break
                budget += self._unschedule(victim, batch)
                self._preempt(victim, batch)
                continue
            prefix = PrefixMatch([], 0)
            first_admission = seq.num_cached_tokens < 0
            if seq.num_computed_tokens == 0:
                prefix = self.kv.match_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens - prefix.num_tokens, budget)
            if not self.kv.allocate(seq, num_new, prefix):
                victim = self._worse_victim(seq, now)
                if victim is None:
                    break
                budget += self._unschedule(victim, batch)
                self._preempt(victim, batch)
                continue  # the prefix is matched again: the victim's blocks are free now
            self.waiting.popleft()
            seq.num_computed_tokens += prefix.num_tokens
            if first_admission:
                seq.num_cached_tokens = prefix.num_tokens
                self.kv.record_lookup(seq.num_prompt_tokens, prefix.num_tokens)
            self.add_running(seq)
            batch.prefills.append((seq, num_new))
            budget -= num_new
        self.prefill_tokens_computed += sum(n for _, n in batch.prefills)
        return batch
