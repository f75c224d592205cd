"""A simulated prefill (or decode) worker for the balancer harness: a FIFO queue in front
of one LRU prefix cache of block hashes, publishing the block pool's KV events.

Cache entries map a block hash to its last use (simulated seconds), oldest first.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

from pdserve.engine.kv_events import BlockRemoved, BlockStored, KVEvent


class SimWorker:
    """One simulated worker: FIFO queue, single server (prefill), LRU cache of blocks.
    A decode worker uses the cache alone."""

    def __init__(self, wid: str, capacity: int, rate: float, cache: OrderedDict[int, float]):
        self.wid = wid
        self.capacity = capacity
        self.rate = rate
        self.cache = cache
        self.queue: deque[Any] = deque()
        self.current: Any = None
        self.queued_tokens = 0
        self.busy_s = 0.0
        self.seq_no = 0

    def leading_hits(self, hashes: Sequence[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.cache:
                break
            n += 1
        return n

    def touch(self, h: int, now: float) -> None:
        """Mark block ``h`` (held) as used at ``now``."""
        self.cache[h] = now
        self.cache.move_to_end(h)

    def pending_tokens(self, now: float) -> int:
        running = 0.0
        if self.current is not None:
            running = max(0.0, (self.current.end - now) * self.rate)
        return self.queued_tokens + math.ceil(running)

    def insert(
        self, hashes: Sequence[int], block_size: int, cold: int = 0, now: float = 0.0
    ) -> list[KVEvent]:
        """Cache ``hashes`` as used at ``now``, but for new blocks among the first ``cold``
        (pulled from another worker: copies, put where eviction starts). Returns the block
        pool's events (a block both added and evicted here is reported in neither)."""
        hashes = hashes[: self.capacity]
        cache = self.cache
        new: set[int] = set()
        for i, h in enumerate(hashes):
            if h in cache:
                self.touch(h, now)
                continue
            new.add(h)
            if i < cold:
                cache[h] = next(iter(cache.values()), now)
                cache.move_to_end(h, last=False)
            else:
                cache[h] = now
        evicted = []
        while len(cache) > self.capacity:
            evicted.append(cache.popitem(last=False))
        events: list[KVEvent] = []
        gone = [h for h, _ in evicted if h not in new]
        if gone:  # evicted to make room, so reported before the new blocks
            events.append(BlockRemoved(tuple(gone)))
        run: list[int] = []
        parent: int | None = None
        for i, h in enumerate(hashes):
            if h in new and h in cache:
                if not run:
                    parent = hashes[i - 1] if i else None
                run.append(h)
            elif run:
                events.append(BlockStored(tuple(run), parent, block_size))
                run = []
        if run:
            events.append(BlockStored(tuple(run), parent, block_size))
        return events
