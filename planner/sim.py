"""A discrete-event simulation of the whole service: router, prefill pool, decode pool.

Events sit in one heap (time, sequence number, kind, ...); arrivals are merged in from the
sorted workload, never all pushed, and so are requests reaching their prefill worker (the
router's process does one piece of work at a time, ``Overheads.router_cpu_s`` a request in
all: its admission, after which the prefill is sent ``admission_s`` later, in order in a
queue, and the prefill's answer, whose first token goes on to the client). There are no
per-token events: a prefill worker has one event per engine step, a decode worker one per
change of its batch (``DecodeSim`` jumps between them in closed form). The router is the
live balancer and prefix index (``SimRouter``), or for huge prefix-free runs ``FastRouter``.
Timings come from a ``HardwareCosts``; with a ``host`` (workers sharing a machine's cores)
every step is stretched by the load of the moment (busy workers, the router at work, and
the tokens being streamed at the rate of the moment), and decode workers are re-anchored
when that load changes.

Deterministic: the same workload, costs, spec and seed give the same result.
Pure Python and numpy; no torch, Ray or gRPC.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from pdserve.planner.costs import HardwareCosts
from pdserve.planner.router_model import FastRouter, RouterSettings, SimRouter
from pdserve.planner.workers import DecodeSim, PrefillSim, SimRequest
from pdserve.planner.workload import Workload

(_RETRY, _STEP_END, _KV_LANDED, _BOUNDARY, _TICK, _ROUTER_IDLE, _RECEIVED,
 _RESERVED) = range(8)


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """What to simulate: pool sizes (workers are TP groups of ``costs.tp`` GPUs each)."""

    prefill_workers: int
    decode_workers: int
    router: RouterSettings = field(default_factory=RouterSettings)
    seed: int = 0
    idle_poll_s: float = 0.001
    """Mean delay before an idle engine loop notices new work (it waits 2 ms a turn)."""

    def __post_init__(self) -> None:
        if self.prefill_workers < 1 or self.decode_workers < 1:
            raise ValueError(f"need >= 1 worker per pool, got {self.prefill_workers}P"
                             f"{self.decode_workers}D")

    @property
    def label(self) -> str:
        return f"{self.prefill_workers}P{self.decode_workers}D"


@dataclass(frozen=True, slots=True)
class SimResult:
    """Per request (workload order): TTFT, TPOT and end-to-end seconds as a client would
    measure them (NaN for failed requests; TPOT NaN with one output token)."""

    spec: ClusterSpec
    ttft_s: np.ndarray
    tpot_s: np.ndarray
    e2e_s: np.ndarray
    ok: np.ndarray
    duration_s: float
    """First arrival to last completion (simulated)."""
    events: int
    wall_s: float
    prompt_tokens: int
    cached_tokens: int
    sent_s: np.ndarray | None = None
    """Per request, arrival to its prefill reaching its worker (the router's admission)."""
    prefilled_s: np.ndarray | None = None
    """Per request, its prefill reaching its worker to its first token there."""


class Simulation:
    """One run of ``workload`` on ``spec`` with ``costs``; ``run()`` once."""

    def __init__(self, workload: Workload, costs: HardwareCosts, spec: ClusterSpec) -> None:
        if not len(workload):
            raise ValueError("empty workload")
        self.workload = workload
        self.costs = costs
        self.spec = spec
        self.now = 0.0
        hb = workload.hash_block_tokens
        self.prefill = [PrefillSim(f"prefill-{i}", costs, hb) for i in range(spec.prefill_workers)]
        self.decode = [DecodeSim(f"decode-{i}", costs) for i in range(spec.decode_workers)]
        c = costs.prefill.coef
        default_rate = 1.0 / max(c[1], 1e-12)
        router_cls = FastRouter if spec.router.fast else SimRouter
        self.router = router_cls(self.prefill, self.decode, hb, spec.router, default_rate,
                                 lambda: self.now, spec.seed)
        self._heap: list[tuple] = []
        self._fifo: deque[tuple[float, PrefillSim, SimRequest]] = deque()
        self._seq = 0
        self._events = 0
        self._in_flight = 0
        self._busy = 0
        self._stretch = 1.0
        self._host = costs.host
        self._token_cpu = 0.0
        """CPU seconds per streamed token on the shared host (router and load generator)."""
        self._step_cpu = 0.0
        """CPU seconds per decode step's message of tokens on the shared host (router and
        load generator)."""
        if self._host is not None:
            self._token_cpu = costs.overheads.router_token_s + self._host.client_token_s
            self._step_cpu = costs.overheads.router_step_s + self._host.client_step_s
        self._token_cores = 0.0
        self._pre = costs.overheads.admission_s
        router_cpu = costs.overheads.router_cpu_s
        self._router_admit = router_cpu * costs.overheads.router_admit_share
        self._router_receive = router_cpu * costs.overheads.router_receive_share
        self._router_reply = router_cpu - self._router_admit - self._router_receive
        # The reservation call's trip: what a lone admission takes beyond the router's work.
        self._reserve_trip = max(0.0, self._pre - self._router_receive - self._router_admit)
        self._answer_wait = costs.overheads.answer_wait_s
        self._join_s = costs.overheads.decode_join_s
        self._awaiting = 0
        """Requests in flight without their first token."""
        self._router_free = 0.0
        self._router_busy = 0
        self._router_version = 0
        self._cached = 0
        self._ticks = 0
        self._ticking = False

    # ------------------------------------------------------------------ the loop

    def _push(self, t: float, *item: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, *item))

    def run(self) -> SimResult:
        t0 = time.perf_counter()
        wl = self.workload
        n = len(wl)
        hashes = wl.block_hashes
        self._first = np.full(n, math.nan)
        self._last = np.full(n, math.nan)
        self._sent = np.full(n, math.nan)
        self._replied = np.full(n, math.nan)
        self._waits = np.zeros(n)
        self._prefilled = np.full(n, math.nan)
        settings = self.spec.router
        tick = settings.ping_interval_s
        self._ticking = False  # router rounds only while requests are in flight
        heap = self._heap
        fifo = self._fifo
        heappop = heapq.heappop
        inf = math.inf
        i = 0
        chunk_end = 0
        arrival: list[float] = []
        prompt: list[int] = []
        output: list[int] = []
        while True:
            if i == chunk_end and i < n:  # Python lists, a chunk at a time: fast to index
                chunk_end = min(n, i + 65536)
                arrival = wl.arrival_s[i:chunk_end].tolist()
                prompt = wl.prompt_tokens[i:chunk_end].tolist()
                output = wl.output_tokens[i:chunk_end].tolist()
                base = i
            ta = arrival[i - base] if i < n else inf
            tf = fifo[0][0] if fifo else inf
            th = heap[0][0] if heap else inf
            if ta <= tf and ta <= th:
                if ta == inf:
                    break
                self.now = ta
                if not self._ticking:
                    self._ticking = True
                    self._ticks += 1
                    self._push(ta + tick, _TICK, self._ticks)
                self._in_flight += 1
                self._awaiting += 1
                j = i - base
                self._admit(SimRequest(i, ta, prompt[j], output[j], hashes[i]))
                i += 1
                continue
            self._events += 1
            if tf <= th:
                t, worker, req = fifo.popleft()
                self.now = t
                self._prefill_arrive(worker, req)
                continue
            item = heappop(heap)
            self.now = item[0]
            kind = item[2]
            if kind == _BOUNDARY:
                self._boundary(item[3], item[4], item[5])
            elif kind == _STEP_END:
                if item[4] == item[3].version:
                    self._step_end(item[3])
            elif kind == _KV_LANDED:
                self._landed(item[3])
            elif kind == _RECEIVED:
                # The reservation goes out once the router has taken in what came with it.
                self._push(max(self.now, self._router_free) + self._reserve_trip, _RESERVED,
                           item[3], item[4])
            elif kind == _RESERVED:
                self._reserved(item[3], item[4])
            elif kind == _RETRY:
                self.router.waiting -= 1
                self._admit(item[3])
            elif kind == _ROUTER_IDLE:
                if item[3] == self._router_version:
                    self._router_busy = 0
                    self._set_busy(0)
            elif kind == _TICK:
                self.router.refresh()
                if self._in_flight:
                    self._ticks += 1
                    self._push(self.now + tick, _TICK, self._ticks)
                else:
                    self._ticking = False
        return self._result(time.perf_counter() - t0)

    # ------------------------------------------------------------------ router

    def _admit(self, req: SimRequest) -> None:
        router = self.router
        route = router.route(req)
        worker = router.choose_decode(req, route)
        if worker is None:
            settings = self.spec.router
            waited = self.now - req.arrival
            if waited > settings.admission_timeout_s or (
                    req.backoff == 0.0 and router.waiting >= settings.max_waiting):
                self._fail(req)
                return
            req.backoff = min(req.backoff * 2, 0.1) if req.backoff else 0.005
            router.waiting += 1
            self._push(self.now + req.backoff, _RETRY, req)
            return
        req.decode = worker
        prefill = router.choose_prefill(req, route)
        if self._router_receive > 0:
            # The router's process serves one piece of work at a time, what is ready in
            # order: it takes in every request of a burst before their reservations go out,
            # and admits each when its reservation answers.
            start = self._router_work(self._router_receive)
            self._push(start + self._router_receive, _RECEIVED, prefill, req)
            return
        # Times that never decrease keep these in order: a queue, not the heap.
        # The router's process serves one piece of work at a time (a request's admission,
        # ``router_cpu_s`` times ``router_admit_share``); the prefill is sent
        # ``admission_s`` after the router took it up.
        start = self._router_work(self._router_admit)
        self._fifo.append((start + self._pre, prefill, req))

    def _reserved(self, prefill: PrefillSim, req: SimRequest) -> None:
        """The reservation answered: the router admits the request (its work in turn) and
        sends the prefill."""
        start = self._router_work(self._router_admit)
        self._fifo.append((start + self._router_admit, prefill, req))

    def _router_work(self, seconds: float) -> float:
        """Queue ``seconds`` of the router process's CPU now; returns when it starts."""
        start = max(self.now, self._router_free)
        self._router_free = start + seconds
        if seconds > 0:  # its process takes a core while it works
            self._router_version += 1
            self._push(self._router_free, _ROUTER_IDLE, self._router_version)
            if not self._router_busy:
                self._router_busy = 1
                self._set_busy(0)
        return start

    def _fail(self, req: SimRequest) -> None:
        req.first_token = req.last_token = math.nan
        self._in_flight -= 1
        self._awaiting -= 1

    # ------------------------------------------------------------------ prefill

    def _prefill_arrive(self, w: PrefillSim, req: SimRequest) -> None:
        req.prefill = w
        self._sent[req.idx] = self.now
        req.waited_since = self.now  # the worker's own clock for its reported rate
        w.add(req)
        if not w.busy:
            self._start_step(w)

    def _start_step(self, w: PrefillSim) -> None:
        seconds = w.plan_step(self.now)
        if seconds < 0:
            if w.busy:
                w.busy = False
                self._set_busy(-1)
            return
        if not w.busy:
            w.busy = True
            self._set_busy(+1)
        w.version += 1
        self._push(self.now + seconds * self._stretch, _STEP_END, w, w.version)

    def _step_end(self, w: PrefillSim) -> None:
        costs = self.costs
        for req, last_chunk in w.finish_step():
            computed = req.prompt - req.cached
            self._cached += req.cached
            self._prefilled[req.idx] = self.now
            w.rate.record(computed, self.now - req.waited_since)
            # Blocks stream out after every chunk: what is left at the end is the last
            # chunk, plus whatever the link could not keep up with.
            behind = costs.transfer_s(computed) - (self.now - req.first_step)
            tail = max(costs.transfer_s(last_chunk), behind)
            self._push(self.now + tail, _KV_LANDED, req)
        self._start_step(w)
        # As the worker does after each step: push its KV events and load to the router.
        self.router.push_prefill(w)

    # ------------------------------------------------------------------ decode

    def _landed(self, req: SimRequest) -> None:
        # The prefill call answers: the router takes the first token up and sends it on.
        if self._router_reply > 0:
            self._router_work(self._router_reply)
            replied = self._router_free
        else:
            replied = self.now
        # The answers of a burst cross the same processes one after another, and each
        # request's stream follows its first token there.
        self._awaiting -= 1
        self._waits[req.idx] = self._answer_wait * self._awaiting
        self._replied[req.idx] = replied
        d = req.decode
        assert d is not None
        d.joins.append(req)
        if d.anchor_t >= self.now and d.joins[:-1]:
            return  # a boundary is already due at the anchor for earlier joins
        if d.batch == 0:
            d.anchor_t = max(d.anchor_t, self.now + self.spec.idle_poll_s)
        elif d.anchor_t < self.now:
            d.advance(d.counter_at(self.now))
        self._schedule(d, d.anchor_k)

    def _schedule(self, d: DecodeSim, counter: int) -> None:
        d.version += 1
        self._push(d.anchor_t + d.time_to(counter), _BOUNDARY, d, d.version, counter)

    def _boundary(self, d: DecodeSim, version: int, counter: int) -> None:
        if version != d.version:
            return
        was_busy = d.batch > 0
        if counter > d.anchor_k:
            d.advance(counter)
        finished = d.pop_finished()
        for req in finished:
            self._complete(req)
        joins, d.joins = d.joins, []
        for req in joins:
            d.join(req)
            if req.output <= 1:
                self._complete(req)
        if joins and self._join_s > 0:
            # The worker's own work on the requests that joined holds up its next step.
            d.anchor_t += self._join_s * len(joins) * d.stretch
        if finished:
            self.router.release(d)
        if finished or joins:
            self.router.push_decode(d)
        if d.batch > 0:
            self._schedule(d, d.finishing[0][0])
        busy = 0 if was_busy == (d.batch > 0) else (1 if d.batch > 0 else -1)
        if (self._token_cpu > 0 or self._step_cpu > 0) and (finished or joins):
            self._token_cores = sum(self._token_cpu * w.token_rate()
                                    + self._step_cpu * w.step_rate() for w in self.decode)
            self._set_busy(busy)
        elif busy:
            self._set_busy(busy)

    def _complete(self, req: SimRequest) -> None:
        self._first[req.idx] = req.first_token
        self._last[req.idx] = req.last_token
        self._in_flight -= 1
        if self._in_flight == 0 and self.costs.host is not None:
            self._set_busy(0)

    # ------------------------------------------------------------------ shared cores

    def _set_busy(self, delta: int) -> None:
        self._busy += delta
        host = self._host
        if host is None:
            return
        stretch = host.stretch(self._busy, self._in_flight > 0, self._router_busy,
                               len(self.prefill) + len(self.decode), self._token_cores)
        if stretch == self._stretch:
            return
        self._stretch = stretch
        for d in self.decode:
            if d.batch == 0:
                d.set_stretch(stretch)
                continue
            if d.anchor_t < self.now:
                d.advance(d.counter_at(self.now))
            d.set_stretch(stretch)
            self._schedule(d, d.anchor_k)

    # ------------------------------------------------------------------ results

    def _result(self, wall_s: float) -> SimResult:
        post = self.costs.overheads.request_s
        arrival = self.workload.arrival_s
        first, last = self._first, self._last
        ok = ~np.isnan(first)
        # The first token reaches the client from the prefill's answer (the decode worker
        # streams the tokens after it).
        ttft = np.where(ok, self._replied, math.nan) + self._waits + post - arrival
        e2e = last + self._waits + post - arrival
        out = self.workload.output_tokens
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(out > 1, (e2e - ttft) / np.maximum(out - 1, 1), math.nan)
        end = float(np.nanmax(last)) + post if ok.any() else float(arrival[-1])
        return SimResult(self.spec, ttft, tpot, e2e, ok, max(end - float(arrival[0]), 1e-9),
                         self._events, wall_s, int(self.workload.prompt_tokens.sum()),
                         self._cached, self._sent - arrival, self._prefilled - self._sent)


def simulate(workload: Workload, costs: HardwareCosts, spec: ClusterSpec) -> SimResult:
    """Run one simulation (see ``Simulation``)."""
    return Simulation(workload, costs, spec).run()
