"""NIXL backend: UCX WRITEs of whole KV blocks (all layers) with completion notifications.

The connector registers its KV cache tensor once (DRAM on CPU, VRAM on CUDA) and prepares one
descriptor list with one entry per block. For each peer it learns the peer's metadata and KV
region through the ZMQ side channel (``pdserve.kvtransfer.handshake``) and prepares the peer's block
list once; a write is then ``make_prepped_xfer`` over block indices, so nothing is rebuilt per
request. Each write carries a ``ChunkNotice`` that UCX delivers after the data.

Failure handling: handshakes run on a helper thread (they never block the owner); a transport
error retires the peer (its in-flight requests fail, the next write re-handshakes); a target
whose agent no longer answers at its address is refused as ``PEER_RESTARTED``; every request
has a lease after which its writes are cancelled and it is reported failed. A NIXL remote agent
is removed only after all transfer handles that reference it are released.

Tensor parallelism: a connector may hold some of the model's KV heads (``kv_heads``). Between
caches holding the same heads a write moves whole blocks (one descriptor per block, prepared
once per peer). Otherwise it moves the heads both sides hold: the cache layout keeps a
token's heads side by side, so such a write has one descriptor per (block, layer, K/V,
token) on each side, built per write; a receiver holding heads of several senders gets one
part from each (``part``, counted by ``pdserve.kvtransfer.ledger``).

Not thread-safe: one owner thread calls every method. UCX picks its transports itself; set
``UCX_TLS`` in the environment to restrict them (``describe_transports`` reports the result).
UCX's TCP transport listens on every network interface unless ``UCX_NET_DEVICES`` names
some: when the connector's host is a loopback address and that variable is unset, the
connector sets it to ``lo`` (the process's UCX then listens on loopback only, like every
other internal socket); on other hosts name the devices yourself (the Helm examples do).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

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
from pdserve.kvtransfer.handshake import (
    REQUEST_CHANNEL,
    HandshakeServer,
    KVRegion,
    PeerHello,
    fetch_peer,
)
from pdserve.kvtransfer.heads import HeadRange, overlap
from pdserve.kvtransfer.layout import check_kv_cache, checked_block_ids, checked_write, peer_info
from pdserve.kvtransfer.ledger import ChunkNotice, ReceiveLedger, SendLedger, block_digest

logger = logging.getLogger(__name__)

BACKEND = "nixl"


@dataclass(frozen=True, slots=True)
class NixlConfig:
    """Settings of one NIXL connector.

    ``progress_thread`` starts NIXL's UCX progress thread, which busy-polls a whole core.
    Without it (the default) a connector thread progresses UCX every ``progress_interval_s``
    while transfers are expected or in flight and every ``idle_progress_interval_s`` otherwise:
    connection set-up and a WRITE's completion need the RECEIVER to progress too, even when
    its owner is not polling. ``poll()`` progresses it as well. ``expect`` and
    ``write_blocks`` wake the thread, so the switch to the short interval is immediate (a
    connection always goes to a receiver that expects writes); at rest the thread costs
    next to nothing (at 2 ms it took 3-4% of a core).
    ``lease_s`` bounds a request on the sending side (from its first write to its last write's
    completion) and is the grace a receiver adds before a failed request's blocks may be reused.
    ``channel_key`` (required) seals the handshake side channel: peers must share it.
    ``kv_heads``: the model KV heads ``[start, stop)`` this cache holds, of ``total_kv_heads``
    (None: all of them; see "Tensor parallelism" above).
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 0
    name: str = "kv"
    lease_s: float = 30.0
    handshake_timeout_s: float = 5.0
    progress_thread: bool = False
    progress_interval_s: float = 0.0001
    idle_progress_interval_s: float = 0.02
    kv_heads: tuple[int, int] | None = None
    total_kv_heads: int | None = None
    channel_key: ChannelKey = field(kw_only=True)

    def __post_init__(self) -> None:
        if self.lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {self.lease_s}")
        if self.handshake_timeout_s <= 0:
            raise ValueError(
                f"handshake_timeout_s must be positive, got {self.handshake_timeout_s}"
            )


def _block_descs(base_addr: int, num_blocks: int, block_bytes: int, device_id: int) -> np.ndarray:
    descs = np.empty((num_blocks, 3), dtype=np.uint64)
    descs[:, 0] = base_addr + np.arange(num_blocks, dtype=np.uint64) * np.uint64(block_bytes)
    descs[:, 1] = block_bytes
    descs[:, 2] = device_id
    return descs


@dataclass(slots=True)
class _Write:
    request_id: str
    peer: str
    src: np.ndarray
    dst: np.ndarray
    notice: bytes
    handle: Any = None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


@dataclass(slots=True)
class _Peer:
    target: TransferTarget
    future: Future[PeerHello] | None
    remote_name: str | None = None
    dlist: Any = None  # whole blocks (equal heads); None when writes move head ranges
    waiting: list[_Write] = field(default_factory=list)
    region: KVRegion | None = None
    heads: HeadRange | None = None  # the peer's KV heads
    moved: HeadRange | None = None  # the heads a write to it moves, when not all of a block


def _head_descs(base: int, block_ids: np.ndarray, block_bytes: int, row_bytes: int,
                offset: int, length: int, device_id: int) -> np.ndarray:
    """One descriptor per (block, layer, K/V, token) row of ``block_ids``: ``length`` bytes at
    ``offset`` in each row of ``row_bytes`` (a cache holding some heads of every token)."""
    rows = np.arange(block_bytes // row_bytes, dtype=np.uint64) * np.uint64(row_bytes)
    starts = np.uint64(base) + block_ids.astype(np.uint64)[:, None] * np.uint64(block_bytes)
    descs = np.empty((len(block_ids) * len(rows), 3), dtype=np.uint64)
    descs[:, 0] = (starts + rows[None, :] + np.uint64(offset)).reshape(-1)
    descs[:, 1] = length
    descs[:, 2] = device_id
    return descs


class NixlConnector(KVConnector):
    """A worker's NIXL endpoint around its own KV cache tensor (see ``pdserve.kvtransfer.base``).

    The tensor is registered for the connector's lifetime: keep it alive and do not reallocate
    it until ``close()``. Ids passed to ``write_blocks``/``expect`` index its first dimension.
    """

    def __init__(self, kv_cache: torch.Tensor, spec: KVCacheSpec, config: NixlConfig) -> None:
        tls = os.environ.get("UCX_TLS")
        if tls is not None and not tls.strip():
            # UCX then enables no transport and NIXL fails obscurely later.
            raise ValueError(
                "UCX_TLS is set but empty; unset it (UCX picks its transports) or name "
                "transports, e.g. UCX_TLS=tcp,cma,self"
            )
        if "UCX_NET_DEVICES" not in os.environ and _is_loopback(config.host):
            os.environ["UCX_NET_DEVICES"] = "lo"  # read by UCX when the agent starts
        from nixl import nixl_agent, nixl_agent_config, nixl_thread_sync_t

        self.num_blocks = check_kv_cache(kv_cache, spec)
        self.spec, self.config = spec, config
        total = config.total_kv_heads or spec.num_kv_heads
        self.heads = HeadRange(*(config.kv_heads or (0, spec.num_kv_heads)))
        if self.heads.count != spec.num_kv_heads or self.heads.stop > total:
            raise ValueError(f"kv_heads {self.heads} of {total} do not match the cache's "
                             f"{spec.num_kv_heads} heads")
        self.info = replace(peer_info(spec, config.model), num_kv_heads=total)
        self.agent_name = f"{config.name}-{uuid.uuid4().hex[:12]}"
        self._kv = kv_cache
        self._mem_type = "DRAM" if kv_cache.device.type == "cpu" else "VRAM"
        device_id = 0 if kv_cache.device.type == "cpu" else int(kv_cache.device.index or 0)
        self._agent = nixl_agent(
            self.agent_name,
            nixl_agent_config(
                enable_prog_thread=config.progress_thread,
                backends=["UCX"],
                # The progress ticker calls the agent beside the owner thread.
                sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
            ),
        )
        if "UCX" not in self._agent.backends:
            raise RuntimeError(
                "NIXL has no UCX backend here (plugin missing or UCX failed to start; check "
                "UCX_TLS and the NIXL install)"
            )
        self._reg = self._agent.register_memory(kv_cache)
        self._block_bytes = spec.block_bytes
        descs = _block_descs(kv_cache.data_ptr(), self.num_blocks, spec.block_bytes, device_id)
        self._local_dlist = self._agent.prep_xfer_dlist("NIXL_INIT_AGENT", descs, self._mem_type)
        self._device_id = device_id
        self._row_bytes = spec.head_dim * kv_cache.element_size()  # one head of one token
        region = KVRegion(
            kv_cache.data_ptr(), self.num_blocks, spec.block_bytes, self._mem_type, device_id,
            (self.heads.start, self.heads.stop),
        )
        self._server = HandshakeServer(
            config.host,
            config.port,
            self.agent_name,
            self.info,
            region,
            self._agent.get_agent_metadata(),
            config.channel_key,
        )
        self._sealer = config.channel_key.sealer(REQUEST_CHANNEL)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-handshake")
        self._send = SendLedger(config.lease_s)
        self._recv = ReceiveLedger(grace_s=config.lease_s)
        self._peers: dict[str, _Peer] = {}
        self._inflight: list[_Write] = []
        self._zombies: list[_Write] = []  # cancelled handles NIXL has not released yet
        self._retired: list[tuple[str, Any]] = []  # (remote name, dlist) to drop when safe
        self._dead: dict[str, float] = {}  # failed request id -> when; later writes are dropped
        self._closed = False
        self._stash: list[bytes] = []  # notifications the ticker collected
        self._stash_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # work for the ticker: progress at the short interval
        self._ticker: threading.Thread | None = None
        if not config.progress_thread:
            self._ticker = threading.Thread(
                target=self._tick, name=f"kv-progress-{self.agent_name}", daemon=True
            )
            self._ticker.start()
        logger.info(
            "NIXL connector %s: %d blocks x %d B (%s), handshake on %s:%d",
            self.agent_name,
            self.num_blocks,
            spec.block_bytes,
            self._mem_type,
            self._server.host,
            self._server.port,
        )

    # -- contract ---------------------------------------------------------------------------

    def describe(self) -> TransferTarget:
        return TransferTarget(
            backend=BACKEND,
            agent_name=self.agent_name,
            host=self._server.host,
            port=self._server.port,
            num_blocks=self.num_blocks,
            info=self.info,
        )

    def connect(self, target: TransferTarget) -> None:
        """Handshake with ``target`` now (blocking, bounded by the handshake timeout).

        Optional: ``write_blocks`` connects on first use. Raises ``IncompatiblePeerError``,
        ``PeerUnreachableError`` or ``KVTransferError`` (peer restarted) on failure.
        """
        self._require_open()
        peer = self._peer_for(target)
        if peer.future is None:
            return
        peer.future.exception(timeout=self.config.handshake_timeout_s + 5.0)
        error = self._finish_handshake(peer)
        if error is not None:
            kind, message = error
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
            logger.debug("dropping write of failed request %s", request_id)
            return -1
        now = time.monotonic()
        chunk = self._send.begin_write(request_id, last, now)
        notice = ChunkNotice(
            request_id,
            chunk,
            len(dst),
            block_digest(dst.tolist()),
            total_chunks=chunk + 1 if last else None,
            payload=payload,
            part=part[0],
            parts=part[1],
        )
        peer = self._peer_for(target)
        write = _Write(request_id, target.agent_name, src, dst, notice.encode())
        if peer.future is None:
            self._post(peer, write)
        else:
            peer.waiting.append(write)
        self._wake.set()
        return chunk

    def expect(self, request_id: str, dst_block_ids: Sequence[int], lease_s: float) -> None:
        self._require_open()
        checked_block_ids(dst_block_ids, self.num_blocks, "expected")
        self._recv.expect(request_id, dst_block_ids, lease_s, time.monotonic())
        self._wake.set()

    def abort(self, request_id: str, *, writes_done: bool = False) -> None:
        now = time.monotonic()
        self._fail(request_id, FailureKind.ABORTED, "aborted by the owner", now)
        self._recv.fail(request_id, FailureKind.ABORTED, "aborted by the owner", now,
                        grace_s=0.0 if writes_done else None)

    def writes_pending(self, request_id: str) -> bool:
        """True while a write of ``request_id`` may still land at its peer (posted and not
        yet completed or released)."""
        return any(w.request_id == request_id for w in (*self._inflight, *self._zombies)) or any(
            w.request_id == request_id for p in self._peers.values() for w in p.waiting)

    def poll(self) -> PollResult:
        self._require_open()
        now = time.monotonic()
        for peer in [p for p in self._peers.values() if p.future is not None]:
            if peer.future is not None and peer.future.done():
                self._finish_handshake(peer)
        self._check_inflight(now)
        for request_id in self._send.expired(now):
            self._fail(
                request_id,
                FailureKind.TIMEOUT,
                f"writes not completed within the {self.config.lease_s:g} s lease",
                now,
            )
        self._receive_notices(now)
        self._recv.check_leases(now)
        self._reap(now)
        result = PollResult()
        result.sent, failed = self._send.drain()
        result.received, failed_in = self._recv.drain()
        result.failed = failed + failed_in
        return result

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5.0)
        now = time.monotonic()
        for request_id in self._send.active():
            self._fail(request_id, FailureKind.ABORTED, "connector closed", now)
        for peer_name in list(self._peers):
            self._retire(peer_name, FailureKind.ABORTED, "connector closed", now)
        self._reap(now)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._server.close()
        try:
            self._local_dlist.release()
            self._agent.deregister_memory(self._reg)
        except Exception:  # teardown must go on
            logger.exception("NIXL teardown of %s failed", self.agent_name)
        if self._zombies:
            logger.error("%d NIXL transfers could not be cancelled at close", len(self._zombies))
        del self._agent

    # -- internals --------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"NIXL connector {self.agent_name} is closed")

    def _peer_for(self, target: TransferTarget) -> _Peer:
        peer = self._peers.get(target.agent_name)
        if peer is not None:
            return peer
        now = time.monotonic()
        for name, other in list(self._peers.items()):
            if (other.target.host, other.target.port) == (target.host, target.port):
                self._retire(
                    name,
                    FailureKind.PEER_RESTARTED,
                    f"peer at {target.host}:{target.port} restarted as {target.agent_name}",
                    now,
                )
        future = self._pool.submit(
            fetch_peer,
            target.host,
            target.port,
            self.agent_name,
            self.info,
            self.config.handshake_timeout_s,
            self.config.channel_key,
            self._sealer,
        )
        peer = self._peers[target.agent_name] = _Peer(target, future)
        return peer

    def _finish_handshake(self, peer: _Peer) -> tuple[FailureKind, str] | None:
        """Complete a finished handshake on the owner thread; on failure fail its writes."""
        assert peer.future is not None
        name = peer.target.agent_name
        where = f"{peer.target.host}:{peer.target.port}"
        error: tuple[FailureKind, str] | None = None
        try:
            hello = peer.future.result()
        except IncompatiblePeerError as exc:
            error = (FailureKind.INCOMPATIBLE, str(exc))
        except PeerUnreachableError as exc:
            error = (FailureKind.PEER_UNREACHABLE, str(exc))
        except Exception as exc:  # any side-channel failure fails the peer
            error = (FailureKind.PEER_UNREACHABLE, f"handshake with {where} failed: {exc}")
        else:
            if hello.agent_name != name:
                error = (
                    FailureKind.PEER_RESTARTED,
                    f"target names agent {name} but {hello.agent_name} answers at {where}: "
                    "the peer restarted, take a fresh target",
                )
            else:
                error = self._check_heads(peer, hello)
        if error is None:
            try:
                remote = self._agent.add_remote_agent(hello.metadata)
                peer.remote_name = remote.decode() if isinstance(remote, bytes) else str(remote)
                r = hello.region
                if peer.moved is None:  # same heads: whole blocks
                    descs = _block_descs(r.base_addr, r.num_blocks, r.block_bytes, r.device_id)
                    peer.dlist = self._agent.prep_xfer_dlist(peer.remote_name, descs,
                                                             r.mem_type)
            except Exception as exc:  # NIXL raises several binding errors
                error = (FailureKind.TRANSFER_ERROR, f"cannot load metadata of {name}: {exc}")
        peer.future = None
        if error is not None:
            self._retire(name, error[0], error[1], time.monotonic())
            return error
        logger.info("KV peer %s at %s connected", name, where)
        waiting, peer.waiting = peer.waiting, []
        for write in waiting:
            if self._send.is_active(write.request_id):
                self._post(peer, write)
        return None

    def _check_heads(self, peer: _Peer, hello: PeerHello) -> tuple[FailureKind, str] | None:
        """Record which heads writes to ``peer`` move; the problem if none or sizes differ."""
        r = hello.region
        theirs = HeadRange(*(r.kv_heads or (0, hello.info.num_kv_heads)))
        mine = self.heads
        if r.block_bytes * mine.count != self._block_bytes * theirs.count:
            return (FailureKind.INCOMPATIBLE, f"block bytes: local {self._block_bytes} for "
                    f"{mine.count} KV heads vs peer {r.block_bytes} for {theirs.count}")
        common = overlap(mine, theirs)
        if common is None:
            return (FailureKind.INCOMPATIBLE,
                    f"we hold KV heads {mine}, the peer {theirs}: none in common")
        peer.region, peer.heads = r, theirs
        peer.moved = None if theirs == mine else common
        return None

    def _sliced_xfer(self, peer: _Peer, write: _Write) -> Any:
        """A WRITE of the heads ``peer.moved`` of ``write``'s blocks (descriptors built now)."""
        r, moved, theirs = peer.region, peer.moved, peer.heads
        assert r is not None and moved is not None and theirs is not None
        row = self._row_bytes
        length = moved.count * row
        local = _head_descs(self._kv.data_ptr(), write.src, self._block_bytes,
                            self.heads.count * row, (moved.start - self.heads.start) * row,
                            length, self._device_id)
        remote = _head_descs(r.base_addr, write.dst, r.block_bytes, theirs.count * row,
                             (moved.start - theirs.start) * row, length, r.device_id)
        return self._agent.initialize_xfer(
            "WRITE", self._agent.get_xfer_descs(local, self._mem_type),
            self._agent.get_xfer_descs(remote, r.mem_type), peer.remote_name, write.notice)

    def _post(self, peer: _Peer, write: _Write) -> None:
        now = time.monotonic()
        try:
            if len(write.src) == 0:
                self._agent.send_notif(peer.remote_name, write.notice)
                self._send.write_done(write.request_id)
                return
            if peer.moved is not None:
                write.handle = self._sliced_xfer(peer, write)
            else:
                write.handle = self._agent.make_prepped_xfer(
                    "WRITE", self._local_dlist, write.src, peer.dlist, write.dst, write.notice
                )
            state = self._agent.transfer(write.handle)
        except Exception as exc:
            self._retire(
                write.peer, FailureKind.TRANSFER_ERROR, f"posting failed: {exc}", now, also=write
            )
            return
        self._inflight.append(write)
        if state == "ERR":
            self._retire(write.peer, FailureKind.TRANSFER_ERROR, "transfer refused", now)

    def _check_inflight(self, now: float) -> None:
        broken: dict[str, str] = {}
        still: list[_Write] = []
        for write in self._inflight:
            try:
                state = self._agent.check_xfer_state(write.handle)
            except Exception as exc:
                state, detail = "ERR", str(exc)
            else:
                detail = "transfer failed"
            if state == "PROC":
                still.append(write)
            elif state == "DONE":
                self._release(write)
                self._send.write_done(write.request_id)
            else:
                still.append(write)  # released by _retire below
                broken.setdefault(write.peer, detail)
        self._inflight = still
        for peer_name, detail in broken.items():
            self._retire(peer_name, FailureKind.TRANSFER_ERROR, detail, now)

    def _fail(self, request_id: str, kind: FailureKind, message: str, now: float) -> None:
        """Fail a sent request: cancel its writes, drop its queued ones, remember it dead."""
        if not self._send.fail(request_id, kind, message, now):
            return
        self._dead[request_id] = now
        keep = []
        for write in self._inflight:
            if write.request_id == request_id:
                self._release(write)
            else:
                keep.append(write)
        self._inflight = keep
        for peer in self._peers.values():
            peer.waiting = [w for w in peer.waiting if w.request_id != request_id]

    def _retire(
        self,
        peer_name: str,
        kind: FailureKind,
        message: str,
        now: float,
        also: _Write | None = None,
    ) -> None:
        """Forget a peer: fail every request with writes to it; the next write re-handshakes."""
        peer = self._peers.pop(peer_name, None)
        requests = {w.request_id for w in self._inflight if w.peer == peer_name}
        if peer is not None:
            requests |= {w.request_id for w in peer.waiting}
        if also is not None:
            requests.add(also.request_id)
        for request_id in sorted(requests):
            self._fail(request_id, kind, message, now)
        if peer is not None and peer.remote_name is not None:
            self._retired.append((peer.remote_name, peer.dlist))
        if peer is not None:
            logger.warning("KV peer %s retired (%s): %s", peer_name, kind.value, message)

    def _release(self, write: _Write) -> None:
        try:
            write.handle.release()
        except Exception:  # NIXL could not cancel it yet; retried in _reap
            self._zombies.append(write)

    def _reap(self, now: float) -> None:
        zombies, self._zombies = self._zombies, []
        for write in zombies:
            self._release(write)
        busy = {w.peer for w in self._zombies} | {w.peer for w in self._inflight}
        keep = []
        for remote_name, dlist in self._retired:
            if remote_name in busy:  # NIXL remote names are our peer keys (checked at handshake)
                keep.append((remote_name, dlist))
                continue
            try:
                if dlist is not None:
                    dlist.release()
                self._agent.remove_remote_agent(remote_name)
            except Exception:
                logger.exception("could not remove NIXL remote agent %s", remote_name)
        self._retired = keep
        horizon = now - 2 * self.config.lease_s
        self._dead = {rid: t for rid, t in self._dead.items() if t > horizon}

    def _tick(self) -> None:
        """Progress UCX (and collect notifications) while the owner thread is elsewhere."""
        fast, idle = self.config.progress_interval_s, self.config.idle_progress_interval_s
        interval = idle
        while True:
            if self._wake.wait(interval):
                self._wake.clear()
            if self._stop.is_set():  # close() sets both: the wait ends at once
                return
            # Reading the owner's containers' sizes is safe under the GIL; a stale answer
            # only delays the switch by one tick.
            busy = bool(self._inflight) or self._recv.has_active()
            interval = fast if busy else idle
            try:
                notifs = self._agent.get_new_notifs()
            except Exception:
                logger.exception("NIXL progress of %s failed", self.agent_name)
                continue
            if notifs:
                with self._stash_lock:
                    self._stash.extend(raw for msgs in notifs.values() for raw in msgs)

    def _receive_notices(self, now: float) -> None:
        try:
            notifs = self._agent.get_new_notifs()
        except Exception:
            logger.exception("reading NIXL notifications failed")
            notifs = {}
        with self._stash_lock:
            messages, self._stash = self._stash, []
        messages.extend(raw for msgs in notifs.values() for raw in msgs)
        for raw in messages:
            notice = ChunkNotice.decode(raw)
            if notice is None:
                logger.warning("ignoring a notification that is not a KV chunk notice")
            else:
                self._recv.on_notice(notice, now)
