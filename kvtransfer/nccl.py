"""torch.distributed backend ("nccl"): KV blocks over point-to-point sends in pair groups.

Same contract as the NIXL backend (``pdserve.kvtransfer.base``): reservation-addressed blocks,
chunked streaming, completion and failure within the lease. The bytes move over a two-rank
process group per (sender, receiver) connector pair, NCCL between CUDA caches and gloo between
CPU caches (the same code; the log names the one in use); a ZMQ side channel on the KV host
carries the handshake, one frame per write announcing what comes (so the receiver posts its
receive only when a send is coming: no operation ever waits idle for a peer) and the acks.

- Sending (``pdserve.kvtransfer.nccl_send``): a link per receiver, with its own thread, built
  on first use and kept; the owner thread only queues writes. A link that breaks (peer dead,
  timeout, refused) fails the requests it held; the next write to that receiver builds a new
  link and a new group. A target naming an agent that no longer answers is refused as
  ``PEER_RESTARTED``.
- Receiving (``pdserve.kvtransfer.nccl_recv``): a thread per sending peer lands frames only
  into blocks the owner currently expects for that request, so a failed request's blocks are
  reusable at once (``reuse_after`` is the failure time).
- Every group operation has a timeout (``op_timeout_s``) and peers silent past
  ``peer_timeout_s`` are dropped: a dead peer surfaces as a failed transfer, never a hang.
- Authentication: every side-channel message is sealed with the cluster's ``ChannelKey`` and
  verified (forged and replayed ones are refused), as NIXL's handshake is; the rendezvous
  store, unauthenticated itself, is only found through a sealed ``Welcome`` and each pair
  rendezvous under a name derived from the key (``nccl_wire``, ``pair_group``).

Tensor parallelism: a connector holds heads ``kv_heads`` of the model's ``total_kv_heads``
(all by default). A write moves, of every block, the heads both the sender and the receiver
hold (``pdserve.kvtransfer.heads.transfer_plan`` says which sender rank serves which receiver
rank); a receiver holding heads of several senders gets one part from each (``part``).

Not thread-safe: one owner thread calls every method.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import zmq

from pdserve.engine.config import KVCacheSpec
from pdserve.kvtransfer.auth import ChannelKey
from pdserve.kvtransfer.base import (
    FailureKind,
    IncompatiblePeerError,
    KVConnector,
    KVTransferError,
    PeerUnreachableError,
    PollResult,
    TransferTarget,
)
from pdserve.kvtransfer.heads import HeadRange
from pdserve.kvtransfer.layout import check_kv_cache, checked_block_ids, checked_write, peer_info
from pdserve.kvtransfer.ledger import ChunkNotice, ReceiveLedger, SendLedger, block_digest
from pdserve.kvtransfer.nccl_recv import NoticeArrived, ReceiveFailed, ReceiveSide
from pdserve.kvtransfer.nccl_send import (
    LinkBroken,
    LinkSettings,
    OutgoingWrite,
    SendLink,
    WriteDone,
    WriteFailed,
)
from pdserve.kvtransfer.pair_group import backend_for

logger = logging.getLogger(__name__)

BACKEND = "nccl"


@dataclass(frozen=True, slots=True)
class NcclConfig:
    """Settings of one nccl-transport connector.

    ``host``/``port``: the side channel and the rendezvous store listen there (port 0: any
    free one); the pair groups' own connections use ``host`` too (gloo; NCCL follows
    ``NCCL_SOCKET_IFNAME``). ``op_timeout_s`` bounds building a group and every send or receive
    on it; ``keepalive_s`` is how often an idle link pings; ``peer_timeout_s`` how long a peer
    may stay silent before its link or group is dropped. ``lease_s`` bounds a request on the
    sending side, as for NIXL. ``kv_heads``: the model KV heads ``[start, stop)`` this cache
    holds, of ``total_kv_heads`` (None: all of them, as the cache's spec says). A write is
    sent in frames of at most ``max_frame_bytes`` (at least one block): the transfer buffer each
    side keeps per peer is that large at most. ``channel_key`` (required) seals the side
    channel: peers must share it.
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 0
    name: str = "kv"
    lease_s: float = 30.0
    handshake_timeout_s: float = 5.0
    op_timeout_s: float = 10.0
    keepalive_s: float = 1.0
    peer_timeout_s: float = 10.0
    kv_heads: tuple[int, int] | None = None
    total_kv_heads: int | None = None
    max_frame_bytes: int = 64 << 20
    channel_key: ChannelKey = field(kw_only=True)

    def __post_init__(self) -> None:
        for name in ("lease_s", "handshake_timeout_s", "op_timeout_s", "keepalive_s",
                     "max_frame_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.peer_timeout_s <= self.keepalive_s:
            raise ValueError(
                f"peer_timeout_s ({self.peer_timeout_s}) must exceed keepalive_s "
                f"({self.keepalive_s})"
            )


class NcclConnector(KVConnector):
    """A worker's torch.distributed endpoint around its own KV cache tensor.

    Keep the tensor alive and in place until ``close()``. Ids passed to
    ``write_blocks``/``expect`` index its first dimension.
    """

    def __init__(self, kv_cache: torch.Tensor, spec: KVCacheSpec, config: NcclConfig) -> None:
        self.num_blocks = check_kv_cache(kv_cache, spec)
        self.backend = backend_for(kv_cache.device)
        self.spec, self.config = spec, config
        total = config.total_kv_heads or spec.num_kv_heads
        heads = HeadRange(*(config.kv_heads or (0, spec.num_kv_heads)))
        if heads.count != spec.num_kv_heads or heads.stop > total:
            raise ValueError(
                f"kv_heads {heads} of {total} do not match the cache's {spec.num_kv_heads} heads"
            )
        self.heads = heads
        self.info = replace(peer_info(spec, config.model), num_kv_heads=total)
        self.agent_name = f"{config.name}-{uuid.uuid4().hex[:12]}"
        self._kv = kv_cache
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._events: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._settings = LinkSettings(
            self.agent_name, self.info, heads, config.host, config.handshake_timeout_s,
            config.op_timeout_s, config.keepalive_s, config.peer_timeout_s,
            config.max_frame_bytes, config.channel_key,
        )
        self._receiver = ReceiveSide(
            self._ctx, kv_cache, spec, self._settings, config.port, self._events.put
        )
        self._send = SendLedger(config.lease_s)
        # Late writes never land after a failure (see nccl_recv): no grace before reuse.
        self._recv = ReceiveLedger(grace_s=0.0)
        self._links: dict[str, SendLink] = {}
        self._dead: dict[str, float] = {}
        self._closed = False
        self.links_built = 0  # SendLinks (pair groups as sender) made so far
        self._frames_retired = 0  # frames sent by links since retired
        self._stopping: list[threading.Thread] = []  # threads of retired links, maybe running
        logger.info(
            "KV transport nccl: torch.distributed %s on %s, connector %s (%d blocks x %d B, "
            "heads %s of %d), side channel %s:%d",
            self.backend, kv_cache.device, self.agent_name, self.num_blocks, spec.block_bytes,
            heads, total, self._receiver.host, self._receiver.port,
        )

    # -- contract ---------------------------------------------------------------------------

    def describe(self) -> TransferTarget:
        return TransferTarget(
            backend=BACKEND,
            agent_name=self.agent_name,
            host=self._receiver.host,
            port=self._receiver.port,
            num_blocks=self.num_blocks,
            info=self.info,
        )

    def connect(self, target: TransferTarget) -> None:
        """Build the link to ``target`` now (blocking, bounded by the timeouts).

        Optional: ``write_blocks`` connects on first use. Raises ``IncompatiblePeerError``,
        ``PeerUnreachableError`` or ``KVTransferError`` on failure.
        """
        self._require_open()
        link = self._link_for(target)
        cfg = self.config
        link.ready.wait(cfg.handshake_timeout_s + cfg.op_timeout_s + 5.0)
        if link.failure is None and not link.ready.is_set():
            raise KVTransferError(f"KV link to {target.agent_name} is not up in time")
        if link.failure is not None:
            kind, message = link.failure
            if kind is FailureKind.INCOMPATIBLE:
                raise IncompatiblePeerError(message)
            if kind is FailureKind.PEER_UNREACHABLE:
                raise PeerUnreachableError(message)
            raise KVTransferError(message)

    def write_blocks(
        self,
        target: TransferTarget,
        request_id: str,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
        *,
        last: bool = False,
        payload: bytes = b"",
        part: tuple[int, int] = (0, 1),
    ) -> int:
        """See ``KVConnector.write_blocks``. Returns -1 (and writes nothing) for a request
        already reported failed; its failure was or will be reported by ``poll()``."""
        self._require_open()
        src, dst = checked_write(BACKEND, target, src_block_ids, dst_block_ids, self.num_blocks)
        if request_id in self._dead:
            return -1
        now = time.monotonic()
        chunk = self._send.begin_write(request_id, last, now)
        notice = ChunkNotice(
            request_id, chunk, len(dst), block_digest(dst.tolist()),
            total_chunks=chunk + 1 if last else None, payload=payload,
            part=part[0], parts=part[1],
        )
        ready = None
        if self._kv.device.type == "cuda" and len(src):
            ready = torch.cuda.Event()
            ready.record()
        link = self._link_for(target)
        if not link.submit(OutgoingWrite(request_id, src, dst, notice.encode(), ready)):
            kind, message = link.failure or (FailureKind.TRANSFER_ERROR, "link closed")
            self._fail(request_id, kind, message, now)
        return chunk

    def expect(self, request_id: str, dst_block_ids: Sequence[int], lease_s: float) -> None:
        self._require_open()
        ids = checked_block_ids(dst_block_ids, self.num_blocks, "expected").tolist()
        self._recv.expect(request_id, ids, lease_s, time.monotonic())
        self._receiver.allow(request_id, ids)

    def abort(self, request_id: str, *, writes_done: bool = False) -> None:
        """See ``KVConnector.abort``. ``writes_done`` changes nothing here: once the receiver
        revoked a request no write of it lands, so its blocks are reusable at once anyway."""
        now = time.monotonic()
        self._fail(request_id, FailureKind.ABORTED, "aborted by the owner", now)
        self._receiver.revoke(request_id)
        self._recv.fail(request_id, FailureKind.ABORTED, "aborted by the owner", now)

    def writes_pending(self, request_id: str) -> bool:
        return any(link.pending(request_id) for link in self._links.values())

    def poll(self) -> PollResult:
        self._require_open()
        now = time.monotonic()
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            self._apply(event, now)
        for request_id in self._send.expired(now):
            self._fail(
                request_id, FailureKind.TIMEOUT,
                f"writes not completed within the {self.config.lease_s:g} s lease", now,
            )
        self._recv.check_leases(now)
        result = PollResult()
        result.sent, failed = self._send.drain()
        result.received, failed_in = self._recv.drain()
        for request_id in [r.request_id for r in result.received] + [
            f.request_id for f in failed_in
        ]:
            self._receiver.revoke(request_id)
        result.failed = failed + failed_in
        horizon = now - 2 * self.config.lease_s
        self._dead = {rid: t for rid, t in self._dead.items() if t > horizon}
        return result

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        now = time.monotonic()
        for request_id in self._send.active():
            self._fail(request_id, FailureKind.ABORTED, "connector closed", now)
        for link in list(self._links.values()):
            link.close(wait_s=0.5)
            self._stopping.append(link.thread)
        self._links.clear()
        self._receiver.close()
        # The ZMQ context ends once every thread closed its socket; a link thread in a send
        # ends at the latest after op_timeout_s, so this may finish in the background.
        threads = [t for t in self._stopping + [self._receiver.thread] if t.is_alive()]

        def finish() -> None:
            for thread in threads:
                thread.join()
            self._ctx.term()

        if threads:
            threading.Thread(target=finish, name=f"kv-close-{self.agent_name}",
                             daemon=True).start()
        else:
            finish()

    def stats(self) -> dict[str, object]:
        """The process-group backend, the pair groups this connector holds now (as sender
        and as receiver) and how many it has built, and the requests still in flight."""
        return {
            "backend": self.backend,
            "send_links": sum(1 for link in self._links.values() if not link.broken),
            "send_links_built": self.links_built,
            "send_frames": self._frames_retired + sum(k.frames_sent for k in self._links.values()),
            "receive_groups": self._receiver.group_count,
            "receive_groups_built": self._receiver.groups_built,
            "active_sends": len(self._send.active()),
            "active_receives": len(self._recv.active()),
        }

    # -- internals --------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"nccl KV connector {self.agent_name} is closed")

    def _apply(self, event: object, now: float) -> None:
        if isinstance(event, WriteDone):
            self._send.write_done(event.request_id)
        elif isinstance(event, WriteFailed):
            self._fail(event.request_id, event.kind, event.message, now)
        elif isinstance(event, LinkBroken):
            self._retire(event.link, event.kind, event.message, now)
        elif isinstance(event, NoticeArrived):
            self._recv.on_notice(event.notice, now)
        elif isinstance(event, ReceiveFailed):
            self._receiver.revoke(event.request_id)
            self._recv.fail(event.request_id, event.kind, event.message, now)

    def _link_for(self, target: TransferTarget) -> SendLink:
        now = time.monotonic()
        link = self._links.get(target.agent_name)
        if link is not None and link.failure is not None:
            self._retire(link, *link.failure, now)
            link = None
        if link is not None:
            return link
        for other in list(self._links.values()):
            if (other.target.host, other.target.port) == (target.host, target.port):
                self._retire(
                    other, FailureKind.PEER_RESTARTED,
                    f"peer at {target.host}:{target.port} restarted as {target.agent_name}", now,
                )
        link = SendLink(self._ctx, self._kv, self.spec, self._settings, target, self._events.put)
        self._links[target.agent_name] = link
        self.links_built += 1
        return link

    def _retire(self, link: SendLink, kind: FailureKind, message: str, now: float) -> None:
        """Forget ``link`` (stopping it) and fail every request it still held."""
        if self._links.get(link.target.agent_name) is link:
            del self._links[link.target.agent_name]
            self._frames_retired += link.frames_sent
        self._stopping = [t for t in self._stopping if t.is_alive()] + [link.thread]
        for request_id in sorted(link.close(wait_s=0.0)):
            self._fail(request_id, kind, message, now)

    def _fail(self, request_id: str, kind: FailureKind, message: str, now: float) -> None:
        """Fail a sent request: drop its queued writes, wait out a copy of its blocks."""
        if not self._send.fail(request_id, kind, message, now):
            return
        self._dead[request_id] = now
        for link in self._links.values():
            link.cancel(request_id)
