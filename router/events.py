"""The router's view of the workers, fed by the KV events and load they push.

One ZMQ SUB socket subscribes to every worker's publisher (``pdserve.worker.events``).
Each message is opened with the cluster's key (anything forged or replayed is refused and
counted), its KV events go to the prefix index of the worker's role, and its load to
``on_load``. Messages are numbered per worker incarnation: ``FeedState`` tells what to do
with each one, and on a gap (lost messages, a late join, a restarted subscriber) the router
asks the worker for a snapshot (``kv_snapshot``, an actor call) and the index replays what
arrived meanwhile on top of it (``PrefixIndex.snapshot``). Nothing is polled.

``lag`` keeps the recent delays between a worker taking its events from its engine and this
router applying them (wall clocks: meaningful on one machine, or with synchronised clocks).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from pdserve.kvtransfer.auth import ChannelKey, ForgedMessageError, RefusalLog
from pdserve.router.prefix_index import PrefixIndex
from pdserve.worker.events import EVENT_CHANNEL, EventMessage, decode_message

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20


@dataclass(slots=True)
class _Seen:
    incarnation: str
    last_seq: int | None = None
    resyncing: bool = False
    retry: bool = False


@dataclass(slots=True)
class FeedState:
    """Per-worker message numbering, pure logic. ``classify`` answers, for one message:
    "apply" (the next one), "gap" (apply it, and a snapshot is needed: one request at a
    time), "duplicate" (already seen: drop). A snapshot that failed, or did not bring the
    view in sync, is asked for again at the next message. A new incarnation starts over."""

    workers: dict[str, _Seen] = field(default_factory=dict)
    gaps: int = 0

    def classify(self, worker_id: str, incarnation: str, seq: int) -> str:
        seen = self.workers.get(worker_id)
        if seen is None or seen.incarnation != incarnation:
            seen = self.workers[worker_id] = _Seen(incarnation)
        if seen.last_seq is not None and seq <= seen.last_seq:
            return "duplicate"
        expected = 0 if seen.last_seq is None else seen.last_seq + 1
        seen.last_seq = seq
        if seq != expected:
            self.gaps += 1
        elif not seen.retry:
            return "apply"
        if seen.resyncing:
            return "apply"  # the snapshot already asked for covers this gap as well
        seen.resyncing = True
        seen.retry = False
        return "gap"

    def resynced(self, worker_id: str, incarnation: str, ok: bool) -> None:
        """The snapshot asked for after a gap came (``ok``) or failed (ask again next gap)."""
        seen = self.workers.get(worker_id)
        if seen is not None and seen.incarnation == incarnation:
            seen.resyncing = False
            seen.retry = not ok

    def forget(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)


SnapshotFn = Callable[[str], Awaitable[tuple[str, int, list[int], dict[str, float]]]]
LoadFn = Callable[[str, dict[str, float]], None]


class EventSubscriber:
    """Subscribes to workers' publishers; applies what they push, on the router's loop."""

    def __init__(self, key: ChannelKey, indexes: dict[str, PrefixIndex | None],
                 snapshot: SnapshotFn, on_load: LoadFn, lag_window: int = 10_000,
                 on_lag: Callable[[float], None] | None = None) -> None:
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._opener = key.opener(EVENT_CHANNEL, max_senders=65536)
        self._refusals = RefusalLog(logger, "unauthenticated KV event messages")
        self._indexes = indexes  # role -> index (None: that role's events are not indexed)
        self._snapshot = snapshot
        self._on_load = on_load
        self._on_lag = on_lag
        """Told of each lag measured (the router's Prometheus histogram)."""
        self._roles: dict[str, str] = {}
        self._endpoints: dict[str, str] = {}
        self.state = FeedState()
        self.lag: deque[float] = deque(maxlen=lag_window)
        """Seconds between a worker taking events from its engine and their application
        here, for recent messages that carried events."""
        self.messages = 0
        self.resyncs = 0
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def refused(self) -> int:
        return self._refusals.count

    @property
    def gaps(self) -> int:
        return self.state.gaps

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def add_worker(self, worker_id: str, role: str, endpoint: str) -> None:
        """Subscribe to a worker (again, after a restart: its new endpoint)."""
        old = self._endpoints.get(worker_id)
        if old == endpoint:
            return
        if old is not None:
            self._sock.disconnect(old)
        self._roles[worker_id] = role
        self._endpoints[worker_id] = endpoint
        self._sock.connect(endpoint)

    def remove_worker(self, worker_id: str) -> None:
        endpoint = self._endpoints.pop(worker_id, None)
        if endpoint is not None:
            try:
                self._sock.disconnect(endpoint)
            except zmq.ZMQError:
                pass
        self.state.forget(worker_id)

    def lag_quantiles(self, qs: tuple[float, ...] = (0.5, 0.99)) -> dict[float, float]:
        data = sorted(self.lag)
        if not data:
            return {}
        return {q: data[min(len(data) - 1, int(q * len(data)))] for q in qs}

    async def _run(self) -> None:
        while True:
            raw = await self._sock.recv()
            try:
                msg = decode_message(self._opener.open(raw))
            except ForgedMessageError as exc:
                self._refusals.refused(exc)
                continue
            except ValueError as exc:
                logger.error("undecodable KV event message (%d bytes) dropped: %s", len(raw), exc)
                continue
            try:
                self.apply(msg)
            except Exception:  # never let one message stop the feed
                logger.exception("applying KV events of %s failed", msg.worker_id)

    def apply(self, msg: EventMessage) -> None:
        """Apply one opened message (the receive loop's work; public for tests)."""
        role = self._roles.get(msg.worker_id)
        if role is None or self._endpoints.get(msg.worker_id) is None:
            return  # a worker this router does not route to (any more)
        self.messages += 1
        verdict = self.state.classify(msg.worker_id, msg.incarnation, msg.seq)
        if verdict == "duplicate":
            return
        index = self._indexes.get(role)
        if index is not None:
            index.apply_events(msg.worker_id, msg.seq, msg.events, msg.incarnation)
        if msg.events:
            lag = max(0.0, time.time() - msg.stamp)
            self.lag.append(lag)
            if self._on_lag is not None:
                self._on_lag(lag)
        self._on_load(msg.worker_id, msg.load)
        if verdict == "gap":
            task = asyncio.get_running_loop().create_task(
                self._resync(msg.worker_id, msg.incarnation))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _resync(self, worker_id: str, incarnation: str) -> None:
        ok = False
        try:
            inc, seq, hashes, load = await self._snapshot(worker_id)
            role = self._roles.get(worker_id)
            index = self._indexes.get(role) if role is not None else None
            if index is not None:
                ok = index.snapshot(worker_id, seq, hashes, inc)
            else:
                ok = True
            self._on_load(worker_id, load)
            self.resyncs += 1
            logger.info("KV view of %s resynced from a snapshot at message %d (%d blocks)",
                        worker_id, seq, len(hashes))
        except Exception as exc:  # the worker died or is busy: the next gap asks again
            logger.warning("KV snapshot of %s failed: %r", worker_id, exc)
        finally:
            self.state.resynced(worker_id, incarnation, ok)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in list(self._pending):
            task.cancel()
        self._sock.close(linger=0)
        self._ctx.term()


def endpoint_of(info: dict[str, Any]) -> str | None:
    """A worker's publisher endpoint, from its ``info``."""
    value = info.get("events_endpoint")
    return str(value) if value else None
