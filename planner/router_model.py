"""The router inside the simulation: the live ``pdserve.router.balancer`` and
``pdserve.router.prefix_index`` code, fed as the real router feeds them.

As ``pdserve.router.flow`` and ``server`` do: after each engine step that changed them, a
worker pushes its KV events (applied to the index at once) and its load (installed in the
router's view of it: prefill, pending prompt tokens and the worker's reported rate; decode,
used blocks and running plus awaiting sequences); every ``ping_interval_s`` the views are
refreshed from every worker's latest load as well; a request is first reserved on a decode
worker (``choose_decode``; retried with a 5..100 ms backoff while none has room, failed
after ``admission_timeout_s``), then sent to a prefill worker (``choose_prefill``), each
choice recorded in the views (``add_decode``, ``add_prefill``).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.planner.workers import DecodeSim, PrefillSim, SimRequest
from pdserve.router.balancer import (
    Balancer,
    BalancerConfig,
    LoadView,
    RouteRequest,
    WorkerLoad,
    make_balancer,
)
from pdserve.router.prefix_index import PrefixIndex


@dataclass(frozen=True, slots=True)
class RouterSettings:
    """The real router's defaults (``PoolConfig``, ``RouterConfig``, ``FlowConfig``)."""

    policy: str = "prefix_aware"
    ping_interval_s: float = 0.5
    admission_timeout_s: float = 30.0
    max_waiting: int = 256
    pending_ttl_s: float = 10.0
    fast: bool = False
    """Route with ``FastRouter`` (huge pools, no shared prefixes) instead of the live code."""


class SimRouter:
    """One router over the simulated pools; ``clock`` is the simulation's."""

    def __init__(self, prefill: Sequence[PrefillSim], decode: Sequence[DecodeSim],
                 hash_block_tokens: int, settings: RouterSettings, default_rate: float,
                 clock: Callable[[], float], seed: int) -> None:
        self.settings = settings
        self.prefill = {w.wid: w for w in prefill}
        self.decode = {w.wid: w for w in decode}
        self.index = PrefixIndex(hash_block_tokens, clock=clock,
                                 pending_ttl_s=settings.pending_ttl_s)
        for w in prefill:
            self.index.add_worker(w.wid, incarnation=w.wid)
        self.balancer: Balancer = make_balancer(
            settings.policy, self.index,
            config=BalancerConfig(default_prefill_tokens_per_s=default_rate),
            rng=random.Random(seed))
        self.prefill_view = LoadView(clock=clock, default_rate=default_rate)
        self.decode_view = LoadView(clock=clock)
        self.waiting = 0
        self.refresh()

    def refresh(self) -> None:
        """A monitor round: install every worker's current load."""
        self.prefill_view.update([_prefill_load(w) for w in self.prefill.values()])
        self.decode_view.update([_decode_load(w) for w in self.decode.values()])

    def push_prefill(self, w: PrefillSim) -> None:
        """``w`` ended an engine step: its KV events since the last push go to the index,
        its load to the view."""
        if w.events:
            self.index.apply_events(w.wid, w.batches, w.events, incarnation=w.wid)
            w.batches += 1
            w.events = []
        self.prefill_view.set_one(_prefill_load(w))

    def push_decode(self, w: DecodeSim) -> None:
        """``w``'s batch changed at a step boundary: its load goes to the view."""
        self.decode_view.set_one(_decode_load(w))

    def release(self, w: DecodeSim) -> None:
        """``w`` freed blocks or batch slots (the live views learn it at the next sample)."""

    def route(self, req: SimRequest) -> RouteRequest:
        return RouteRequest(str(req.idx), req.hashes, req.prompt)

    def choose_decode(self, req: SimRequest, route: RouteRequest) -> DecodeSim | None:
        """The decode worker to reserve on, or None (no room as far as the router knows,
        or the chosen worker refuses: it has less room than the router believed)."""
        choice = self.balancer.choose_decode(route, self.decode_view.current())
        if choice is None:
            return None
        worker = self.decode[choice.worker_id]
        blocks = worker.blocks_for(req)
        if not worker.can_reserve(blocks):
            return None
        self.decode_view.add_decode(worker.wid, choice.blocks_to_reserve)
        worker.used_blocks += blocks
        worker.awaiting += 1
        req.reserved_blocks = blocks
        return worker

    def choose_prefill(self, req: SimRequest, route: RouteRequest) -> PrefillSim:
        choice = self.balancer.choose_prefill(route, self.prefill_view.current())
        self.prefill_view.add_prefill(choice.worker_id, req.prompt - choice.cached_tokens)
        return self.prefill[choice.worker_id]


def _prefill_load(w: PrefillSim) -> WorkerLoad:
    return WorkerLoad(w.wid, pending_prefill_tokens=w.pending_tokens,
                      prefill_tokens_per_s=w.reported_rate)


def _decode_load(w: DecodeSim) -> WorkerLoad:
    return WorkerLoad(w.wid, free_blocks=w.total_blocks - w.used_blocks,
                      total_blocks=w.total_blocks, running_seqs=w.batch + w.awaiting,
                      max_running_seqs=w.max_seqs)


class FastRouter(SimRouter):
    """For pools too large to scan per request (hundreds of workers at thousands of
    requests a second): the same choices as ``prefix_aware`` on requests no worker holds a
    prefix of, in O(log N) a request.

    Prefill: the lowest predicted TTFT, ``max(0, drained_at(W) - now) + prompt / rate(W)``,
    where ``drained_at`` is when W's backlog (as the router's ``LoadView`` models it: reset
    at each stats sample, grown by this router's own routing, drained at W's rate) runs
    out; with equal rates that is the lowest ``drained_at``, kept in a heap. Decode: the
    most headroom after the reservation, also from a heap. Prefix caches are ignored: use
    the live router for workloads that share prefixes.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._pheap: list[tuple[float, int, str]] = []
        self._dheap: list[tuple[float, int, str]] = []
        self._drained: dict[str, float] = {}
        self._rate: dict[str, float] = {}
        self._dversion: dict[str, int] = {}
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._clock = self.index._clock  # noqa: SLF001 - the simulation's clock, shared

    def refresh(self) -> None:
        now = self.index._clock()  # noqa: SLF001
        default = self.balancer.config.default_prefill_tokens_per_s
        self._rate = {w.wid: w.reported_rate or default for w in self.prefill.values()}
        self._drained = dict.fromkeys(self.prefill, now)
        self._pheap = [(now, i, wid) for i, wid in enumerate(sorted(self.prefill))]
        heapq.heapify(self._pheap)
        self._dheap = []
        for wid, w in self.decode.items():
            self._dversion[wid] = self._dversion.get(wid, 0) + 1
            self._push_decode(w)

    def push_prefill(self, w: PrefillSim) -> None:
        w.events = []

    def push_decode(self, w: DecodeSim) -> None:
        """Headroom is tracked by ``release`` and the reservations themselves."""

    def route(self, req: SimRequest) -> RouteRequest:
        return None  # type: ignore[return-value]  # nothing here reads it

    def _push_decode(self, w: DecodeSim) -> None:
        free = (w.total_blocks - w.used_blocks) / w.total_blocks
        slots = 1 - (w.batch + w.awaiting + len(w.joins)) / w.max_seqs
        heapq.heappush(self._dheap, (-min(free, slots), self._dversion[w.wid], w.wid))

    def choose_decode(self, req: SimRequest, route: RouteRequest) -> DecodeSim | None:
        heap = self._dheap
        while heap:
            _, version, wid = heap[0]
            if version != self._dversion[wid]:
                heapq.heappop(heap)
                continue
            w = self.decode[wid]
            blocks = w.blocks_for(req)
            if not w.can_reserve(blocks):
                return None
            heapq.heappop(heap)
            w.used_blocks += blocks
            w.awaiting += 1
            req.reserved_blocks = blocks
            self._dversion[wid] += 1
            self._push_decode(w)
            return w
        return None

    def release(self, w: DecodeSim) -> None:
        """``w`` freed blocks or slots: its headroom grew."""
        self._dversion[w.wid] += 1
        self._push_decode(w)

    def choose_prefill(self, req: SimRequest, route: RouteRequest) -> PrefillSim:
        now = self._clock()
        drained_at, tie, wid = heapq.heappop(self._pheap)
        start = max(drained_at, now)
        end = start + req.prompt / self._rate[wid]
        self._drained[wid] = end
        heapq.heappush(self._pheap, (end, tie, wid))
        return self.prefill[wid]
