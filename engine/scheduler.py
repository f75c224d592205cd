"""Continuous batching with chunked prefill and preemption by recompute.

Each step has a budget of ``max_num_batched_tokens`` new tokens. Running sequences are
served oldest first, decodes before prefill chunks (stall-free batching, as in
Sarathi-Serve); waiting sequences are admitted first-come first-served with the rest of the
budget. When blocks run out, the youngest running sequence is preempted: its blocks are
freed and it waits to recompute (prompt + output so far). The oldest sequence therefore
always makes progress: no deadlock, and no starvation since admission is FCFS.
Pure Python, no torch. Not thread-safe.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable
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

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # kept in age order
        self.prefill_tokens_computed = 0  # tokens computed in prefill chunks, ever

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

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

    def _running_in_order(self) -> Iterable[Sequence]:
        decodes = [s for s in self.running if s.num_uncomputed_tokens == 1]
        chunks = [s for s in self.running if s.num_uncomputed_tokens > 1]
        return decodes + chunks

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        for seq in list(self._running_in_order()):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self.kv.allocate(seq, num_new):
                victim = self.running[-1]
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

        while (
            self.waiting
            and budget > 0
            and not batch.preempted
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            prefix = PrefixMatch([], 0)
            first_admission = seq.num_cached_tokens < 0
            if seq.num_computed_tokens == 0:
                prefix = self.kv.match_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens - prefix.num_tokens, budget)
            if not self.kv.allocate(seq, num_new, prefix):
                break
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
