"""KV events and load, pushed by every worker to every router as they happen.

Each worker binds one ZMQ PUB socket (``EventPublisher.endpoint``, in its ``info``) and, on
its engine thread right after each step, publishes one message when its prefix cache
changed (``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``) or its load did, and a
heartbeat at least every ``heartbeat_s`` otherwise. Messages are numbered 0, 1, 2, ... per
worker incarnation (``seq``); a subscriber that sees a number other than last + 1 lost
messages (PUB drops when a subscriber falls behind, or it joined late) and resyncs from the
worker's snapshot (``kv_snapshot``, an actor call answered on the same thread, so the
snapshot's ``seq`` is exact). The heartbeat bounds how long a lost tail stays unseen.

Every message is sealed with the cluster's key (``pdserve.kvtransfer.auth``, channel
``kv-events``): a process without the secret can neither forge events nor replay them.

Wire (msgpack): ``[version, worker_id, incarnation, seq, stamp, events, load]`` with
``stamp`` the wall-clock time the events were taken from the engine (subscribers on the same
machine measure their lag from it), ``events`` a list of ``[kind, hashes, parent,
block_size]`` (kind 0 stored, 1 removed, 2 cleared) and ``load`` a dict of the worker's
figures (``LOAD_FIELDS``). The codec is pure Python; the publisher needs only ZMQ.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from pdserve.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from pdserve.kvtransfer.auth import ChannelKey

WIRE_VERSION = 1
EVENT_CHANNEL = "kv-events"
"""The ``ChannelKey`` channel every worker's events are sealed for."""
LOAD_FIELDS = ("num_running", "num_waiting", "num_awaiting_kv", "num_blocks",
               "num_used_blocks", "num_cached_blocks", "prefill_tokens_per_s", "pending_jobs",
               "pending_prefill_tokens", "pull_bytes_per_s")
"""The load figures a message carries (a subset of the worker's ``stats``)."""

_STORED, _REMOVED, _CLEARED = 0, 1, 2


@dataclass(frozen=True, slots=True)
class EventMessage:
    """One published message: ``events`` taken at ``stamp`` (``time.time()``)."""

    worker_id: str
    incarnation: str
    seq: int
    stamp: float
    events: tuple[KVEvent, ...]
    load: dict[str, float]


def encode_message(msg: EventMessage) -> bytes:
    wire: list[list[Any]] = []
    for ev in msg.events:
        if isinstance(ev, BlockStored):
            wire.append([_STORED, list(ev.block_hashes), ev.parent_hash, ev.block_size])
        elif isinstance(ev, BlockRemoved):
            wire.append([_REMOVED, list(ev.block_hashes), None, 0])
        else:
            wire.append([_CLEARED, [], None, 0])
    return msgpack.packb([WIRE_VERSION, msg.worker_id, msg.incarnation, msg.seq, msg.stamp,
                          wire, msg.load])


def decode_message(raw: bytes) -> EventMessage:
    """The message in ``raw``; ValueError for anything that is not one."""
    try:
        version, worker_id, incarnation, seq, stamp, wire, load = msgpack.unpackb(raw)
        if version != WIRE_VERSION:
            raise ValueError(f"KV event wire version {version}, expected {WIRE_VERSION}")
        events: list[KVEvent] = []
        for kind, hashes, parent, block_size in wire:
            if kind == _STORED:
                events.append(BlockStored(tuple(int(h) for h in hashes),
                                          None if parent is None else int(parent),
                                          int(block_size)))
            elif kind == _REMOVED:
                events.append(BlockRemoved(tuple(int(h) for h in hashes)))
            elif kind == _CLEARED:
                events.append(AllBlocksCleared())
            else:
                raise ValueError(f"unknown KV event kind {kind!r}")
        return EventMessage(str(worker_id), str(incarnation), int(seq), float(stamp),
                            tuple(events), {str(k): float(v) for k, v in dict(load).items()})
    except ValueError:
        raise
    except Exception as exc:  # msgpack's and unpacking's own errors
        raise ValueError(f"not a KV event message: {exc!r}") from None


class EventPublisher:
    """The worker's PUB socket. Every method runs on the engine's driver thread (the one
    place the engine's events and snapshot are taken, so numbering and snapshots agree)."""

    def __init__(self, worker_id: str, incarnation: str, key: ChannelKey, host: str,
                 heartbeat_s: float = 0.5, send_hwm: int = 10_000) -> None:
        self.worker_id = worker_id
        self.incarnation = incarnation
        self.heartbeat_s = heartbeat_s
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, send_hwm)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self._sealer = key.sealer(EVENT_CHANNEL)
        self._next_seq = 0
        self._last_load: dict[str, float] = {}
        self._last_sent = 0.0
        self.published = 0

    @property
    def last_seq(self) -> int:
        """The number of the last message published (-1: none yet)."""
        return self._next_seq - 1

    def maybe_publish(self, events: list[KVEvent], load: dict[str, float]) -> bool:
        """Publish ``events`` and ``load`` if there are events, the load changed, or the
        heartbeat is due; True if a message went out."""
        now = time.monotonic()
        if not events and load == self._last_load and now - self._last_sent < self.heartbeat_s:
            return False
        msg = EventMessage(self.worker_id, self.incarnation, self._next_seq, time.time(),
                           tuple(events), load)
        self._next_seq += 1
        self._last_load = load
        self._last_sent = now
        try:
            self._sock.send(self._sealer.seal(encode_message(msg)), zmq.NOBLOCK)
        except zmq.Again:  # no subscriber keeps up: they see the gap and resync
            pass
        self.published += 1
        return True

    def close(self) -> None:
        self._sock.close(linger=0)
