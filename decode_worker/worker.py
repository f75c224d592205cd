"""The decode worker: reserves blocks for prompts, receives their KV, decodes, streams.

One ``Engine`` in the decode role, driven by an ``EngineDriver`` thread, and one KV connector
around the engine's cache. Admission control lives here: ``reserve`` refuses (returns None)
when the blocks are not free, so a full pool makes the router wait or reject instead of
freezing. A reservation becomes a running sequence only when the connector reports every
block landed; if its transfer fails or its lease expires, the blocks are freed once no late
write can reach them (``reuse_after``) and the router is told. An abort whose caller knows no
write can land any more (``writes_done``) frees them at once.

Under the priority policy a reservation may have to wait for nothing but KV in flight: its
blocks are held by reservations of lower priority that cannot be preempted until their KV
lands. Such a request is kept (for at most its ``wait_s``) and granted on the turn of the
loop where enough of them landed, before any step and before any other call: the router
gets its answer then, not after a refusal and a back-off. While one is kept, requests of no
better priority are refused, so that blocks freed meanwhile go to it; a kept request is
granted only when that frees enough blocks (``Engine.reserve`` preempts nobody otherwise).

A reservation of strictly better priority than every request on the worker (under a full
pool, one that preempted) makes the worker yield: it takes no step until that request's KV
lands (or for ``SchedulerConfig.priority_yield_s`` at most), so that where the workers and
the router share CPU cores the request's prefill, transfer and first token do not compete
with decode steps of the requests it outranks. Once its KV landed the request runs first.

Token batches go to each router's inbox over ZMQ PUSH, sealed with the cluster's key
(``pdserve.kvtransfer.auth``, channel ``tokens/<endpoint>``). A request that fails on its own
(its sampling, a first token it cannot take) is reported as a non-retryable error record;
the engine and every other request go on.

Each router renews its lease on this worker with every liveness ping (``ping(router=...)``);
the requests of a router silent for longer than the lease (it died) are ended here and their
blocks freed, so that nothing a dead router held stays reserved or decoding.

Used as a Ray actor (``pdserve.router.cluster`` wraps it); every public method is async, so Ray runs
them on the actor's event loop while the engine runs on its own thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from pdserve.engine.config import EngineConfig
from pdserve.engine.driver import EngineStoppedError
from pdserve.engine.outputs import RequestOutput
from pdserve.kvtransfer.auth import ChannelKey, Sealer
from pdserve.worker.base import EngineWorker
from pdserve.worker.idle_cores import CoreShare
from pdserve.worker.protocol import (
    ReserveRequest,
    ReserveResult,
    TokenRecord,
    encode_batch,
    logprobs_from_wire,
    logprobs_to_wire,
    sampling_params,
    token_channel,
)

if TYPE_CHECKING:
    from pdserve.engine.engine import Engine
    from pdserve.kvtransfer.base import PollResult


logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Kept:
    """A reservation waiting for KV in flight (driver thread only)."""

    req: ReserveRequest
    until: float  # time.monotonic(): refused then if not granted
    answer: Future[ReserveResult | None]


class DecodeWorker(EngineWorker):
    """Ray actor body. Not for concurrent use outside Ray's actor model."""

    role = "decode"

    def __init__(self, worker_id: str, config: EngineConfig, host: str = "127.0.0.1",
                 lease_s: float = 30.0, *, kv_transport: str = "nixl",
                 channel_key: ChannelKey, cpus: Sequence[int] | None = None,
                 share: CoreShare | None = None, **ranks: Any) -> None:
        super().__init__(worker_id, config, host, lease_s, kv_transport,
                         channel_key=channel_key, cpus=cpus, share=share,
                         **ranks)  # ranks: tensor parallelism
        self._ctx = zmq.Context.instance()
        self._sockets: dict[str, tuple[zmq.Socket, Sealer]] = {}  # driver thread only
        self._reply_to: dict[str, str] = {}
        self._open_choices: dict[str, int] = {}  # request id -> its choices still running
        self._aborted: set[str] = set()
        self._deferred_free: list[tuple[float, str]] = []
        self._outbox: dict[str, list[TokenRecord]] = {}
        self._next_orphan_check = 0.0
        self._kept: list[_Kept] = []  # best priority first, then arrival
        self._yield_to: dict[str, tuple[int, float]] = {}  # rid -> (priority, until)
        self._yield_s = self._resolve_yield_s(config)
        self.yields = 0
        self.orphans_ended = 0
        self.kept_reservations = 0
        self.start_driver()

    # ------------------------------------------------------------------ Ray methods

    async def reserve(self, req: ReserveRequest) -> ReserveResult | None:
        """Reserve blocks for ``req``'s prompt, or None if they are not free now (or, kept
        for KV in flight, not within ``req.wait_s``). ValueError for a request the engine
        refuses."""
        got = await asyncio.wrap_future(self.driver.call(lambda e: self._reserve(e, req)))
        if isinstance(got, Future):
            return await asyncio.wrap_future(got)
        return got

    async def shutdown(self) -> None:
        await super().shutdown()
        for sock, _ in self._sockets.values():
            sock.close(linger=0)

    # ------------------------------------------------------------------ driver thread

    def _reserve(self, engine: Engine, req: ReserveRequest
                 ) -> ReserveResult | None | Future[ReserveResult | None]:
        """The reservation, None, or (kept for KV in flight) the future of the answer."""
        rid = req.request_id
        if rid in self.tombstones:
            raise ValueError(f"request {rid!r} was cancelled")
        if any(k.req.priority <= req.priority for k in self._kept):
            return None  # the blocks that free up go to the kept one first
        got = self._try_reserve(engine, req)
        if got is not None or req.wait_s <= 0 or not engine.blocks_in_flight(req.priority):
            return got
        answer: Future[ReserveResult | None] = Future()
        answer.set_running_or_notify_cancel()  # answered here only (grant, expiry, abort)
        kept = _Kept(req, time.monotonic() + min(req.wait_s, req.lease_s), answer)
        at = next((i for i, k in enumerate(self._kept) if k.req.priority > req.priority),
                  len(self._kept))
        self._kept.insert(at, kept)
        self.kept_reservations += 1
        return answer

    def _serve_kept(self, engine: Engine, now: float) -> None:
        """Grant kept reservations that fit now, best first; refuse those whose wait is
        over or that no KV in flight can make room for any more."""
        while self._kept:
            kept = self._kept[0]
            try:
                got = self._try_reserve(engine, kept.req)
            except Exception as exc:  # the request's own failure, answered to the caller
                self._kept.pop(0)
                kept.answer.set_exception(exc)
                continue
            if got is None and now < kept.until and engine.blocks_in_flight(kept.req.priority):
                return  # the ones behind it wait too
            self._kept.pop(0)
            kept.answer.set_result(got)

    def _try_reserve(self, engine: Engine, req: ReserveRequest) -> ReserveResult | None:
        rid = req.request_id
        reservation = engine.reserve(rid, req.prompt_token_ids, sampling_params(req.sampling),
                                     req.priority)
        if reservation is None:
            return None
        if self._yield_s > 0 and self._outranks_all(engine, req.priority, rid):
            self._yield_to[rid] = (req.priority, time.monotonic() + self._yield_s)
            self.yields += 1
        bs = engine.kv_spec.block_size
        skip = reservation.num_cached_tokens // bs
        self.connector.expect(rid, reservation.block_ids[skip:], req.lease_s)
        self._reply_to[rid] = req.reply_to
        self._open_choices[rid] = req.sampling.n
        self.routers_seen.setdefault(req.reply_to, time.monotonic())
        return ReserveResult(rid, self.connector.describe(), reservation.block_ids,
                             reservation.num_cached_tokens, bs)

    def _abort(self, engine: Engine, rid: str, writes_done: bool) -> bool:
        for i, kept in enumerate(self._kept):
            if kept.req.request_id == rid:
                del self._kept[i]
                kept.answer.set_result(None)
                self.tombstones.add(rid)
                return False
        self._reply_to.pop(rid, None)
        self._open_choices.pop(rid, None)
        if engine.request_status(rid) is None:
            engine.abort(rid)  # its forked choices (n > 1) may outlive it
            self.tombstones.add(rid)  # a reserve still on its way is refused
            return False
        self._aborted.add(rid)
        if any(r == rid for _, r in self._deferred_free):
            if writes_done:
                self._deferred_free = [(0.0 if r == rid else t, r) for t, r in self._deferred_free]
            return True
        if engine.request_status(rid) == "awaiting_kv":
            # Unless the caller knows better, writes may still land in its blocks: free them
            # after the failure report's reuse_after (the next poll reports the abort).
            self.connector.abort(rid, writes_done=writes_done)
            return True
        self._aborted.discard(rid)
        return engine.abort(rid)

    def _on_tick(self, result: PollResult) -> None:
        engine = self.engine
        for rec in result.received:
            rid = rec.request_id
            try:
                token, lps = msgpack.unpackb(rec.payload)
                out = engine.commit_kv(rid, int(token), logprobs_from_wire(lps))
            except Exception as exc:  # this request's own first token or state
                logger.warning("%s: cannot admit %s: %r", self.worker_id, rid, exc)
                engine.abort(rid)
                self._fail_request(rid, f"{type(exc).__name__}: {exc}")
                continue
            self._queue(out)
        now = time.monotonic()
        for failure in result.failed:
            rid = failure.request_id
            self._deferred_free.append((failure.reuse_after, rid))
            reply_to = self._reply_to.pop(rid, None)
            self._open_choices.pop(rid, None)
            if reply_to is not None and rid not in self._aborted:
                logger.warning("%s: KV for %s failed: %s", self.worker_id, rid, failure.message)
                self._outbox.setdefault(reply_to, []).append(
                    TokenRecord(rid, [], error=f"{failure.kind.value}: {failure.message}"))
        if self._deferred_free:
            due = [r for t, r in self._deferred_free if t <= now]
            self._deferred_free = [(t, r) for t, r in self._deferred_free if t > now]
            for rid in due:
                engine.abort(rid)
                self._aborted.discard(rid)
        if self._kept:
            self._serve_kept(engine, now)
        self._end_orphans(now)
        self._flush()

    def _end_orphans(self, now: float) -> None:
        """End the requests of routers that stopped renewing their lease (dead routers)."""
        if now < self._next_orphan_check:
            return
        self._next_orphan_check = now + min(1.0, self.lease_s / 4)
        gone = {ep for ep, seen in list(self.routers_seen.items()) if now - seen > self.lease_s}
        if not gone:
            return
        orphans = [rid for rid, ep in self._reply_to.items() if ep in gone]
        for rid in orphans:
            self._abort(self.engine, rid, writes_done=False)
        self.orphans_ended += len(orphans)
        for ep in gone:
            self.routers_seen.pop(ep, None)
            entry = self._sockets.pop(ep, None)
            self._outbox.pop(ep, None)
            if entry is not None:
                entry[0].close(linger=0)
        if orphans:
            logger.warning("%s: ended %d requests of %d routers silent for over %.0f s",
                           self.worker_id, len(orphans), len(gone), self.lease_s)

    def _resolve_yield_s(self, config: EngineConfig) -> float:
        sched = config.scheduler
        if sched.policy != "priority":
            return 0.0
        if sched.priority_yield_s is not None:
            return sched.priority_yield_s
        return 0.05 if self.engine.device.type == "cpu" else 0.0

    @staticmethod
    def _outranks_all(engine: Engine, priority: int, rid: str) -> bool:
        """Whether steps would serve requests (running, or preempted and waiting to
        recompute) and ``priority`` is strictly better than every one's effective priority."""
        sched = engine.scheduler
        now = sched.clock()
        others = [s for s in (*sched.running, *sched.waiting) if s.request_id != rid]
        return bool(others) and all(sched.effective_priority(s, now) > priority for s in others)

    def _role_quiet(self) -> bool:
        return not (self._reply_to or self._kept or self._deferred_free or self._aborted
                    or any(self._outbox.values()))

    def _hold(self) -> bool:
        """Yield: no step while a reservation that outranks every request here waits for
        its KV (for ``priority_yield_s`` at most; see ``SchedulerConfig``)."""
        if not self._yield_to:
            return False
        now = time.monotonic()
        engine = self.engine
        for rid, (priority, until) in list(self._yield_to.items()):
            if (now > until or engine.request_status(rid) != "awaiting_kv"
                    or not self._outranks_all(engine, priority, rid)):
                del self._yield_to[rid]
        return bool(self._yield_to)

    def _extra_stats(self) -> dict[str, int]:
        return {"orphans_ended": self.orphans_ended,
                "kept_reservations": self.kept_reservations, "yields": self.yields}

    def _on_stop(self, error: BaseException | None) -> None:
        kept, self._kept = self._kept, []
        for k in kept:
            k.answer.set_exception(EngineStoppedError(f"engine loop stopped: {error!r}"))
        super()._on_stop(error)

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._queue(out)
        self._flush()

    def _fail_request(self, rid: str, error: str) -> None:
        """Tell the router that ``rid`` failed on its own (not to be retried elsewhere)."""
        reply_to = self._reply_to.pop(rid, None)
        self._open_choices.pop(rid, None)
        if reply_to is not None:
            self._outbox.setdefault(reply_to, []).append(
                TokenRecord(rid, [], error=error[:500], retryable=False))

    def _queue(self, out: RequestOutput) -> None:
        rid = out.parent_id or out.request_id  # a forked choice reports as its request
        if out.error is not None:
            self._fail_request(rid, out.error)
            return
        reply_to = self._reply_to.get(rid)
        if reply_to is None:
            if not out.finished:
                self.engine.abort(out.request_id)  # nobody listens any more
            return
        self._outbox.setdefault(reply_to, []).append(TokenRecord(
            rid, out.new_token_ids,
            out.finish_reason if out.finished else None,
            logprobs_to_wire(out.new_logprobs), index=out.index,
        ))
        if out.finished:
            left = self._open_choices.get(rid, 1) - 1
            self._open_choices[rid] = left
            if left <= 0:
                del self._reply_to[rid]
                self._open_choices.pop(rid, None)

    def _flush(self) -> None:
        for endpoint, records in self._outbox.items():
            if not records:
                continue
            entry = self._sockets.get(endpoint)
            if entry is None:
                sock = self._ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, 100_000)
                sock.connect(endpoint)
                entry = self._sockets[endpoint] = (sock, self.channel_key.sealer(
                    token_channel(endpoint)))
            sock, sealer = entry
            try:
                sock.send(sealer.seal(encode_batch(records)), zmq.NOBLOCK)
            except zmq.Again:
                logger.error("%s: router %s is not reading; dropped %d records",
                             self.worker_id, endpoint, len(records))
        self._outbox.clear()
