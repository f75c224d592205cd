"""Global load balancer: picks the prefill worker and the decode worker of each request.

Prefill choice (policy ``prefix_aware``): the worker with the lowest predicted time to
first token,

    ttft(W) = pending_prefill_tokens(W) / rate(W)                 queue wait
            + (prompt_tokens - cached_tokens(W)) / rate(W)        the prefix W does not hold
            + prompt_tokens / transfer_rate(W)                    KV to the decode worker

with ``rate`` the worker's measured prefill tokens/s (``default_prefill_tokens_per_s`` until
it reports one) and ``cached_tokens`` read from the ``PrefixIndex``. The score adds the
pool's cost of a recompute,

    score(W) = ttft(W) + recompute_weight * (max_V cached_tokens(V) - cached_tokens(W)) / rate(W)

the GPU seconds W would spend on tokens another worker already holds: that time (and the
duplicate cache blocks) is paid by the requests queued behind, which ``ttft(W)`` alone does
not see. Locality and load live in one number: a worker holding the prefix wins unless its
queue makes it slower than recomputing elsewhere by more than that cost; with
``recompute_weight=0`` the choice is the plain lowest predicted TTFT. Scores closer than
``tie_tolerance_s`` are ties, broken by the injected ``random.Random``.
``round_robin`` and ``least_loaded`` are kept for comparison (``make_balancer``).

Policy ``kv_pool`` adds a cluster-wide prefix pool: a worker may pull the prompt's blocks it
lacks from the workers (prefill or decode) that hold them confirmed, up to the first block
no worker holds, when ``pdserve.router.kv_pool.PullCostModel`` says the pull beats the
compute. Its TTFT
gains the transfer term and loses the pulled tokens' compute,

    ttft(W) = pending_prefill_tokens(W) / rate(W)
            + (prompt_tokens - cached_tokens(W) - pulled_tokens(W)) / rate(W)
            + pull_s(pulled_tokens(W))                              bytes / link rate
            + prompt_tokens / transfer_rate(W)

and the recompute cost counts what W can reach (held or pulled) instead of what it holds.

Decode choice: among decode workers that can reserve the request's blocks (prompt plus the
first sampled token, less the prefix the worker already holds) without passing its batch
limit, the one left with the most headroom; ``None`` when none can, and ``DecodeQueue``
holds such requests up to a bound, past which it raises ``ResourceExhaustedError``.

Pure logic (no torch, Ray or gRPC), not thread-safe: the router's event loop owns it. The
service feeds it ``WorkerLoad`` snapshots (``LoadView`` keeps them current between samples)
and the KV events go to the ``PrefixIndex`` it was given.
"""

from __future__ import annotations

import math
import random
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar, NamedTuple

from pdserve.router.kv_pool import NO_PULL, PullCostModel, PullPlan, merge_holders, pool_reach
from pdserve.router.prefix_index import Clock, PrefixIndex

POLICIES = ("round_robin", "least_loaded", "prefix_aware", "kv_pool")
DEFAULT_POLICY = "prefix_aware"


class NoWorkerAvailableError(RuntimeError):
    """No alive worker to choose from (the service answers UNAVAILABLE)."""


class ResourceExhaustedError(RuntimeError):
    """The decode pool is full and the wait queue is at its bound (RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """One worker's load as last reported. Rates of 0 mean 'not measured yet'."""

    worker_id: str
    pending_prefill_tokens: int = 0
    prefill_tokens_per_s: float = 0.0
    transfer_tokens_per_s: float = 0.0
    free_blocks: int = 0
    total_blocks: int = 0
    running_seqs: int = 0
    max_running_seqs: int = 0
    """Decode batch limit; 0 = no limit."""
    alive: bool = True
    pull_bytes_per_s: float = 0.0
    """Measured rate at which this worker pulls KV from peers (0: the pull model's default)."""


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What the balancer needs of a request: its full-block hashes (``pdserve.engine.hashing``,
    computed once by the router) and its prompt length."""

    request_id: str
    block_hashes: tuple[int, ...]
    num_prompt_tokens: int

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            raise ValueError(f"num_prompt_tokens must be >= 0, got {self.num_prompt_tokens}")


class PrefillChoice(NamedTuple):
    worker_id: str
    predicted_ttft_s: float
    cached_tokens: int
    """Prompt tokens the chosen worker holds in its prefix cache (per the index)."""
    queue_wait_s: float
    prefill_s: float
    """Predicted compute time of the tokens the worker neither holds nor pulls."""
    pulled_tokens: int = 0
    """Prompt tokens the worker pulls from ``pull_from`` (policy ``kv_pool``)."""
    pull_from: str | None = None
    pull_s: float = 0.0
    """Predicted time of that pull."""


class DecodeChoice(NamedTuple):
    worker_id: str
    blocks_to_reserve: int
    cached_blocks: int
    """Leading prompt blocks the decode worker already holds (not transferred)."""
    headroom: float
    """min(free-block fraction left after the reservation, batch-slot fraction left)."""


@dataclass(frozen=True, slots=True)
class BalancerConfig:
    default_prefill_tokens_per_s: float = 10_000.0
    """Rate assumed for a worker that has not measured its own yet."""
    tie_tolerance_s: float = 1e-9
    """Scores closer than this are a tie, broken at random."""
    recompute_weight: float = 4.0
    """Seconds of score per second of recomputing tokens another worker holds (see the
    module docstring); 0 chooses by predicted TTFT alone."""
    max_tracked_predictions: int = 65_536
    """Predictions kept for ``observe_ttft``; the oldest are dropped past this."""
    pull: PullCostModel = field(default_factory=PullCostModel)
    """Costs of pulling cached blocks from another worker (policy ``kv_pool``)."""

    def __post_init__(self) -> None:
        if self.default_prefill_tokens_per_s <= 0:
            raise ValueError(
                "default_prefill_tokens_per_s must be positive, "
                f"got {self.default_prefill_tokens_per_s}"
            )
        if self.tie_tolerance_s < 0:
            raise ValueError(f"tie_tolerance_s must be >= 0, got {self.tie_tolerance_s}")
        if self.recompute_weight < 0:
            raise ValueError(f"recompute_weight must be >= 0, got {self.recompute_weight}")


@dataclass(slots=True)
class BalancerMetrics:
    """Counters of one balancer since it started (the service exports them)."""

    decisions: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Sum of the chosen workers' cached-prefix tokens (as predicted at the choice)."""
    pulled_tokens: int = 0
    """Sum of the tokens the chosen workers were to pull from others (``kv_pool``)."""
    ttft_observed: int = 0
    ttft_error_sum_s: float = 0.0
    """Sum of actual - predicted TTFT over observed requests."""
    ttft_abs_error_sum_s: float = 0.0
    decode_no_room: int = 0
    by_worker: dict[str, int] = field(default_factory=dict)

    @property
    def cached_fraction(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def ttft_mean_abs_error_s(self) -> float:
        return self.ttft_abs_error_sum_s / self.ttft_observed if self.ttft_observed else 0.0


class Balancer(ABC):
    """Chooses workers for requests. Subclasses pick the prefill worker; every policy
    predicts TTFT with the same formula (for metrics) and shares the decode choice.

    ``choose_prefill`` records the request's blocks as routed to the chosen worker in the
    prefill index (provisional until the worker's events confirm them).
    """

    name: ClassVar[str]

    def __init__(
        self,
        prefill_index: PrefixIndex,
        *,
        decode_index: PrefixIndex | None = None,
        config: BalancerConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.prefill_index = prefill_index
        self.decode_index = decode_index
        self.block_size = prefill_index.block_size
        self.config = config or BalancerConfig()
        self.rng = rng or random.Random()
        self.metrics = BalancerMetrics()
        self._predicted: OrderedDict[str, float] = OrderedDict()

    # --- prefill --------------------------------------------------------------------------

    def rate(self, load: WorkerLoad) -> float:
        """The worker's measured prefill rate, or the configured default."""
        if load.prefill_tokens_per_s > 0:
            return load.prefill_tokens_per_s
        return self.config.default_prefill_tokens_per_s

    def estimate(self, request: RouteRequest, load: WorkerLoad, cached_blocks: int) -> float:
        """Predicted TTFT on ``load``'s worker holding ``cached_blocks`` leading blocks."""
        rate = self.rate(load)
        cached = min(cached_blocks * self.block_size, request.num_prompt_tokens)
        ttft = (load.pending_prefill_tokens + request.num_prompt_tokens - cached) / rate
        if load.transfer_tokens_per_s > 0:
            ttft += request.num_prompt_tokens / load.transfer_tokens_per_s
        return ttft

    def candidates(self, request: RouteRequest, loads: Sequence[WorkerLoad]) -> list[PrefillChoice]:
        """Every alive worker with its predicted TTFT, sorted by worker id."""
        out = []
        for load in sorted(loads, key=lambda ld: ld.worker_id):
            if not load.alive:
                continue
            blocks = self.prefill_index.match(load.worker_id, request.block_hashes)
            cached = min(blocks * self.block_size, request.num_prompt_tokens)
            rate = self.rate(load)
            out.append(
                PrefillChoice(
                    worker_id=load.worker_id,
                    predicted_ttft_s=self.estimate(request, load, blocks),
                    cached_tokens=cached,
                    queue_wait_s=load.pending_prefill_tokens / rate,
                    prefill_s=(request.num_prompt_tokens - cached) / rate,
                )
            )
        return out

    def choose_prefill(self, request: RouteRequest, loads: Sequence[WorkerLoad]) -> PrefillChoice:
        """The prefill worker for ``request``; raises NoWorkerAvailableError if none alive."""
        cands = self.candidates(request, loads)
        if not cands:
            raise NoWorkerAvailableError(
                f"request {request.request_id}: no alive prefill worker among {len(loads)}"
            )
        choice = self._pick(request, cands)
        self._record(request, choice)
        return choice

    def _record(self, request: RouteRequest, choice: PrefillChoice) -> None:
        self.prefill_index.record_routed(choice.worker_id, request.block_hashes)
        m = self.metrics
        m.decisions += 1
        m.prompt_tokens += request.num_prompt_tokens
        m.cached_tokens += choice.cached_tokens
        m.pulled_tokens += choice.pulled_tokens
        m.by_worker[choice.worker_id] = m.by_worker.get(choice.worker_id, 0) + 1
        self._predicted[request.request_id] = choice.predicted_ttft_s
        while len(self._predicted) > self.config.max_tracked_predictions:
            self._predicted.popitem(last=False)

    @abstractmethod
    def scores(self, request: RouteRequest, candidates: Sequence[PrefillChoice]) -> list[float]:
        """The policy's score of each candidate, lower is better."""

    def _pick(self, request: RouteRequest, candidates: list[PrefillChoice]) -> PrefillChoice:
        """The lowest score among ``candidates`` (non-empty); ties at random."""
        scores = self.scores(request, candidates)
        best = min(scores)
        tied = [
            c
            for c, s in zip(candidates, scores, strict=True)
            if s <= best + self.config.tie_tolerance_s
        ]
        return tied[0] if len(tied) == 1 else self.rng.choice(tied)

    def observe_ttft(self, request_id: str, actual_ttft_s: float) -> float | None:
        """Record a request's actual TTFT; returns actual - predicted (None if unknown)."""
        predicted = self._predicted.pop(request_id, None)
        if predicted is None:
            return None
        err = actual_ttft_s - predicted
        self.metrics.ttft_observed += 1
        self.metrics.ttft_error_sum_s += err
        self.metrics.ttft_abs_error_sum_s += abs(err)
        return err

    # --- decode ---------------------------------------------------------------------------

    def blocks_needed(self, request: RouteRequest) -> int:
        """Blocks a decode worker reserves: the prompt plus the first sampled token."""
        return (request.num_prompt_tokens + 1 + self.block_size - 1) // self.block_size

    def choose_decode(
        self, request: RouteRequest, loads: Sequence[WorkerLoad]
    ) -> DecodeChoice | None:
        """The decode worker with the most headroom after reserving the request's blocks;
        ties go to fewer running sequences, then more cached blocks, then random.
        None when no alive worker has room (the caller queues the request)."""
        needed = self.blocks_needed(request)
        fits: list[tuple[DecodeChoice, int]] = []
        for load in sorted(loads, key=lambda ld: ld.worker_id):
            if not load.alive or load.total_blocks <= 0:
                continue
            if load.max_running_seqs and load.running_seqs >= load.max_running_seqs:
                continue
            cached = 0
            if self.decode_index is not None:
                cached = min(self.decode_index.match(load.worker_id, request.block_hashes), needed)
            to_reserve = needed - cached
            if to_reserve > load.free_blocks:
                continue
            headroom = (load.free_blocks - to_reserve) / load.total_blocks
            if load.max_running_seqs:
                headroom = min(headroom, 1 - (load.running_seqs + 1) / load.max_running_seqs)
            fits.append(
                (DecodeChoice(load.worker_id, to_reserve, cached, headroom), load.running_seqs)
            )
        if not fits:
            self.metrics.decode_no_room += 1
            return None
        best = max(c.headroom for c, _ in fits)
        tied = [f for f in fits if f[0].headroom >= best - 1e-12]
        fewest = min(r for _, r in tied)
        tied = [f for f in tied if f[1] == fewest]
        most = max(f[0].cached_blocks for f in tied)
        final = [f[0] for f in tied if f[0].cached_blocks == most]
        choice = final[0] if len(final) == 1 else self.rng.choice(final)
        if self.decode_index is not None:
            self.decode_index.record_routed(choice.worker_id, request.block_hashes)
        return choice


class RoundRobinBalancer(Balancer):
    """Alive workers in turn, by sorted worker id; ignores load and cache."""

    name = "round_robin"

    def __init__(
        self,
        prefill_index: PrefixIndex,
        *,
        decode_index: PrefixIndex | None = None,
        config: BalancerConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(prefill_index, decode_index=decode_index, config=config, rng=rng)
        self._next = 0

    def scores(self, request: RouteRequest, candidates: Sequence[PrefillChoice]) -> list[float]:
        return [0.0] * len(candidates)

    def _pick(self, request: RouteRequest, candidates: list[PrefillChoice]) -> PrefillChoice:
        choice = candidates[self._next % len(candidates)]
        self._next += 1
        return choice


class LeastLoadedBalancer(Balancer):
    """The shortest queue wait (pending prefill tokens over rate); ignores the cache."""

    name = "least_loaded"

    def scores(self, request: RouteRequest, candidates: Sequence[PrefillChoice]) -> list[float]:
        return [c.queue_wait_s for c in candidates]


class PrefixAwareBalancer(Balancer):
    """The lowest predicted TTFT (queue wait + uncached prefill + transfer) plus the
    weighted recompute of tokens another worker holds (module docstring)."""

    name = "prefix_aware"

    def scores(self, request: RouteRequest, candidates: Sequence[PrefillChoice]) -> list[float]:
        weight = self.config.recompute_weight
        most = max(c.cached_tokens for c in candidates)
        out = []
        for c in candidates:
            score = c.predicted_ttft_s
            if weight and most > c.cached_tokens:
                # (most - cached) / rate, with rate = (prompt - cached) / prefill_s;
                # prompt >= most > cached, so the division is safe.
                redo = most - c.cached_tokens
                score += weight * c.prefill_s * redo / (request.num_prompt_tokens - c.cached_tokens)
            out.append(score)
        return out


class KVPoolBalancer(PrefixAwareBalancer):
    """``prefix_aware`` over a cluster-wide prefix pool: each candidate may pull the blocks
    it lacks from the workers (prefill or decode) that hold them (module docstring)."""

    name = "kv_pool"

    def pool_holders(self, request: RouteRequest) -> list[list[str]]:
        """Per leading block of ``request``, the workers (prefill, and decode when a decode
        index is given) holding it confirmed; up to the first block none holds."""
        held = self.prefill_index.holders(request.block_hashes)
        if self.decode_index is None:
            return held
        return merge_holders(held, self.decode_index.holders(request.block_hashes))

    def plan_pull(
        self,
        request: RouteRequest,
        load: WorkerLoad,
        cached_tokens: int,
        holders: Sequence[Sequence[str]],
    ) -> PullPlan:
        """What ``load``'s worker, holding ``cached_tokens`` leading tokens, pulls given the
        per-block ``holders`` (``pool_holders``, or the caches' truth in a simulation): the
        blocks it lacks up to the pool's reach, when that beats computing them; else
        ``NO_PULL``."""
        pull = self.config.pull
        if not pull.enabled:
            return NO_PULL
        reach, source = pool_reach(load.worker_id, cached_tokens // self.block_size, holders)
        reach_tokens = min(reach * self.block_size, request.num_prompt_tokens)
        return pull.plan(cached_tokens, reach_tokens, source, self.rate(load),
                         load.pull_bytes_per_s)

    def candidates(self, request: RouteRequest, loads: Sequence[WorkerLoad]) -> list[PrefillChoice]:
        base = super().candidates(request, loads)
        if not base or not self.config.pull.enabled:
            return base
        by_id = {ld.worker_id: ld for ld in loads}
        holders = self.pool_holders(request)
        out = []
        for c in base:
            load = by_id[c.worker_id]
            plan = self.plan_pull(request, load, c.cached_tokens, holders)
            if plan.tokens == 0:
                out.append(c)
                continue
            rate = self.rate(load)
            out.append(c._replace(
                predicted_ttft_s=c.predicted_ttft_s - plan.tokens / rate + plan.seconds,
                prefill_s=c.prefill_s - plan.tokens / rate,
                pulled_tokens=plan.tokens, pull_from=plan.source, pull_s=plan.seconds,
            ))
        return out

    def scores(self, request: RouteRequest, candidates: Sequence[PrefillChoice]) -> list[float]:
        weight = self.config.recompute_weight
        reach = [c.cached_tokens + c.pulled_tokens for c in candidates]
        most = max(reach)
        out = []
        for c, r in zip(candidates, reach, strict=True):
            score = c.predicted_ttft_s
            if weight and most > r:
                # (most - r) / rate, with rate = (prompt - r) / prefill_s (as prefix_aware).
                score += weight * c.prefill_s * (most - r) / (request.num_prompt_tokens - r)
            out.append(score)
        return out


_REGISTRY: dict[str, type[Balancer]] = {
    cls.name: cls
    for cls in (RoundRobinBalancer, LeastLoadedBalancer, PrefixAwareBalancer, KVPoolBalancer)
}


def make_balancer(
    name: str,
    prefill_index: PrefixIndex,
    *,
    decode_index: PrefixIndex | None = None,
    config: BalancerConfig | None = None,
    rng: random.Random | None = None,
) -> Balancer:
    """The balancer of policy ``name`` (one of ``POLICIES``); ValueError for others."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown balancer policy {name!r}; choose one of {', '.join(POLICIES)}"
        ) from None
    return cls(prefill_index, decode_index=decode_index, config=config, rng=rng)


class LoadView:
    """A router's current picture of worker load between two samples.

    ``update`` installs a fresh sample; between samples each worker's pending prefill
    tokens drain at its rate (a fluid queue) and grow by what this router sends it
    (``add_prefill``), and decode reservations made by this router come off the free
    blocks (``add_decode``). Other routers' traffic is only seen at the next sample (pushed by
    the workers as their load changes: ``set_one``).
    """

    def __init__(self, *, clock: Clock = time.monotonic, default_rate: float = 10_000.0) -> None:
        self._clock = clock
        self._default_rate = default_rate
        self._loads: dict[str, WorkerLoad] = {}
        self._backlog: dict[str, tuple[float, float]] = {}  # worker -> (tokens, as of time)

    def update(self, loads: Sequence[WorkerLoad]) -> None:
        now = self._clock()
        self._loads = {ld.worker_id: ld for ld in loads}
        self._backlog = {ld.worker_id: (float(ld.pending_prefill_tokens), now) for ld in loads}

    def set_one(self, load: WorkerLoad) -> None:
        """Install a fresh sample of one worker (pushed with its KV events)."""
        self._loads[load.worker_id] = load
        self._backlog[load.worker_id] = (float(load.pending_prefill_tokens), self._clock())

    def _drained(self, worker_id: str, now: float) -> float:
        tokens, since = self._backlog[worker_id]
        load = self._loads[worker_id]
        rate = load.prefill_tokens_per_s if load.prefill_tokens_per_s > 0 else self._default_rate
        return max(0.0, tokens - rate * (now - since))

    def add_prefill(self, worker_id: str, tokens: int) -> None:
        """This router sent ``tokens`` tokens to compute to ``worker_id``."""
        if worker_id not in self._loads:
            return
        now = self._clock()
        self._backlog[worker_id] = (self._drained(worker_id, now) + tokens, now)

    def add_decode(self, worker_id: str, blocks: int) -> None:
        """This router reserved ``blocks`` blocks and one batch slot on ``worker_id``."""
        load = self._loads.get(worker_id)
        if load is not None:
            self._loads[worker_id] = replace(
                load,
                free_blocks=max(0, load.free_blocks - blocks),
                running_seqs=load.running_seqs + 1,
            )

    def current(self) -> list[WorkerLoad]:
        """The loads as this router now believes them, sorted by worker id."""
        now = self._clock()
        return [
            replace(ld, pending_prefill_tokens=math.ceil(self._drained(w, now)))
            for w, ld in sorted(self._loads.items())
        ]


class DecodeQueue:
    """Requests waiting for room in the decode pool, first come first served.

    ``push`` raises ResourceExhaustedError past ``bound`` waiting requests; ``drain``
    admits from the head while the balancer finds room (the head blocks the rest, so a
    large request is not starved) and returns requests that waited past ``max_wait_s``.
    """

    def __init__(
        self,
        balancer: Balancer,
        *,
        bound: int,
        max_wait_s: float,
        clock: Clock = time.monotonic,
    ) -> None:
        if bound < 0:
            raise ValueError(f"bound must be >= 0, got {bound}")
        self._balancer = balancer
        self._bound = bound
        self._max_wait_s = max_wait_s
        self._clock = clock
        self._queue: deque[tuple[RouteRequest, float]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, request: RouteRequest) -> None:
        if len(self._queue) >= self._bound:
            raise ResourceExhaustedError(
                f"request {request.request_id}: decode pool full and {len(self._queue)} "
                f"requests already waiting (bound {self._bound}); retry later"
            )
        self._queue.append((request, self._clock()))

    def drain(
        self, loads: Sequence[WorkerLoad]
    ) -> tuple[list[tuple[RouteRequest, DecodeChoice]], list[RouteRequest]]:
        """(admitted requests with their choice, in order; requests that timed out)."""
        now = self._clock()
        expired = [r for r, t in self._queue if now - t > self._max_wait_s]
        if expired:
            self._queue = deque((r, t) for r, t in self._queue if now - t <= self._max_wait_s)
        current = {ld.worker_id: ld for ld in loads}
        admitted: list[tuple[RouteRequest, DecodeChoice]] = []
        while self._queue:
            request = self._queue[0][0]
            choice = self._balancer.choose_decode(request, list(current.values()))
            if choice is None:
                break
            self._queue.popleft()
            ld = current[choice.worker_id]
            current[choice.worker_id] = replace(
                ld,
                free_blocks=ld.free_blocks - choice.blocks_to_reserve,
                running_seqs=ld.running_seqs + 1,
            )
            admitted.append((request, choice))
        return admitted, expired
