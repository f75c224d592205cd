"""The connector contract: how a worker moves KV blocks into a peer's reserved blocks.

A connector wraps ONE worker's KV cache tensor (see ``engine.config.KVCacheSpec``: block ``b``
of all layers is one byte range). It knows nothing of scheduling and never allocates or frees
blocks: the worker's scheduler owns them, and the rules below say when it may reuse them.

Roles (one connector may play both):

- sender (prefill): ``write_blocks`` once per finished prefill chunk, the last call with
  ``last=True``; ``poll().sent`` names a request once every one of its writes completed and the
  receiver was notified; ``poll().failed`` names it if any write failed or its lease expired.
- receiver (decode): ``expect`` when blocks are reserved; ``poll().received`` names a request
  once every chunk announced by the sender landed and the written blocks are exactly the
  expected ones; ``poll().failed`` names it if its lease expires first. A request is reported
  at most once, either received or failed, never both.

Ownership rules:

- Source blocks passed to ``write_blocks`` must stay untouched (not freed, not overwritten)
  until ``poll()`` reports the request as sent or failed.
- Destination blocks passed to ``expect`` must not be read for decoding before the request is
  reported received; after a failure they may be reused no sooner than ``failure.reuse_after``
  (``time.monotonic()`` seconds), which covers writes still draining from a live sender.

Connectors are not thread-safe: one owner thread calls every method (the worker's step loop).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

PROTOCOL_VERSION = 1
"""Bumped whenever the handshake or the notification format changes incompatibly."""


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What two connectors must agree on before any byte moves (compared at handshake)."""

    protocol_version: int
    model: str
    dtype: str
    block_size: int
    layout: str
    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True, slots=True)
class TransferTarget:
    """What a peer needs to write into a connector's cache (``describe()``'s answer).

    ``agent_name`` is unique per connector incarnation: a restarted worker has a new one, so a
    target taken before the restart is recognised as stale. ``host``/``port`` locate the
    handshake side channel (empty/0 for the in-process backend). ``ranks``: the targets of
    ranks 1..N-1 of a tensor-parallel worker (this one is rank 0's), each holding its own KV
    heads of the same block ids; empty for a worker of one rank.
    """

    backend: str
    agent_name: str
    host: str
    port: int
    num_blocks: int
    info: PeerInfo
    ranks: tuple[TransferTarget, ...] = ()


class FailureKind(str, enum.Enum):
    """Why a request's transfer failed."""

    PEER_UNREACHABLE = "peer_unreachable"
    """The handshake side channel did not answer in time."""
    INCOMPATIBLE = "incompatible"
    """The peers disagree on model, dtype, layout or protocol (the message names both)."""
    PEER_RESTARTED = "peer_restarted"
    """The target names an agent that no longer exists; get a fresh target."""
    TRANSFER_ERROR = "transfer_error"
    """The transport reported an error (peer died, connection reset, bad descriptor)."""
    TIMEOUT = "timeout"
    """The request's lease expired before its transfers finished."""
    MISMATCH = "mismatch"
    """All chunks arrived but the written blocks differ from the expected ones."""
    ABORTED = "aborted"
    """The owner aborted the request, or the connector was closed."""


@dataclass(frozen=True, slots=True)
class TransferFailure:
    """A failed request. ``reuse_after`` is the ``time.monotonic()`` time after which the
    request's blocks on this side can no longer be touched by its transfers."""

    request_id: str
    kind: FailureKind
    message: str
    reuse_after: float = 0.0


@dataclass(frozen=True, slots=True)
class Received:
    """A request whose KV blocks all landed; ``payload`` is what the sender's last write
    carried (e.g. the first sampled token)."""

    request_id: str
    payload: bytes = b""


@dataclass(slots=True)
class PollResult:
    """What happened since the previous ``poll()``. Each request appears at most once overall."""

    sent: list[str] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    failed: list[TransferFailure] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.sent or self.received or self.failed)


class KVTransferError(RuntimeError):
    """Base class of errors raised by kvtransfer."""


class IncompatiblePeerError(KVTransferError):
    """The two sides of a handshake disagree; the message names both sides' values."""


class PeerUnreachableError(KVTransferError):
    """The peer's handshake side channel did not answer."""


def compatibility_problems(local: PeerInfo, peer: PeerInfo) -> list[str]:
    """Every field on which ``local`` and ``peer`` differ, as 'field: local X vs peer Y'."""
    problems = []
    for name in PeerInfo.__slots__:
        mine, theirs = getattr(local, name), getattr(peer, name)
        if mine != theirs:
            problems.append(f"{name}: local {mine!r} vs peer {theirs!r}")
    return problems


def check_compatible(local: PeerInfo, peer: PeerInfo, peer_name: str) -> None:
    """Raise ``IncompatiblePeerError`` naming every differing field with both values."""
    problems = compatibility_problems(local, peer)
    if problems:
        raise IncompatiblePeerError(
            f"KV transfer peer {peer_name} is incompatible: " + "; ".join(problems)
        )


class KVConnector(ABC):
    """A worker's end of KV block transfers. See the module docstring for the rules."""

    @abstractmethod
    def describe(self) -> TransferTarget:
        """What a peer needs to write into this connector's cache."""

    @abstractmethod
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
        """Start writing our blocks ``src_block_ids[i]`` into the target's blocks
        ``dst_block_ids[i]`` (all layers, one transfer) and return the chunk index.

        Asynchronous: returns before the data moves. The call with ``last=True`` closes the
        request (it may carry no blocks) and its ``payload`` reaches the receiver with the
        completion. Errors of the peer or the transport are reported by ``poll()``; invalid
        arguments (lengths differ, ids out of range, write after last) raise ``ValueError``.

        Tensor parallelism: a connector that holds some of the model's KV heads writes the
        heads both it and the target hold; ``part`` = (this sender's index, number of
        senders) when the target gets its heads from several senders (see
        ``pdserve.kvtransfer.ledger``).
        """

    @abstractmethod
    def expect(self, request_id: str, dst_block_ids: Sequence[int], lease_s: float) -> None:
        """Announce that a peer will write ``dst_block_ids`` (our blocks) for ``request_id``;
        ``poll()`` reports it received once they all landed, or failed after ``lease_s``."""

    @abstractmethod
    def abort(self, request_id: str, *, writes_done: bool = False) -> None:
        """Stop tracking ``request_id`` in both roles and cancel its writes still in flight.

        Reported as failed (``ABORTED``) by the next ``poll()`` unless already reported.
        ``writes_done``: the caller knows that no write into the request's destination
        blocks can still land (its sender confirmed its writes cancelled, died, or never
        got the target), so the failure's ``reuse_after`` is now instead of now + the
        sender's lease."""

    @abstractmethod
    def writes_pending(self, request_id: str) -> bool:
        """True while a write of ``request_id`` sent by this connector may still land at its
        peer (posted and not yet completed, acknowledged or released). False: the receiver
        may reuse the destination blocks at once (``abort(..., writes_done=True)``)."""

    @abstractmethod
    def poll(self) -> PollResult:
        """Progress transfers and return what finished, arrived or failed since last time."""

    @abstractmethod
    def close(self) -> None:
        """Abort everything in flight and release the transport. Idempotent."""

    def __enter__(self) -> KVConnector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
