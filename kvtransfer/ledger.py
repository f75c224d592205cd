"""Per-request bookkeeping shared by every backend: chunk counting, leases, completion.

Pure Python (no torch, no NIXL). The sender numbers its writes per request; each write's
notification (``ChunkNotice``) names the request, the chunk, how many destination blocks it
wrote and an order-independent digest of their ids; the last one also carries the number of
chunks. The receiver declares a request received only when every announced chunk arrived and
the blocks written are exactly the expected ones (same count, same digest).

Parts: a receiver that holds KV heads from several senders (tensor-parallel workers of
different degrees: a TP=2 prefill worker writing a TP=1 decode worker) gets one part per
sender, each numbering its own chunks and writing every expected block (its heads of them).
Each notice names its part and the number of parts (``part``/``parts``; 0 of 1 for a single
sender, which the encoding leaves out); the request is received when every part is complete,
so the receiver needs no knowledge of the sender's layout.

Not thread-safe: owned by one connector, used from its owner thread.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from pdserve.kvtransfer.base import FailureKind, Received, TransferFailure

logger = logging.getLogger(__name__)

_NOTICE_PREFIX = b"pdkv1:"
_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: spreads block ids so that their sum identifies the set."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def block_digest(block_ids: Iterable[int]) -> int:
    """Order-independent 64-bit digest of a multiset of block ids."""
    return sum(_mix64(int(b)) for b in block_ids) & _MASK64


@dataclass(frozen=True, slots=True)
class ChunkNotice:
    """The notification a write delivers to the receiver once its data landed."""

    request_id: str
    chunk: int
    num_blocks: int
    digest: int
    total_chunks: int | None = None
    payload: bytes = b""
    part: int = 0
    parts: int = 1

    def encode(self) -> bytes:
        body = {
            "r": self.request_id,
            "c": self.chunk,
            "k": self.num_blocks,
            "h": self.digest,
            "n": self.total_chunks,
            "p": self.payload.hex(),
        }
        if self.parts != 1:
            body["q"], body["Q"] = self.part, self.parts
        return _NOTICE_PREFIX + json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> ChunkNotice | None:
        """The notice in ``raw``, or None if ``raw`` is not one of ours."""
        if not raw.startswith(_NOTICE_PREFIX):
            return None
        try:
            body = json.loads(raw[len(_NOTICE_PREFIX) :])
            return cls(
                request_id=str(body["r"]),
                chunk=int(body["c"]),
                num_blocks=int(body["k"]),
                digest=int(body["h"]),
                total_chunks=None if body["n"] is None else int(body["n"]),
                payload=bytes.fromhex(body["p"]),
                part=int(body.get("q", 0)),
                parts=int(body.get("Q", 1)),
            )
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(slots=True)
class _Outgoing:
    deadline: float
    next_chunk: int = 0
    closed: bool = False
    outstanding: int = 0


class SendLedger:
    """Sender side: a request is sent when its last write was issued and all writes finished.

    The lease runs from the request's first write: every write must have completed by then.
    """

    def __init__(self, lease_s: float) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self.lease_s = lease_s
        self._requests: dict[str, _Outgoing] = {}
        self._finished: dict[str, float] = {}  # sent request id -> when, to refuse late writes
        self._sent: list[str] = []
        self._failed: list[TransferFailure] = []

    def begin_write(self, request_id: str, last: bool, now: float) -> int:
        """Register one more write of ``request_id`` and return its chunk index."""
        req = self._requests.get(request_id)
        if request_id in self._finished:
            raise ValueError(f"request {request_id!r}: write after its last write")
        if req is None:
            req = self._requests[request_id] = _Outgoing(deadline=now + self.lease_s)
        elif req.closed:
            raise ValueError(f"request {request_id!r}: write after its last write")
        chunk = req.next_chunk
        req.next_chunk += 1
        req.outstanding += 1
        req.closed = last
        return chunk

    def is_active(self, request_id: str) -> bool:
        return request_id in self._requests

    def total_chunks(self, request_id: str) -> int:
        return self._requests[request_id].next_chunk

    def write_done(self, request_id: str) -> None:
        """One write of ``request_id`` finished; reports it sent if it was the last one."""
        req = self._requests.get(request_id)
        if req is None:  # already failed or aborted
            return
        req.outstanding -= 1
        if req.closed and req.outstanding == 0:
            del self._requests[request_id]
            self._finished[request_id] = req.deadline
            self._sent.append(request_id)

    def fail(self, request_id: str, kind: FailureKind, message: str, now: float) -> bool:
        """Report ``request_id`` failed (once). False if it was not active."""
        if self._requests.pop(request_id, None) is None:
            return False
        # An abort by the owner (a cancelled request) is routine, not a warning.
        log = logger.debug if kind is FailureKind.ABORTED else logger.warning
        log("KV send of request %s failed (%s): %s", request_id, kind.value, message)
        self._failed.append(TransferFailure(request_id, kind, message, reuse_after=now))
        return True

    def expired(self, now: float) -> list[str]:
        """Requests past their lease (also forgets long-finished ones)."""
        horizon = now - self.lease_s
        self._finished = {rid: t for rid, t in self._finished.items() if t > horizon}
        return [rid for rid, req in self._requests.items() if now >= req.deadline]

    def active(self) -> list[str]:
        return list(self._requests)

    def drain(self) -> tuple[list[str], list[TransferFailure]]:
        sent, failed = self._sent, self._failed
        self._sent, self._failed = [], []
        return sent, failed


@dataclass(slots=True)
class _Incoming:
    expected_blocks: int
    expected_digest: int
    deadline: float
    chunks: dict[tuple[int, int], ChunkNotice] = field(default_factory=dict)  # (part, chunk)
    totals: dict[int, int] = field(default_factory=dict)  # part -> its number of chunks
    parts: int | None = None
    payload: bytes = b""


class ReceiveLedger:
    """Receiver side: completion needs every announced chunk and exactly the expected blocks.

    ``grace_s`` is added to a failure's ``reuse_after``: the longest a live sender may still be
    writing into the request's blocks after we gave up (its own write lease).
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._requests: dict[str, _Incoming] = {}
        self._early: dict[str, tuple[float, list[ChunkNotice]]] = {}
        self._received: list[Received] = []
        self._failed: list[TransferFailure] = []

    def expect(self, request_id: str, dst_block_ids: Iterable[int], lease_s: float, now: float):
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already expected")
        ids = [int(b) for b in dst_block_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"request {request_id!r}: duplicate destination block ids")
        self._requests[request_id] = _Incoming(len(ids), block_digest(ids), now + lease_s)
        for notice in self._early.pop(request_id, (now, []))[1]:
            self.on_notice(notice, now)

    def on_notice(self, notice: ChunkNotice, now: float) -> None:
        req = self._requests.get(notice.request_id)
        if req is None:
            # Writes normally follow expect(); keep early notices until expect() comes or they
            # age out (late notices of failed or aborted requests also land here, harmlessly).
            seen, notices = self._early.setdefault(notice.request_id, (now, []))
            notices.append(notice)
            return
        rid = notice.request_id
        if req.parts is None:
            req.parts = notice.parts
        if notice.parts != req.parts or not 0 <= notice.part < notice.parts:
            self._fail(rid, FailureKind.MISMATCH, f"part {notice.part} of {notice.parts} "
                       f"in a request of {req.parts} parts", now)
            return
        key = (notice.part, notice.chunk)
        if key in req.chunks:
            self._fail(rid, FailureKind.MISMATCH, "chunk written twice", now)
            return
        req.chunks[key] = notice
        if notice.total_chunks is not None:
            req.totals[notice.part] = notice.total_chunks
            if notice.part == 0:
                req.payload = notice.payload
        if len(req.totals) < req.parts or len(req.chunks) < sum(req.totals.values()):
            return
        for part in range(req.parts):
            chunks = sorted(c for p, c in req.chunks if p == part)
            mine = [n for (p, _), n in req.chunks.items() if p == part]
            blocks = sum(n.num_blocks for n in mine)
            digest = sum(n.digest for n in mine) & ((1 << 64) - 1)
            if chunks != list(range(req.totals[part])):
                self._fail(rid, FailureKind.MISMATCH, "unexpected chunk numbers", now)
                return
            if blocks != req.expected_blocks or digest != req.expected_digest:
                self._fail(
                    rid,
                    FailureKind.MISMATCH,
                    f"sender wrote {blocks} blocks, expected {req.expected_blocks} "
                    f"(or different block ids)" + (f" in part {part}" if req.parts > 1 else ""),
                    now,
                )
                return
        del self._requests[rid]
        self._received.append(Received(rid, req.payload))

    def _fail(self, request_id: str, kind: FailureKind, message: str, now: float,
              grace_s: float | None = None) -> None:
        if self._requests.pop(request_id, None) is None:
            return
        log = logger.debug if kind is FailureKind.ABORTED else logger.warning
        log("KV receive of request %s failed (%s): %s", request_id, kind.value, message)
        grace = self.grace_s if grace_s is None else grace_s
        failure = TransferFailure(request_id, kind, message, reuse_after=now + grace)
        self._failed.append(failure)

    def fail(self, request_id: str, kind: FailureKind, message: str, now: float,
             grace_s: float | None = None) -> None:
        """Give up on ``request_id``; its blocks may be reused after ``grace_s`` (default:
        the ledger's, the longest a live sender may still write; 0 when the caller knows
        no write can land any more)."""
        self._fail(request_id, kind, message, now, grace_s)

    def check_leases(self, now: float) -> None:
        for rid, req in list(self._requests.items()):
            if now >= req.deadline:
                total = sum(req.totals.values()) if len(req.totals) == req.parts else "?"
                got = f"{len(req.chunks)} of {total} chunks"
                self._fail(rid, FailureKind.TIMEOUT, f"lease expired with {got} landed", now)
        for rid, (seen, _) in list(self._early.items()):
            if now - seen > self.grace_s:
                del self._early[rid]

    def is_active(self, request_id: str) -> bool:
        return request_id in self._requests

    def has_active(self) -> bool:
        return bool(self._requests)

    def active(self) -> list[str]:
        return list(self._requests)

    def drain(self) -> tuple[list[Received], list[TransferFailure]]:
        received, failed = self._received, self._failed
        self._received, self._failed = [], []
        return received, failed
