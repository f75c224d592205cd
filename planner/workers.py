"""Simulated prefill and decode workers: the engine's scheduling, step by step, timed by the
cost model. No per-token events: a decode worker jumps from one change of its batch (a
sequence joining or finishing) to the next in closed form.

A prefill worker is the engine in the prefill role: first-come first-served chunked prefill
under a token budget per step (running chunks first, then admissions up to the sequence
limit), a prefix cache (LRU of block hashes) looked up when a request is first scheduled,
and ``BlockStored`` / ``BlockRemoved`` events for the router's index when a prompt
completes. A decode worker runs one decode step after another over its batch; a sequence
joins at the first step boundary after its KV landed (the engine admits it between steps)
and leaves at the boundary where it has all its output tokens.

Pure Python (numpy-free); the simulation (``pdserve.planner.sim``) owns the clock.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque

from pdserve.engine.kv_events import BlockRemoved, BlockStored, KVEvent
from pdserve.planner.costs import HardwareCosts, attention_pairs
from pdserve.worker.prefill_rate import PrefillRate


class SimRequest:
    """One request in flight (the simulation's record of it)."""

    __slots__ = ("idx", "arrival", "prompt", "output", "hashes", "decode", "prefill",
                 "reserved_blocks", "cached", "computed", "first_step", "first_token",
                 "last_token", "join_step", "waited_since", "backoff")

    def __init__(self, idx: int, arrival: float, prompt: int, output: int,
                 hashes: tuple[int, ...]) -> None:
        self.idx = idx
        self.arrival = arrival
        self.prompt = prompt
        self.output = output
        self.hashes = hashes
        self.decode: DecodeSim | None = None
        self.prefill: PrefillSim | None = None
        self.reserved_blocks = 0
        self.cached = 0
        """Prompt tokens found in the prefill worker's cache."""
        self.computed = 0
        """Prompt tokens computed so far (cached ones included)."""
        self.first_step = -1.0
        self.first_token = -1.0
        self.last_token = -1.0
        self.join_step = 0
        self.waited_since = arrival
        self.backoff = 0.0


class PrefillSim:
    """One prefill worker."""

    def __init__(self, wid: str, costs: HardwareCosts, hash_block_tokens: int) -> None:
        self.wid = wid
        self.costs = costs
        self.hash_block_tokens = hash_block_tokens
        eng = costs.engine
        self.capacity = max(1, eng.num_blocks * eng.block_size // hash_block_tokens)
        self.budget = eng.max_num_batched_tokens
        self.max_seqs = eng.max_num_seqs
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.step: list[tuple[SimRequest, int]] = []
        self.busy = False
        self.version = 0
        self.events: list[KVEvent] = []
        """Events since the router last read them."""
        self.batches = 0
        self.rate = PrefillRate()
        """What the real worker reports as its rate: computed tokens over (first token minus
        arrival at the worker), across its last prefills, so queueing lowers it."""

    @property
    def reported_rate(self) -> float:
        return self.rate.tokens_per_s

    @property
    def pending_tokens(self) -> int:
        """Prompt tokens of the requests not yet through (as the real worker reports them:
        whole prompts, cached tokens included)."""
        return sum(r.prompt for r in self.waiting) + sum(r.prompt for r in self.running)

    def add(self, req: SimRequest) -> None:
        self.waiting.append(req)

    def plan_step(self, now: float) -> float:
        """Choose the step starting at ``now``; returns its duration in seconds (before
        host stretch), or -1.0 when there is nothing to run."""
        budget = self.budget
        step: list[tuple[SimRequest, int]] = []
        pairs = 0
        for req in self.running:
            if budget == 0:
                break
            chunk = min(req.prompt - req.computed, budget)
            step.append((req, chunk))
            pairs += attention_pairs(chunk, req.computed)
            budget -= chunk
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            req = self.waiting.popleft()
            hits = 0
            cache = self.cache
            for h in req.hashes:
                if h not in cache:
                    break
                cache.move_to_end(h)
                hits += 1
            # The engine recomputes at least the last prompt token (its logits).
            req.cached = min(hits * self.hash_block_tokens, req.prompt - 1)
            req.computed = req.cached
            req.first_step = now
            chunk = min(req.prompt - req.computed, budget)
            self.running.append(req)
            step.append((req, chunk))
            pairs += attention_pairs(chunk, req.computed)
            budget -= chunk
        self.step = step
        if not step:
            return -1.0
        return self.costs.prefill_step_s(self.budget - budget, pairs)

    def finish_step(self) -> list[tuple[SimRequest, int]]:
        """Apply the planned step; returns the requests whose prompt completed, each with
        the size of its last chunk."""
        done = []
        for req, chunk in self.step:
            req.computed += chunk
            if req.computed >= req.prompt:
                done.append((req, chunk))
        if done:
            finished = {id(r) for r, _ in done}
            self.running = [r for r in self.running if id(r) not in finished]
            for req, _ in done:
                self._store(req.hashes)
        self.step = []
        return done

    def _store(self, hashes: tuple[int, ...]) -> None:
        cache = self.cache
        new = []
        for h in hashes[: self.capacity]:
            if h in cache:
                cache.move_to_end(h)
            else:
                cache[h] = None
                new.append(h)
        evicted = []
        while len(cache) > self.capacity:
            evicted.append(cache.popitem(last=False)[0])
        if evicted:
            self.events.append(BlockRemoved(tuple(evicted)))
        if new:
            kept = [h for h in new if h in cache]
            if kept:
                self.events.append(BlockStored(tuple(kept), None, self.hash_block_tokens))


class DecodeSim:
    """One decode worker, advanced in closed form between batch changes.

    Step ``k`` (counted from the worker's start) of a batch of ``B`` sequences whose
    contexts sum to ``C + B * k`` lasts ``alpha + beta * k`` seconds (times the host's
    stretch), with ``alpha = d0 + d1 * B + d2 * C`` and ``beta = d2 * B``.
    """

    def __init__(self, wid: str, costs: HardwareCosts) -> None:
        self.wid = wid
        self.costs = costs
        eng = costs.engine
        self.block_size = eng.block_size
        self.total_blocks = eng.num_blocks
        self.max_seqs = eng.max_num_seqs
        self.used_blocks = 0
        self.awaiting = 0
        self.finishing: list[tuple[int, int, SimRequest]] = []
        """Heap of (counter at which it has every token, request index, request)."""
        self.batch = 0
        self.ctx_const = 0
        """C: sum over the batch of (prompt + 1 - join counter)."""
        self.anchor_t = 0.0
        self.anchor_k = 0
        self.stretch = 1.0
        self.joins: list[SimRequest] = []
        self.version = 0
        d = costs.decode.coef
        self._d = (d[0] + costs.overheads.decode_step_s, d[1], d[2])
        self.alpha = 0.0
        self.beta = 0.0
        self._recoef()

    def blocks_for(self, req: SimRequest) -> int:
        """Blocks the worker holds for ``req``: its whole sequence, reserved up front (the
        engine grows a reservation as tokens come and preempts when out of blocks; up front
        is the same until memory runs short), at most the whole cache."""
        return min(-(-(req.prompt + req.output) // self.block_size), self.total_blocks)

    def can_reserve(self, blocks: int) -> bool:
        return (self.used_blocks + blocks <= self.total_blocks
                and self.batch + self.awaiting + len(self.joins) < self.max_seqs)

    def _recoef(self) -> None:
        d0, d1, d2 = self._d
        self.alpha = (d0 + d1 * self.batch + d2 * self.ctx_const) * self.stretch
        self.beta = d2 * self.batch * self.stretch

    def token_rate(self) -> float:
        """Tokens a second the batch at the anchor streams, its steps unstretched."""
        return self.batch * self.step_rate()

    def step_rate(self) -> float:
        """Steps a second of the batch at the anchor (each a message of tokens to the
        router), unstretched."""
        if self.batch == 0:
            return 0.0
        d0, d1, d2 = self._d
        step = d0 + d1 * self.batch + d2 * (self.ctx_const + self.batch * self.anchor_k)
        return 1.0 / step if step > 0 else 0.0

    def set_stretch(self, stretch: float) -> None:
        """Steps from the anchor on run ``stretch`` times slower than alone."""
        self.stretch = stretch
        self._recoef()

    def time_to(self, counter: int) -> float:
        """Seconds from the anchor until the step counter reaches ``counter``."""
        k = self.anchor_k
        m = counter - k
        beta = self.beta
        return m * (self.alpha + beta * k) + beta * m * (m - 1) / 2

    def counter_at(self, t: float) -> int:
        """The step counter at the end of the step in progress at time ``t`` (the anchor's
        when ``t`` is not past it)."""
        dt = t - self.anchor_t
        if self.batch == 0 or dt <= 0:
            return self.anchor_k
        beta = self.beta
        a0 = self.alpha + beta * self.anchor_k
        if beta > 0:
            # beta/2 m^2 + (a0 - beta/2) m - dt = 0
            b = a0 - beta / 2
            m = (-b + math.sqrt(b * b + 2 * beta * dt)) / beta
        else:
            m = dt / a0
        k = self.anchor_k + max(0, math.floor(m))
        while self.time_to(k) < dt:
            k += 1
        while k > self.anchor_k and self.time_to(k - 1) >= dt:
            k -= 1
        return k

    def advance(self, counter: int) -> None:
        """Move the anchor to the boundary where the counter reaches ``counter``."""
        self.anchor_t += self.time_to(counter)
        self.anchor_k = counter

    def join(self, req: SimRequest) -> None:
        """``req`` enters the batch at the anchor (its first token is out now)."""
        req.join_step = self.anchor_k
        req.first_token = self.anchor_t
        self.awaiting -= 1
        if req.output <= 1:
            req.last_token = self.anchor_t
            self.used_blocks -= req.reserved_blocks
            return
        self.batch += 1
        self.ctx_const += req.prompt + 1 - self.anchor_k
        self._recoef()
        heapq.heappush(self.finishing, (self.anchor_k + req.output - 1, req.idx, req))

    def pop_finished(self) -> list[SimRequest]:
        """Requests whose last token came out at the anchor."""
        out = []
        while self.finishing and self.finishing[0][0] <= self.anchor_k:
            _, _, req = heapq.heappop(self.finishing)
            req.last_token = self.anchor_t
            self.batch -= 1
            self.ctx_const -= req.prompt + 1 - req.join_step
            self.used_blocks -= req.reserved_blocks
            out.append(req)
        if out:
            self._recoef()
        return out

    def next_finish(self) -> float:
        """When the next sequence of the batch has all its tokens (inf if none runs)."""
        if not self.finishing:
            return math.inf
        return self.anchor_t + self.time_to(self.finishing[0][0])
