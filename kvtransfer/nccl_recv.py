"""The receiving half of the nccl KV transport: side channel, rendezvous store, pair groups.

``ReceiveSide`` runs a ROUTER socket on the connector's KV host (the address in its
``TransferTarget``) and a ``StoreServer`` beside it. A sender's ``Hello`` makes a group: a
thread that joins the pair's process group as rank 1 and then, for every ``Frame`` the sender
announces, posts the matching receive, checks the frame and lands it, and acknowledges it.

Blocks land only where the owner allows: a frame is written into the cache only if its request
is expected (``allow``) and its block ids are among the expected ones; anything else is
received into a scratch buffer, dropped and refused in the ack. The check and the write happen
under one lock that ``revoke`` also takes, so once ``revoke`` returns no write of that request
can land: a failed request's blocks may be reused at once.

Groups whose sender stays silent past ``peer_timeout_s`` (no frame, no keepalive), whose
receive fails or times out, or whose sender says ``Bye`` are dropped with their process group.

Only senders holding the cluster's key are served: a message that does not verify, or was
received before, is dropped and answered with an unsealed refusal (so a misconfigured sender
fails at once rather than at its handshake timeout); a group is bound to the socket identity
and to the sealer of the ``Hello`` that made it, and only that sender may use it. Answers are
sealed for the group's link (``nccl_wire.reply_channel``).
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zmq

from pdserve.engine.config import KVCacheSpec
from pdserve.kvtransfer import nccl_wire as wire
from pdserve.kvtransfer.auth import ForgedMessageError, RefusalLog, Sealer
from pdserve.kvtransfer.base import FailureKind, compatibility_problems
from pdserve.kvtransfer.layout import frame_buffer, frame_shape, scatter_blocks
from pdserve.kvtransfer.ledger import ChunkNotice, block_digest
from pdserve.kvtransfer.nccl_send import LinkSettings
from pdserve.kvtransfer.pair_group import (
    PairGroup,
    StoreServer,
    backend_for,
    open_pair_group,
    store_client,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NoticeArrived:
    """A frame landed; its chunk notice goes to the receive ledger."""

    notice: ChunkNotice


@dataclass(frozen=True, slots=True)
class ReceiveFailed:
    request_id: str
    kind: FailureKind
    message: str


ReceiveEvent = NoticeArrived | ReceiveFailed


@dataclass(slots=True, eq=False)
class _Group:
    key: str
    identity: bytes
    sealed_by: int  # the sealer of the Hello: the only one whose messages use this group
    sealer: Sealer  # seals our answers on this group's link
    sender: str
    last_seen: float
    frames: queue.SimpleQueue[wire.Frame | None] = field(default_factory=queue.SimpleQueue)
    busy: bool = False
    stopped: bool = False
    thread: threading.Thread | None = None
    # Blocks of the notice-less frames of the write being received (a link sends one write's
    # frames back to back: a frame of another request means that write was abandoned).
    partial: tuple[str, list[int]] | None = None
    scratch: torch.Tensor | None = None  # reused receive buffer


class ReceiveSide:
    """See the module docstring. ``report`` is called from internal threads (thread-safe)."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        kv_cache: torch.Tensor,
        spec: KVCacheSpec,
        settings: LinkSettings,
        port: int,
        report: Callable[[ReceiveEvent], None],
    ) -> None:
        self._kv, self._spec, self._settings, self._report = kv_cache, spec, settings, report
        self.num_blocks = int(kv_cache.shape[0])
        self.backend = backend_for(kv_cache.device)
        self._writable: dict[str, frozenset[int]] = {}
        self._write_lock = threading.Lock()
        self._groups: dict[str, _Group] = {}  # ROUTER thread only
        self._group_count = 0
        self.groups_built = 0
        self._acks: deque[tuple[bytes, bytes]] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._store = StoreServer(settings.host, settings.op_timeout_s)
        self._opener = settings.key.opener(wire.REQUEST_CHANNEL)  # ROUTER thread only
        self._refusals = RefusalLog(
            logger, f"unauthenticated KV control messages to {settings.agent_name}"
        )
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES)
        if port:
            self._sock.bind(f"tcp://{settings.host}:{port}")
        else:
            port = self._sock.bind_to_random_port(f"tcp://{settings.host}")
        self.host, self.port = settings.host, port
        self._stop = threading.Event()
        self.thread = threading.Thread(
            target=self._serve, name=f"kv-recv-{settings.agent_name}", daemon=True
        )
        self.thread.start()

    # -- owner thread ---------------------------------------------------------------------

    def allow(self, request_id: str, block_ids: list[int]) -> None:
        with self._write_lock:
            self._writable[request_id] = frozenset(block_ids)

    def revoke(self, request_id: str) -> None:
        """No write of ``request_id`` lands after this returns (waits for one landing now)."""
        with self._write_lock:
            self._writable.pop(request_id, None)

    @property
    def group_count(self) -> int:
        """Live receiving groups (one per sending connector that is connected)."""
        return self._group_count

    def close(self) -> None:
        self._stop.set()
        self._wake()
        self.thread.join(2.0)
        self._store.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"w")
        except (BlockingIOError, OSError):
            pass

    # -- ROUTER thread --------------------------------------------------------------------

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        tick_ms = max(1, int(self._settings.keepalive_s * 1000))
        try:
            while not self._stop.is_set():
                for sock, _ in poller.poll(tick_ms):
                    if sock is self._wake_r:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                    else:
                        while self._sock.poll(0):
                            identity, raw = self._sock.recv_multipart()
                            self._on_message(identity, raw)
                while self._acks:
                    identity, raw = self._acks.popleft()
                    try:
                        self._sock.send_multipart([identity, raw], zmq.NOBLOCK)
                    except zmq.Again:  # the sender is gone: its link fails on its own
                        logger.warning("KV side channel: dropped an ack to a sender")
                self._reap(time.monotonic())
        except zmq.ZMQError:
            if not self._stop.is_set():
                logger.exception("KV side channel of %s failed", self._settings.agent_name)
        finally:
            for key in list(self._groups):
                self._drop(key, "connector closed")
            self._sock.close(linger=0)
            self._wake_r.close()
            self._wake_w.close()

    def _send(self, identity: bytes, message: wire.Message, sealer: Sealer | None,
              group: str = "") -> None:
        """Send ``message`` sealed by ``sealer`` (None: a one-off sealer for ``group``'s link;
        an empty ``group``: unsealed, only for refusing a sender we cannot authenticate)."""
        raw = wire.encode(message)
        if sealer is None and group:
            sealer = self._settings.key.sealer(wire.reply_channel(group))
        if sealer is not None:
            raw = sealer.seal(raw)
        try:
            self._sock.send_multipart([identity, raw], zmq.NOBLOCK)
        except zmq.Again:  # the sender is gone or not reading: its link times out
            logger.warning("KV side channel: dropped a %s to a sender", message.kind)

    def _on_message(self, identity: bytes, raw: bytes) -> None:
        try:
            sealed_by, payload = self._opener.open_from(raw)
        except ForgedMessageError as exc:
            self._refusals.refused(exc)
            self._send(identity, wire.Refused(FailureKind.INCOMPATIBLE.value,
                                              "KV handshake refused: not authenticated"), None)
            return
        try:
            message = wire.decode(payload)
        except ValueError as exc:
            logger.warning("KV side channel: %s", exc)
            return
        now = time.monotonic()
        if isinstance(message, wire.Hello):
            self._on_hello(identity, sealed_by, message, now)
            return
        name = getattr(message, "group", "")
        group = self._groups.get(name)
        if group is not None and (group.identity, group.sealed_by) != (identity, sealed_by):
            group = None  # only the sender that made a group may use it
        if group is not None:
            group.last_seen = now
        sealer = group.sealer if group is not None else None
        if isinstance(message, wire.Frame):
            if group is None:
                self._send(identity, wire.Ack(message.group, message.seq, False,
                                              FailureKind.TRANSFER_ERROR.value, "unknown group"),
                           None, name)
            else:
                group.frames.put(message)
        elif isinstance(message, wire.Ping):
            self._send(identity, wire.Pong(message.group, group is not None), sealer, name)
        elif isinstance(message, wire.Bye):
            if group is not None:
                self._drop(group.key, "the sender closed the link")
        else:
            logger.warning("KV side channel: unexpected %s", message.kind)

    def _on_hello(self, identity: bytes, sealed_by: int, hello: wire.Hello, now: float) -> None:
        s = self._settings
        sealer = s.key.sealer(wire.reply_channel(hello.group))
        problems = compatibility_problems(hello.info, s.info)  # the sender's point of view
        if problems:
            logger.warning("refused KV peer %s: %s", hello.agent, "; ".join(problems))
            self._send(identity, wire.Refused(FailureKind.INCOMPATIBLE.value, "; ".join(problems)),
                       sealer)
            return
        if hello.group in self._groups:
            self._send(identity, wire.Refused(FailureKind.TRANSFER_ERROR.value,
                                              f"group {hello.group} exists"), sealer)
            return
        group = _Group(hello.group, identity, sealed_by, sealer, hello.agent, now)
        group.thread = threading.Thread(
            target=self._run_group, args=(group,), name=f"kv-recv-{hello.agent}", daemon=True
        )
        self._groups[group.key] = group
        self._group_count = len(self._groups)
        self.groups_built += 1
        group.thread.start()
        self._send(identity, wire.Welcome(s.agent_name, s.info, s.heads, self.num_blocks,
                                          self._store.port, self.backend), sealer)

    def _drop(self, key: str, why: str) -> None:
        group = self._groups.pop(key, None)
        self._group_count = len(self._groups)
        if group is None:
            return
        logger.info("KV pair group %s with %s dropped: %s", key, group.sender, why)
        group.stopped = True
        group.frames.put(None)

    def _reap(self, now: float) -> None:
        limit = self._settings.peer_timeout_s
        for key, group in list(self._groups.items()):
            if group.stopped:
                self._drop(key, "its receive failed")
            elif not group.busy and now - group.last_seen > limit:
                self._drop(key, f"sender silent for {now - group.last_seen:.1f} s")

    # -- group threads --------------------------------------------------------------------

    def _run_group(self, group: _Group) -> None:
        s = self._settings
        pair: PairGroup | None = None
        try:
            group.busy = True
            # A store client of its own: one TCPStore connection serves one wait at a time,
            # and each group's rendezvous waits for its own peer.
            store = store_client(self._store.host, self._store.port, s.op_timeout_s)
            pair = open_pair_group(store, group.key, 1, self._kv.device, s.host, s.op_timeout_s,
                                   prefix=wire.rendezvous_prefix(s.key, group.key))
            group.busy = False
            while True:
                frame = group.frames.get()
                if frame is None or group.stopped:
                    break
                group.busy = True
                self._on_frame(group, pair, frame)
                group.busy = False
        except Exception as exc:  # group or receive error: the group is done
            logger.warning("KV pair group %s with %s failed: %s", group.key, group.sender, exc)
            group.stopped = True
            self._wake()
        finally:
            if pair is not None:
                pair.close()
            while True:  # frames that will never be received fail their requests now
                try:
                    frame = group.frames.get_nowait()
                except queue.Empty:
                    break
                if frame is not None:
                    self._report(ReceiveFailed(frame.request_id, FailureKind.TRANSFER_ERROR,
                                               f"KV pair group with {group.sender} closed"))

    def _on_frame(self, group: _Group, pair: PairGroup, frame: wire.Frame) -> None:
        n, heads = len(frame.dst), frame.heads
        if heads.count > self._settings.info.num_kv_heads:
            raise ValueError(f"frame of {heads.count} KV heads: protocol error")
        tensor = None
        if n:
            shape = frame_shape(self._spec, n, heads.count)
            tensor, group.scratch = frame_buffer(group.scratch, self._kv, shape)
            try:
                with pair.scope():
                    pair.recv(tensor)
            except Exception as exc:
                self._report(ReceiveFailed(frame.request_id, FailureKind.TRANSFER_ERROR,
                                           f"receive from {group.sender} failed: {exc}"))
                raise
        problem = self._land(group, frame, tensor, pair)
        if problem is None:
            ack = wire.Ack(frame.group, frame.seq, True)
        else:
            group.partial = None
            ack = wire.Ack(frame.group, frame.seq, False, problem[0].value, problem[1])
        self._acks.append((group.identity, group.sealer.seal(wire.encode(ack))))
        self._wake()

    def _land(
        self, group: _Group, frame: wire.Frame, tensor: torch.Tensor | None, pair: PairGroup
    ) -> tuple[FailureKind, str] | None:
        """Write ``frame``'s blocks if its request allows them; the problem otherwise. A frame
        with a notice completes a write: the notice must name exactly the blocks of that frame
        and of the notice-less frames of the same write before it."""
        rid, mine = frame.request_id, self._settings.heads
        if group.partial is not None and group.partial[0] != rid:
            group.partial = None
        before = group.partial[1] if group.partial is not None else []
        notice = None
        if frame.notice:
            notice = ChunkNotice.decode(frame.notice)
            if notice is None or notice.request_id != rid:
                return FailureKind.MISMATCH, "frame without a valid chunk notice"
            written = before + frame.dst
            if notice.num_blocks != len(written) or notice.digest != block_digest(written):
                return FailureKind.MISMATCH, "frame blocks differ from its notice"
        if not mine.contains(frame.heads):
            return FailureKind.MISMATCH, f"frame carries KV heads {frame.heads}, we hold {mine}"
        with self._write_lock:
            allowed = self._writable.get(rid)
            if allowed is None:
                return FailureKind.ABORTED, (
                    f"request {rid} is not expected here (never reserved, failed or aborted)"
                )
            if not allowed.issuperset(frame.dst):
                return FailureKind.MISMATCH, f"request {rid} writes blocks it did not reserve"
            if tensor is not None:
                ids = np.asarray(frame.dst, dtype=np.int64)
                with pair.scope():
                    scatter_blocks(self._kv, ids, mine.local(frame.heads), tensor)
                    if pair.stream is not None:
                        pair.stream.synchronize()
        if notice is None:
            group.partial = (rid, before + frame.dst)
        else:
            group.partial = None
            self._report(NoticeArrived(notice))
        return None
