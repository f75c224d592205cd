"""In-process backend: connectors in one process copy blocks with torch (tests, colocated use).

Connectors meet through a ``LocalFabric`` the caller creates and passes to each of them (no
process-wide registry). A write copies synchronously and its notice reaches the receiver's next
``poll()``, so the contract, the leases and the completion checks are those of the NIXL backend.
Not thread-safe: all connectors of one fabric are driven from one thread.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import replace

import torch

from pdserve.engine.config import KVCacheSpec
from pdserve.kvtransfer.base import (
    FailureKind,
    IncompatiblePeerError,
    KVConnector,
    KVTransferError,
    PollResult,
    TransferTarget,
    check_compatible,
)
from pdserve.kvtransfer.heads import HeadRange, overlap
from pdserve.kvtransfer.layout import check_kv_cache, checked_block_ids, checked_write, peer_info
from pdserve.kvtransfer.ledger import ChunkNotice, ReceiveLedger, SendLedger, block_digest

BACKEND = "inprocess"


class LocalFabric:
    """The set of in-process connectors that can reach each other."""

    def __init__(self) -> None:
        self._members: dict[str, InProcessConnector] = {}

    def join(self, connector: InProcessConnector) -> None:
        self._members[connector.agent_name] = connector

    def leave(self, agent_name: str) -> None:
        self._members.pop(agent_name, None)

    def find(self, agent_name: str) -> InProcessConnector | None:
        return self._members.get(agent_name)


class InProcessConnector(KVConnector):
    """Same contract as ``NixlConnector``; peers are found on ``fabric`` by agent name."""

    def __init__(
        self,
        kv_cache: torch.Tensor,
        spec: KVCacheSpec,
        fabric: LocalFabric,
        model: str,
        lease_s: float = 30.0,
        name: str = "kv",
        kv_heads: tuple[int, int] | None = None,
        total_kv_heads: int | None = None,
    ) -> None:
        """``kv_heads``: the model KV heads ``[start, stop)`` this cache holds, of
        ``total_kv_heads`` (None: all of them); a write copies the heads both sides hold."""
        self.num_blocks = check_kv_cache(kv_cache, spec)
        total = total_kv_heads or spec.num_kv_heads
        self.heads = HeadRange(*(kv_heads or (0, spec.num_kv_heads)))
        if self.heads.count != spec.num_kv_heads or self.heads.stop > total:
            raise ValueError(f"kv_heads {self.heads} of {total} do not match the cache's "
                             f"{spec.num_kv_heads} heads")
        self.info = replace(peer_info(spec, model), num_kv_heads=total)
        self.agent_name = f"{name}-{uuid.uuid4().hex[:12]}"
        self._kv = kv_cache
        self._fabric = fabric
        self._send = SendLedger(lease_s)
        self._recv = ReceiveLedger(grace_s=lease_s)
        self._dead: set[str] = set()
        self._closed = False
        fabric.join(self)

    def describe(self) -> TransferTarget:
        return TransferTarget(BACKEND, self.agent_name, "", 0, self.num_blocks, self.info)

    def connect(self, target: TransferTarget) -> InProcessConnector:
        """Find the live peer behind ``target`` and check compatibility (raises on failure)."""
        peer = self._fabric.find(target.agent_name)
        if peer is None:
            raise KVTransferError(f"KV transfer peer {target.agent_name} is gone")
        check_compatible(self.info, peer.info, target.agent_name)
        return peer

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
        """See ``KVConnector.write_blocks``; returns -1 for a request already failed."""
        self._require_open()
        src, dst = checked_write(BACKEND, target, src_block_ids, dst_block_ids, self.num_blocks)
        if request_id in self._dead:
            return -1
        now = time.monotonic()
        chunk = self._send.begin_write(request_id, last, now)
        try:
            peer = self.connect(target)
        except IncompatiblePeerError as exc:
            self._fail(request_id, FailureKind.INCOMPATIBLE, str(exc), now)
            return chunk
        except KVTransferError as exc:
            self._fail(request_id, FailureKind.PEER_RESTARTED, str(exc), now)
            return chunk
        heads = overlap(self.heads, peer.heads)
        if heads is None:
            self._fail(request_id, FailureKind.INCOMPATIBLE, f"we hold KV heads {self.heads}, "
                       f"the receiver {peer.heads}: none in common", now)
            return chunk
        if len(src):
            index = torch.from_numpy(dst.astype("int64")).to(peer._kv.device)
            source = self._kv[torch.from_numpy(src.astype("int64")).to(self._kv.device)]
            source = source[..., self.heads.local(heads), :]
            target = peer._kv[..., peer.heads.local(heads), :]
            target.index_copy_(0, index, source.to(peer._kv.device))
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
        peer._recv.on_notice(notice, now)
        self._send.write_done(request_id)
        return chunk

    def expect(self, request_id: str, dst_block_ids: Sequence[int], lease_s: float) -> None:
        self._require_open()
        checked_block_ids(dst_block_ids, self.num_blocks, "expected")
        self._recv.expect(request_id, dst_block_ids, lease_s, time.monotonic())

    def abort(self, request_id: str, *, writes_done: bool = False) -> None:
        now = time.monotonic()
        self._fail(request_id, FailureKind.ABORTED, "aborted by the owner", now)
        self._recv.fail(request_id, FailureKind.ABORTED, "aborted by the owner", now,
                        grace_s=0.0 if writes_done else None)

    def writes_pending(self, request_id: str) -> bool:
        return False  # ``write_blocks`` copies synchronously: nothing is ever in flight

    def poll(self) -> PollResult:
        self._require_open()
        now = time.monotonic()
        for request_id in self._send.expired(now):
            self._fail(request_id, FailureKind.TIMEOUT, "lease expired", now)
        self._recv.check_leases(now)
        sent, failed = self._send.drain()
        received, failed_in = self._recv.drain()
        return PollResult(sent=sent, received=received, failed=failed + failed_in)

    def close(self) -> None:
        self._closed = True
        self._fabric.leave(self.agent_name)

    def _fail(self, request_id: str, kind: FailureKind, message: str, now: float) -> None:
        if self._send.fail(request_id, kind, message, now):
            self._dead.add(request_id)

    def _require_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"in-process connector {self.agent_name} is closed")
