"""One request's path through the pools: reserve on a decode worker, prefill on a prefill
worker (KV streamed into the reservation), then stream the decode worker's tokens.

The router owns the text: it detokenizes, applies stop strings, and counts what it has
sent. That is what makes failover exact: if the decode worker dies mid-stream, the request
resumes on another one from the prompt plus the tokens already sent, so the client sees no
gap and no duplicate. The output goes on as it would have: greedy, and seeded too (the
workers start a resumed request's generator past one draw per token it carries; see
``pdserve.engine.sampler``).

A request with ``n`` > 1 runs its choices in one attempt (the decode worker forks them from
the prompt's KV). Until they streamed a token, a failed attempt is run again whole; after,
each unfinished choice resumes on its own as a request of one choice: its prompt is the
request's prompt plus that choice's output so far, its sampling what the fork gave it
(``seed + index``), so its tokens are those of a run without the failure. The first goes
ahead, the others follow once a decode worker holds its KV, and find the prompt's blocks
in the prefix caches. Choices that finished stay finished; each keeps its own text, stop
strings and usage.

A prefill worker dying, or a KV transfer failing, retries the attempt on another worker;
nothing decodes from KV that did not fully land (the decode worker admits a request only
when its connector reports every block received). The first token
comes back with the prefill worker's answer, once every block landed, and goes to the client
at once, not after the decode worker's step in progress and its commit; the decode worker's
stream, which starts with the same token, is read from its second.

Failover is for failures of workers, never of the request: a request that fails on its own
on a worker (it refused it, or its sampling failed there) fails with a short message and is
not tried elsewhere, and a request that was on two workers that died fails with UNAVAILABLE
instead of trying a third (it may be what killed them; choices resumed on their own that
were on one worker count its death once). When every worker of a pool is dead, admission
waits for the replacements, bounded by the request's deadline and the lease.

Several routers may serve one cluster: each admits on its own view of the decode pool (pushed
by the workers), and the decode worker is the authority on its blocks: it refuses a
reservation it cannot hold, and the router then tries the other decode workers at once
(waiting only when every one refused). Attempt ids carry the router's tag, so that the same
client request id sent to two routers never names one reservation twice.

Every attempt has its own id (``<request id>.<n>.<router tag>``): late messages of an
abandoned attempt cannot reach the next one, and every exit path releases the attempt on both
workers at once (``pdserve.router.attempt``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from pdserve.engine.hashing import hash_blocks
from pdserve.engine.outputs import StopChecker
from pdserve.engine.sampling import SamplingParams, TokenLogprobs
from pdserve.engine.sequence import Sequence
from pdserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from pdserve.router.admission import AdmissionQueue
from pdserve.router.attempt import (
    Attempt,
    AttemptCalls,
    Outcome,
    PrefillOutcome,
    RequestFailed,
)
from pdserve.router.balancer import (
    Balancer,
    DecodeChoice,
    NoWorkerAvailableError,
    PrefillChoice,
    RouteRequest,
    WorkerLoad,
)
from pdserve.router.cluster import Cluster, WorkerHandle
from pdserve.router.deltas import (
    Delta,
    apply_record,
    first_record,
    sampling_spec,
    without_first,
)
from pdserve.router.kv_pool import source_span
from pdserve.router.merge import merged
from pdserve.router.pool_loads import PoolLoads
from pdserve.router.stream import TokenInbox
from pdserve.worker.protocol import (
    PrefillRequest,
    PrefillResult,
    PullSource,
    ReserveRequest,
    TokenRecord,
    prompt_logprobs_from_wire,
)

logger = logging.getLogger(__name__)

_RESERVE_WAIT_S = 1.0
"""The longest a decode worker keeps a reservation for KV in flight; past it, the router's
usual back-off and the other decode workers take over."""


class RequestError(Exception):
    """A request that cannot be served; ``code`` names the gRPC status, ``param`` the
    request field at fault (None: the request as a whole), as OpenAI's error body does."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class FlowConfig:
    lease_s: float = 30.0
    admission_timeout_s: float = 30.0
    max_waiting: int = 256  # requests waiting for a decode reservation; past it: overload
    max_attempts: int = 4  # failed transfers before a request gives up
    max_worker_deaths: int = 1  # workers that may die under one request; one more fails it
    scheduling_policy: str = "fcfs"  # "priority": see pdserve.router.admission
    priority_aging_s: float = 10.0


@dataclass(slots=True, eq=False)
class _Choice:
    """One choice of a request as the router streams it: its tokens so far (``seq``: the
    request's prompt, then this choice's output), its text and stop strings (``stop``)."""

    index: int
    seq: Sequence
    stop: StopChecker
    finished: bool = False
    worker_finished: bool = False
    """It ended on the worker's word, not on a stop string seen here: nothing of it runs
    there any more."""


@dataclass(slots=True, eq=False)
class _Run:
    """What the attempts of one request share (several run at once when its choices were
    resumed each alone). Event loop only."""

    request_id: str
    choices: list[_Choice]
    arrival: float
    deadline: float | None
    priority: int
    timing: dict[str, float] = field(default_factory=dict)
    cached_tokens: int = 0
    prompt_lps: list[TokenLogprobs] | None = None
    sent_prompt_lps: bool = True
    attempts: int = 0
    """Attempts started (each one's id holds its number, unique in the request)."""
    failures: int = 0
    """Failed attempts (not deaths) before the choices were resumed each alone; each goes
    on counting its own from there, as a request of one choice would."""
    dead: set[tuple[str, int]] = field(default_factory=set)
    """The workers (id, generation) that died under the request."""
    waiting: int = 0
    """Its attempts waiting for a decode reservation now."""


PrefillObserver = Callable[[PrefillChoice, "PrefillResult | None", int], None]
"""Told of every prefill attempt: the balancer's choice, the result (None if the worker
died or the attempt was abandoned) and how many KV blocks it was to write."""


class Flow:
    """Runs requests for the router; owns the balancer's view of load."""

    def __init__(self, cluster: Cluster, inbox: TokenInbox, tokenizer: Tokenizer,
                 balancer: Balancer, eos_ids: tuple[int, ...], config: FlowConfig,
                 router_tag: str = "r") -> None:
        self.cluster = cluster
        self.inbox = inbox
        self.tokenizer = tokenizer
        self.balancer = balancer
        self.eos_ids = eos_ids
        self.config = config
        self.loads = PoolLoads(cluster)
        """The balancer's view of both pools (``on_load`` installs what workers push)."""
        self._attempts: dict[str, Attempt] = {}
        self.calls = AttemptCalls(cluster, on_stats=self.loads.refresh)
        self._waiting = 0
        self.admission = AdmissionQueue(config.scheduling_policy == "priority",
                                        config.priority_aging_s)
        self.failovers = 0
        self.refused_reservations = 0
        """Reservations a decode worker refused (it had not the room this router thought)."""
        self.router_tag = router_tag
        self.on_prefill: PrefillObserver | None = None

    @property
    def waiting(self) -> int:
        """Requests waiting for a decode reservation (admission control's queue)."""
        return self._waiting

    # ------------------------------------------------------------------ failures

    def on_worker_death(self, handle: WorkerHandle) -> None:
        for attempt in list(self._attempts.values()):
            if attempt.decode.worker_id == handle.worker_id:
                attempt.decode_died.set()
                self.inbox.inject(TokenRecord(attempt.id, [], error="decode worker died"))

    # ------------------------------------------------------------------ one request

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                       max_len: int, arrival: float,
                       deadline: float | None = None,
                       priority: int = 0) -> AsyncIterator[Delta]:
        """Stream the request's deltas. ``deadline`` (``time.monotonic()``): the client's,
        if it set one; waits for capacity or for workers end there at the latest.
        ``priority``: lower is admitted first under the priority policy. Raises
        ``RequestError``.

        With ``n`` > 1 the decode worker forks the choices in one attempt; once they
        streamed tokens, a failed attempt is not run again as a whole: each unfinished
        choice goes on alone (``_each_alone``)."""
        choices = []
        for index in range(params.n):
            seq = Sequence(request_id if index == 0 else f"{request_id}#{index}", prompt,
                           params, arrival, 0)
            seq.max_len = max_len
            choices.append(_Choice(index, seq, StopChecker(seq, IncrementalDetokenizer(
                self.tokenizer, prompt, skip_special_tokens=params.skip_special_tokens),
                self.eos_ids)))
        run = _Run(request_id, choices, arrival, deadline, priority,
                   sent_prompt_lps=params.prompt_logprobs is None)
        async with aclosing(self._run_choices(run, choices, params)) as deltas:
            async for delta in deltas:
                yield delta
        if not all(c.finished for c in choices):
            async with aclosing(self._each_alone(run, params)) as deltas:
                async for delta in deltas:
                    yield delta

    async def _each_alone(self, run: _Run, params: SamplingParams) -> AsyncIterator[Delta]:
        """Resume every unfinished choice of ``run`` as a request of its own. Its prompt is
        the request's prompt plus that choice's output so far, and its sampling what the
        decode worker gave it when it forked it (``SamplingParams.choice``: ``seed +
        index``; the workers skip the draws of its output so far), so that it goes on as it
        would have without the failure.

        The first goes ahead until a decode worker holds its KV (its second delta comes from
        that worker's stream, after the commit), then the others start, all at once: the
        prompt's full blocks are then in the prefix caches of the prefill worker and of that
        decode worker, where their reservations share them instead of each holding a copy."""
        left = [c for c in run.choices if not c.finished]
        logger.warning("%s: %d choices of %d resume each on its own", run.request_id,
                       len(left), len(run.choices))
        streams = [self._run_choices(run, [c], params.choice(c.index)) for c in left]
        try:
            ahead = 0
            while len(streams) > 1 and ahead < 2:
                try:
                    delta = await anext(streams[0])
                except StopAsyncIteration:
                    streams.pop(0)  # it finished already
                    break
                ahead += 1
                yield delta
            async with aclosing(merged(streams)) as deltas:
                async for _, delta in deltas:
                    yield delta
        finally:
            for stream in streams:
                await stream.aclose()  # a no-op for those that ended

    async def _run_choices(self, run: _Run, group: list[_Choice],
                           params: SamplingParams) -> AsyncGenerator[Delta, None]:
        """Stream ``group``'s deltas, attempt after attempt, until each of its choices
        finished. ``group`` is every choice of the request (``params.n`` of them: the decode
        worker forks them) or one choice going on alone (``params.n`` == 1). Returns with
        choices unfinished when an attempt of several failed after they streamed tokens:
        the caller then resumes each alone."""
        seq = group[0].seq
        failures = run.failures
        timing = run.timing
        while True:
            run.attempts += 1
            attempt = await self._admit(f"{run.request_id}.{run.attempts}.{self.router_tag}",
                                        seq, params, run)
            queue = self.inbox.open(attempt.id)
            try:
                outcome = await self._prefill(attempt, seq, params)
                if outcome.kind is Outcome.NO_WORKER:
                    await asyncio.sleep(0.05)  # raced a death: admission waits for one
                    continue
                if outcome.kind is Outcome.REQUEST:
                    raise RequestError("internal", "the request failed on its prefill "
                                       f"worker: {outcome.reason}")
                if outcome.kind is not Outcome.OK:
                    failures = self._count_failure(run, attempt, outcome.kind is Outcome.DIED,
                                                   failures, outcome.reason)
                    continue
                result = outcome.result
                assert result is not None
                if not timing.get("prefill_s"):
                    timing["prefill_s"] = result.prefill_s
                    if result.prompt_logprobs is not None and run.prompt_lps is None:
                        run.prompt_lps = prompt_logprobs_from_wire(result.prompt_logprobs)
                    timing["transfer_s"] = result.transfer_tail_s
                    run.cached_tokens = result.num_cached_tokens
                early = first_record(attempt.id, result, params)
                skip_first = early is not None
                while True:
                    if early is not None:
                        record, early = early, None
                    else:
                        record = await queue.get()
                        if skip_first and record.error is None and record.index == 0:
                            # The decode worker's stream starts with the first token that
                            # the client already has (from the prefill result).
                            record, skip_first = without_first(record), False
                    if record.error is not None:
                        if not record.retryable:
                            raise RequestError("internal", "the request failed on its decode "
                                               f"worker: {record.error[:200]}")
                        logger.warning("%s: %s; resuming after %s tokens", attempt.id,
                                       record.error,
                                       "/".join(str(c.seq.num_output_tokens) for c in group))
                        break
                    if not 0 <= record.index < len(group) or group[record.index].finished:
                        continue  # a choice already ended here (e.g. on a stop string)
                    choice = group[record.index]
                    delta = apply_record(choice.seq, choice.stop, record)
                    delta.index = choice.index
                    if not run.sent_prompt_lps and run.prompt_lps is not None:
                        delta.prompt_logprobs, run.sent_prompt_lps = run.prompt_lps, True
                    if "first_token_s" not in timing and delta.token_ids:
                        timing["first_token_s"] = time.monotonic() - run.arrival
                    if delta.finish_reason is not None:
                        choice.finished = True
                        choice.worker_finished = record.finish_reason is not None
                        delta.prompt_tokens = choice.seq.num_prompt_tokens
                        delta.completion_tokens = choice.seq.num_output_tokens
                        delta.cached_tokens = run.cached_tokens
                        delta.timing = timing
                        delta.decode_worker = attempt.decode.worker_id
                        if attempt.prefill is not None:
                            delta.prefill_worker = attempt.prefill.worker_id
                        if all(c.finished for c in group):
                            attempt.done = all(c.worker_finished for c in group)
                            if all(c.finished for c in run.choices):
                                timing["total_s"] = time.monotonic() - run.arrival
                            yield delta
                            return
                        yield delta
                    elif delta.token_ids or delta.text or delta.prompt_logprobs:
                        yield delta
                failures = self._count_failure(run, attempt, attempt.decode_died.is_set(),
                                               failures, record.error or "")
                if len(group) > 1 and any(c.seq.num_output_tokens for c in group):
                    run.failures = failures
                    return  # each goes on alone: the choices' outputs differ from here
            finally:
                self.inbox.close_request(attempt.id)
                self._attempts.pop(attempt.id, None)
                self.calls.release(attempt)

    def _count_failure(self, run: _Run, attempt: Attempt, died: bool, failures: int,
                       reason: str) -> int:
        """Count a failed attempt (``died``: one of its workers died); the failures so far
        of the choices it ran, or raise if the request may not be tried again. Deaths count
        per worker, for the whole request: the choices resumed alone that were on one
        worker that died count it once."""
        if died:
            dead = attempt.decode
            if attempt.prefill is not None and not attempt.decode_died.is_set():
                dead = attempt.prefill
            run.dead.add((dead.worker_id, dead.generation))
            if len(run.dead) > self.config.max_worker_deaths:
                raise RequestError(
                    "unavailable", f"the request was on {len(run.dead)} workers that died; it "
                    "is not tried on another (it may be what made them fail)")
        else:
            failures += 1
            if failures >= self.config.max_attempts:
                raise RequestError("unavailable", f"the request failed {failures} times on "
                                   f"its workers; last: {reason[:200]}")
        self.failovers += 1
        logger.info("%s failed (%s); trying again", attempt.id, reason[:200] or "worker died")
        return failures

    # ------------------------------------------------------------------ admission

    def _route(self, attempt_id: str, seq: Sequence) -> RouteRequest:
        hashes = hash_blocks(seq.token_ids, self.cluster.block_size)
        return RouteRequest(attempt_id, tuple(hashes), seq.num_tokens)

    async def _admit(self, attempt_id: str, seq: Sequence, params: SamplingParams,
                     run: _Run) -> Attempt:
        """Reserve blocks on a decode worker, waiting (bounded) while the pool is full, and
        while a pool has no live worker (until a replacement is up, the request's deadline
        or the lease, whichever comes first). The choices of one request resumed each alone
        wait as one request (``max_waiting``)."""
        if not run.waiting and self._waiting >= self.config.max_waiting:
            raise RequestError("resource_exhausted",
                               f"{self._waiting} requests already wait for decode capacity; "
                               "retry later")
        run.waiting += 1
        if run.waiting == 1:
            self._waiting += 1
        deadline, priority, timing = run.deadline, run.priority, run.timing
        ticket = self.admission.enter(priority)
        try:
            route = self._route(attempt_id, seq)
            start = time.monotonic()
            capacity_deadline = start + self.config.admission_timeout_s
            worker_deadline = min(deadline or math.inf, start + self.config.lease_s)
            delay = 0.005
            refused: set[str] = set()  # decode workers that refused this round
            while True:
                now = time.monotonic()
                missing = self.loads.missing_pools()
                if missing:
                    if now >= worker_deadline:
                        raise RequestError(
                            "unavailable", f"no {missing[0]} worker is alive (waited "
                            f"{now - start:.1f} s for a replacement)")
                elif self.admission.may_try(ticket):
                    loads = [ld for ld in self.loads.alive(self.loads.decode_view.current())
                             if ld.worker_id not in refused]
                    choice = self.balancer.choose_decode(route, loads) if loads else None
                    if choice is None and loads and self.admission.by_priority:
                        # The pool looks full: the decode worker may still make room by
                        # preempting requests of lower priority than this one.
                        choice = self._roomiest_decode(route, loads)
                    if choice is not None:
                        handle = self.cluster.workers[choice.worker_id]
                        # Under priority, the worker may keep the request while the blocks
                        # it needs wait for KV in flight (see ReserveRequest.wait_s); only
                        # the last one left to try, so that a refusal still moves the
                        # request on to the others at once.
                        wait_s = 0.0
                        if self.admission.by_priority and len(loads) == 1:
                            wait_s = max(0.0, min(_RESERVE_WAIT_S, capacity_deadline - now,
                                                  (deadline or math.inf) - now))
                        req = ReserveRequest(attempt_id, list(seq.token_ids),
                                             sampling_spec(seq, params), self.inbox.endpoint,
                                             self.config.lease_s, priority, wait_s)
                        try:
                            res = await self.calls.reserve(handle, req)
                        except RequestFailed as exc:
                            code = "invalid_argument" if exc.invalid else "internal"
                            raise RequestError(code, exc.reason) from None
                        if res is not None:
                            self.loads.decode_view.add_decode(handle.worker_id,
                                                        choice.blocks_to_reserve)
                            attempt = Attempt(attempt_id, handle, route)
                            attempt.priority = priority
                            attempt.reservation = res
                            attempt.reserved_at = time.time()
                            self._attempts[attempt_id] = attempt
                            timing.setdefault("queue_s", time.monotonic() - run.arrival)
                            return attempt
                        refused.add(handle.worker_id)  # no room there: try the others now
                        self.refused_reservations += 1
                        continue
                    refused.clear()
                    if deadline is not None and now >= deadline:
                        raise RequestError(
                            "deadline_exceeded",
                            f"the deadline passed after {now - start:.2f} s of waiting for "
                            f"decode capacity (prompt of {seq.num_tokens} tokens)")
                    if now > capacity_deadline:
                        raise RequestError(
                            "resource_exhausted",
                            f"no decode capacity for {now - start:.0f} s (prompt of "
                            f"{seq.num_tokens} tokens); retry later")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)
        finally:
            run.waiting -= 1
            if run.waiting == 0:
                self._waiting -= 1
            self.admission.leave(ticket)

    def _roomiest_decode(self, route: RouteRequest, loads: list[WorkerLoad]) -> DecodeChoice:
        best = max(loads, key=lambda ld: (ld.free_blocks, ld.worker_id))
        needed = self.balancer.blocks_needed(route)
        return DecodeChoice(best.worker_id, needed, 0, 0.0)

    def _pull_source(self, choice: PrefillChoice, route: RouteRequest) -> PullSource | None:
        """Where the chosen worker pulls its prompt's prefix from (policy ``kv_pool``):
        the run of blocks the balancer's main source holds confirmed, past what the chosen
        worker holds; None when there is none or the source is not alive."""
        if not choice.pulled_tokens or choice.pull_from is None:
            return None
        source = self.cluster.workers.get(choice.pull_from)
        pool_holders = getattr(self.balancer, "pool_holders", None)
        if source is None or not source.alive or pool_holders is None:
            return None
        first = choice.cached_tokens // self.cluster.block_size
        end = source_span(source.worker_id, first, pool_holders(route))
        if end <= first:
            return None
        # Past this the pull is slower than predicted by far: compute instead.
        timeout = min(max(1.0, 5 * choice.pull_s), 0.5 * self.config.lease_s)
        return PullSource(source.worker_id, source.actor, end, timeout)

    async def _prefill(self, attempt: Attempt, seq: Sequence,
                       params: SamplingParams) -> PrefillOutcome:
        """Choose a prefill worker and run the prefill (see ``AttemptCalls.prefill``)."""
        res = attempt.reservation
        assert res is not None
        route = attempt.route
        try:
            choice = self.balancer.choose_prefill(
                route, self.loads.alive(self.loads.prefill_view.current()))
        except NoWorkerAvailableError:
            return PrefillOutcome(Outcome.NO_WORKER)
        handle = self.cluster.workers[choice.worker_id]
        pull = self._pull_source(choice, route)
        if pull is None and choice.pulled_tokens:
            self.balancer.metrics.pulled_tokens -= choice.pulled_tokens  # computed after all
            choice = choice._replace(pulled_tokens=0)
        self.loads.prefill_view.add_prefill(handle.worker_id, seq.num_tokens - choice.cached_tokens
                                      - choice.pulled_tokens)
        skip = res.num_cached_tokens // res.block_size
        # Writes must start well inside the decode side's lease (see PrefillRequest).
        deadline = attempt.reserved_at + 0.9 * self.config.lease_s
        req = PrefillRequest(attempt.id, list(seq.token_ids), sampling_spec(seq, params),
                             res.target, res.block_ids, skip, deadline, attempt.priority, pull)
        outcome = await self.calls.prefill(attempt, handle, req)
        result = outcome.result
        if result is not None and result.ok:
            self.balancer.observe_ttft(attempt.id, result.prefill_s)
        if self.on_prefill is not None:
            num_blocks = -(-seq.num_tokens // res.block_size)
            self.on_prefill(choice, result, num_blocks - skip)
        return outcome
