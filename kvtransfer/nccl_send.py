"""The sending half of the nccl KV transport: one ``SendLink`` per receiving connector.

A link owns a thread, a DEALER socket to the receiver's side channel and, once the handshake
succeeded, the pair's two-rank process group (built once, kept for the link's life). The owner
thread (the engine's step loop) only queues writes (``submit``) and reads the events the
thread reports; it never waits on the network.

Per write the thread copies the source blocks (the heads the receiver holds) into a transfer
buffer, sends a ``Frame`` on the side channel and the buffer on the group; the receiver's
``Ack`` completes the write. The copy is made under the link's lock, so once ``cancel``
returns no later read of the request's source blocks can happen.

A link breaks for good on any error (handshake refused or unanswered, group or send error or
timeout, receiver silent past ``peer_timeout_s``, or the receiver no longer knowing the group):
it reports ``LinkBroken`` with the requests it still held, and the owner makes a new link (a
new group) for the next write to that receiver.

Every control message is sealed with the cluster's key (``nccl_wire``); an answer that does
not verify for this link is dropped (and, in the handshake, fails the link: a receiver that
cannot authenticate us, or that we cannot authenticate, gets no blocks).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zmq

from pdserve.engine.config import KVCacheSpec
from pdserve.kvtransfer import nccl_wire as wire
from pdserve.kvtransfer.auth import ChannelKey, ForgedMessageError, RefusalLog
from pdserve.kvtransfer.base import FailureKind, PeerInfo, TransferTarget, compatibility_problems
from pdserve.kvtransfer.heads import HeadRange, overlap
from pdserve.kvtransfer.layout import frame_buffer, frame_shape, gather_blocks
from pdserve.kvtransfer.pair_group import PairGroup, open_pair_group, store_client

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """What every link of one connector shares (see ``NcclConfig`` for the timeouts);
    ``key`` seals its control messages."""

    agent_name: str
    info: PeerInfo
    heads: HeadRange
    host: str
    handshake_timeout_s: float
    op_timeout_s: float
    keepalive_s: float
    peer_timeout_s: float
    max_frame_bytes: int
    key: ChannelKey


@dataclass(slots=True, eq=False)
class OutgoingWrite:
    """One ``write_blocks`` call. ``ready`` is a CUDA event recorded on the owner's stream
    when the write was issued: the copy waits for it (the blocks' KV was computed before)."""

    request_id: str
    src: np.ndarray
    dst: np.ndarray
    notice: bytes
    ready: Any = None


@dataclass(frozen=True, slots=True)
class WriteDone:
    request_id: str


@dataclass(frozen=True, slots=True)
class WriteFailed:
    request_id: str
    kind: FailureKind
    message: str


@dataclass(frozen=True, slots=True)
class LinkBroken:
    link: SendLink
    kind: FailureKind
    message: str


LinkEvent = WriteDone | WriteFailed | LinkBroken


class _LinkError(Exception):
    def __init__(self, kind: FailureKind, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


@dataclass(slots=True)
class _Current:
    """A write being sent, frame by frame: blocks ``[done, len)`` are still to go."""

    write: OutgoingWrite
    heads: HeadRange
    per_frame: int
    done: int = 0


@dataclass(slots=True)
class _Queue:
    writes: deque[OutgoingWrite] = field(default_factory=deque)
    current: _Current | None = None
    unacked: dict[int, tuple[str, bool]] = field(default_factory=dict)  # seq -> (rid, last)

    def requests(self) -> set[str]:
        held = {w.request_id for w in self.writes} | {r for r, _ in self.unacked.values()}
        if self.current is not None:
            held.add(self.current.write.request_id)
        return held


class SendLink:
    """A sender's link to the connector behind ``target``. ``report`` is called from the
    link's thread with every event (it must be thread-safe and quick)."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        kv_cache: torch.Tensor,
        spec: KVCacheSpec,
        settings: LinkSettings,
        target: TransferTarget,
        report: Callable[[LinkEvent], None],
    ) -> None:
        self.target = target
        self.group_key = f"{settings.agent_name}.{target.agent_name}.{uuid.uuid4().hex[:8]}"
        self.ready = threading.Event()  # set once the group is up or the link broke
        self.failure: tuple[FailureKind, str] | None = None
        self.orphans: set[str] = set()  # requests the link held when it broke
        self._kv, self._spec, self._settings, self._report = kv_cache, spec, settings, report
        self._lock = threading.Lock()
        self._q = _Queue()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDTIMEO, int(settings.op_timeout_s * 1000))
        self._sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES)
        self._sealer = settings.key.sealer(wire.REQUEST_CHANNEL)
        self._opener = settings.key.opener(wire.reply_channel(self.group_key))
        self._refusals = RefusalLog(
            logger, f"unauthenticated KV control messages from {target.agent_name}"
        )
        self._group: PairGroup | None = None
        self._remote_heads: HeadRange | None = None
        self._staging: torch.Tensor | None = None  # reused transfer buffer
        self.frames_sent = 0
        self.thread = threading.Thread(
            target=self._run, name=f"kv-send-{target.agent_name}", daemon=True
        )
        self.thread.start()

    # -- owner thread ---------------------------------------------------------------------

    @property
    def broken(self) -> bool:
        return self.failure is not None

    def submit(self, write: OutgoingWrite) -> bool:
        """Queue ``write``; False if the link is broken (the write was not taken)."""
        with self._lock:
            if self.failure is not None:
                return False
            self._q.writes.append(write)
        self._wake()
        return True

    def cancel(self, request_id: str) -> None:
        """Drop ``request_id``'s queued writes (and the rest of one being sent). Returns once
        no copy of its source blocks is under way (waits for one that is); later acks of its
        writes are still reported (the owner ignores those of requests it failed)."""
        with self._lock:
            self._q.writes = deque(w for w in self._q.writes if w.request_id != request_id)
            current = self._q.current
            if current is not None and current.write.request_id == request_id:
                self._q.current = None

    def pending(self, request_id: str) -> bool:
        """True while a write of ``request_id`` is queued, being sent or not acknowledged yet
        (a frame already sent may still land at the receiver)."""
        with self._lock:
            return request_id in self._q.requests()

    def close(self, wait_s: float = 1.0) -> set[str]:
        """Stop the link and return the requests it still held (queued or unacknowledged
        writes, or those it held when it broke). No copy of source blocks happens after this
        returns; the thread ends within ``wait_s`` or, if a send is under way, at the latest
        after ``op_timeout_s``. Later ``submit`` calls are refused."""
        with self._lock:
            held = self.orphans | self._q.requests()
            if self.failure is None:
                self.failure = (FailureKind.ABORTED, "KV link closed")
            self._q, self.orphans = _Queue(), set()
        self._stop.set()
        self._wake()
        if wait_s > 0:
            self.thread.join(wait_s)
        return held

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"w")
        except (BlockingIOError, OSError):  # already awake, or closed
            pass

    # -- link thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._sock.connect(f"tcp://{self.target.host}:{self.target.port}")
            self._handshake()
            self.ready.set()
            self._serve()
        except _LinkError as exc:
            self._break(exc.kind, exc.message)
        except Exception as exc:  # any transport error breaks the link
            self._break(FailureKind.TRANSFER_ERROR, f"KV link to {self.target.agent_name}: {exc}")
        finally:
            self.ready.set()
            if self._group is not None:
                try:  # the receiver drops the group now rather than at its keepalive
                    self._post(wire.Bye(self.group_key), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
                self._group.close()
            self._sock.close(linger=0)
            self._wake_r.close()
            self._wake_w.close()

    def _break(self, kind: FailureKind, message: str) -> None:
        with self._lock:
            if self.failure is not None:  # closed by the owner meanwhile
                return
            self.failure = (kind, message)
            self.orphans = self._q.requests()
            self._q = _Queue()
        logger.warning("KV link to %s broke (%s): %s", self.target.agent_name, kind.value,
                       message)
        self._report(LinkBroken(self, kind, message))

    def _post(self, message: wire.Message, flags: int = 0) -> None:
        self._sock.send(self._sealer.seal(wire.encode(message)), flags)

    def _open(self, raw: bytes) -> wire.Message | None:
        """The receiver's message in ``raw``; None (logged) if it is not sealed for us."""
        try:
            return wire.decode(self._opener.open(raw))
        except ForgedMessageError as exc:
            self._refusals.refused(exc)
            return None

    def _handshake(self) -> None:
        s, where = self._settings, f"{self.target.host}:{self.target.port}"
        hello = wire.Hello(s.agent_name, s.info, s.heads, self.group_key)
        self._post(hello)
        if not self._sock.poll(int(s.handshake_timeout_s * 1000)):
            raise _LinkError(
                FailureKind.PEER_UNREACHABLE,
                f"KV transfer peer at {where} did not answer the handshake within "
                f"{s.handshake_timeout_s:g} s",
            )
        raw = self._sock.recv()
        try:
            reply = wire.decode(self._opener.open(raw))
        except ForgedMessageError as exc:
            raise _LinkError(FailureKind.INCOMPATIBLE, _unauthenticated(where, raw, exc)) from None
        if isinstance(reply, wire.Refused):
            raise _LinkError(FailureKind(reply.failure), f"peer at {where} refused: {reply.error}")
        if not isinstance(reply, wire.Welcome):
            raise _LinkError(FailureKind.TRANSFER_ERROR, f"unexpected handshake reply {reply}")
        if reply.agent != self.target.agent_name or compatibility_problems(s.info, reply.info):
            # The receiver made a group for us: let it go now rather than at its timeout.
            self._post(wire.Bye(self.group_key), zmq.NOBLOCK)
        if reply.agent != self.target.agent_name:
            raise _LinkError(
                FailureKind.PEER_RESTARTED,
                f"target names agent {self.target.agent_name} but {reply.agent} answers at "
                f"{where}: the peer restarted, take a fresh target",
            )
        problems = compatibility_problems(s.info, reply.info)
        if problems:
            raise _LinkError(
                FailureKind.INCOMPATIBLE,
                f"KV transfer peer {reply.agent} is incompatible: " + "; ".join(problems),
            )
        self._remote_heads = reply.heads
        try:
            store = store_client(self.target.host, reply.store_port, s.op_timeout_s)
            self._group = open_pair_group(
                store, self.group_key, 0, self._kv.device, s.host, s.op_timeout_s,
                prefix=wire.rendezvous_prefix(s.key, self.group_key),
            )
        except Exception as exc:
            raise _LinkError(
                FailureKind.TRANSFER_ERROR,
                f"could not build the KV pair group with {reply.agent} at {where}: {exc}",
            ) from None

    def _serve(self) -> None:
        s = self._settings
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        seq = 0
        last_heard = last_ping = time.monotonic()
        while not self._stop.is_set():
            frame, tensor = self._next_frame(seq)
            if frame is not None:
                self._post(frame)
                if tensor is not None:
                    assert self._group is not None
                    with self._group.scope():
                        self._group.send(tensor)
                seq += 1
                self.frames_sent = seq
                last_heard = time.monotonic()  # a finished send proves the peer alive
                timeout_ms = 0
            else:
                timeout_ms = int(s.keepalive_s * 1000)
            for sock, _ in poller.poll(timeout_ms):
                if sock is self._wake_r:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                while self._sock.poll(0):
                    message = self._open(self._sock.recv())
                    if message is not None:
                        self._on_message(message)
                        last_heard = time.monotonic()
            now = time.monotonic()
            if now - last_heard > s.peer_timeout_s:
                raise _LinkError(
                    FailureKind.PEER_UNREACHABLE,
                    f"KV transfer peer {self.target.agent_name} silent for "
                    f"{now - last_heard:.1f} s",
                )
            if frame is None and now - last_ping >= s.keepalive_s:
                self._post(wire.Ping(self.group_key))
                last_ping = now

    def _next_frame(self, seq: int) -> tuple[wire.Frame | None, torch.Tensor | None]:
        """The next frame to send and its blocks, copied (under the lock: see ``cancel``).

        A write larger than ``max_frame_bytes`` goes as several frames; only its last one
        carries the chunk notice (and completes the write when acknowledged)."""
        with self._lock:
            current = self._q.current
            while current is None and self._q.writes:
                write = self._q.writes.popleft()
                heads = self._heads_for(write)
                if heads is not None:
                    frame_block = self._spec.block_bytes // self._spec.num_kv_heads * heads.count
                    per_frame = max(1, self._settings.max_frame_bytes // frame_block)
                    current = self._q.current = _Current(write, heads, per_frame)
            if current is None:
                return None, None
            write, heads = current.write, current.heads
            lo, hi = current.done, min(len(write.src), current.done + current.per_frame)
            last = hi == len(write.src)
            current.done = hi
            if last:
                self._q.current = None
            tensor = None
            if hi > lo:
                assert self._group is not None
                shape = frame_shape(self._spec, hi - lo, heads.count)
                out, self._staging = frame_buffer(self._staging, self._kv, shape)
                with self._group.scope():
                    if write.ready is not None:
                        torch.cuda.current_stream().wait_event(write.ready)
                    tensor = gather_blocks(
                        self._kv, write.src[lo:hi], self._settings.heads.local(heads), out
                    )
            self._q.unacked[seq] = (write.request_id, last)
            frame = wire.Frame(self.group_key, seq, write.request_id, write.dst[lo:hi].tolist(),
                               heads, write.notice if last else b"")
            return frame, tensor

    def _heads_for(self, write: OutgoingWrite) -> HeadRange | None:
        """The heads this write moves: those both we and the receiver hold."""
        mine, theirs = self._settings.heads, self._remote_heads
        assert theirs is not None
        common = overlap(mine, theirs)
        if common is not None:
            return common
        self._report(WriteFailed(
            write.request_id, FailureKind.INCOMPATIBLE,
            f"this sender holds KV heads {mine}, the receiver {theirs}: none in common",
        ))
        return None

    def _on_message(self, message: wire.Message) -> None:
        if isinstance(message, wire.Ack):
            with self._lock:
                entry = self._q.unacked.pop(message.seq, None)
            if entry is None:
                return
            rid, last = entry
            if message.ok:
                if last:
                    self._report(WriteDone(rid))
            else:
                self._report(WriteFailed(rid, FailureKind(message.failure), message.error))
        elif isinstance(message, wire.Pong):
            if not message.known:
                raise _LinkError(
                    FailureKind.TRANSFER_ERROR,
                    f"KV transfer peer {self.target.agent_name} dropped our group",
                )
        else:
            logger.warning("KV link to %s: ignoring %s", self.target.agent_name, message.kind)


def _unauthenticated(where: str, raw: bytes, exc: ForgedMessageError) -> str:
    """Why a handshake answer that does not verify fails the link: the receiver's unsealed
    refusal (it could not authenticate us) if that is what came."""
    try:
        plain = wire.decode(raw)
    except ValueError:
        plain = None
    if isinstance(plain, wire.Refused):
        return f"KV transfer peer at {where} refused: {plain.error[:200]}"
    return f"KV transfer peer at {where} sent an unauthenticated answer: {exc}"
