"""Control messages of the nccl KV transport (pure Python, msgpack on a ZMQ side channel).

The bytes of KV blocks move over a two-rank torch.distributed group (``pair_group``); every
thing else travels here, between a sender's DEALER socket and the receiver's ROUTER socket:

- ``Hello`` -> ``Welcome`` | ``Refused``: who the peers are, whether they are compatible, where
  the receiver's rendezvous store listens, and the key of the group the pair builds;
- ``Frame``: announces the next tensor the sender sends on the group (request, chunk notice,
  destination block ids, head range); the receiver posts the matching receive;
- ``Ack``: the receiver's answer per frame, once its blocks landed (or why they were refused);
- ``Ping`` / ``Pong``: keepalives while a link is idle (a peer silent for too long is dropped,
  with its group); ``Bye``: the sender closes the link.

Frames and sends are issued in the same order by one sender thread and received in that order
by one receiver thread per group, which is what pairs each frame with its tensor.

Every message is sealed with the cluster's ``ChannelKey`` (``pdserve.kvtransfer.auth``), as
the NIXL handshake is: a sender's on ``REQUEST_CHANNEL``, a receiver's on the
``reply_channel`` of the group it answers (random per link, so an answer cannot be replayed to
another link). Receivers drop what does not verify or was seen before. The rendezvous store
the ``Welcome`` points at has no authentication of its own (``torch.distributed.TCPStore``):
each pair rendezvous under ``rendezvous_prefix``, a name derived from the secret that never
travels, so a process without the key that reaches the store cannot find or join a pair's
group (see ``pdserve.kvtransfer.pair_group`` for what remains open).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import msgpack

from pdserve.kvtransfer.auth import ChannelKey
from pdserve.kvtransfer.base import PeerInfo
from pdserve.kvtransfer.heads import HeadRange

REQUEST_CHANNEL = "kv-nccl"
MAX_MESSAGE_BYTES = 16 << 20
"""A frame names at most a few thousand block ids: ZMQ drops a peer that sends more."""


def reply_channel(group: str) -> str:
    """The channel of a receiver's answers on the link that made ``group``."""
    return f"kv-nccl-reply/{group}"


def rendezvous_prefix(key: ChannelKey, group: str) -> str:
    """The store prefix under which the pair of ``group`` builds its process group."""
    return "pdkv/" + key.derive(f"kv-nccl-store/{group}")[:32]


@dataclass(frozen=True, slots=True)
class Hello:
    kind: ClassVar[str] = "hello"
    agent: str
    info: PeerInfo
    heads: HeadRange
    group: str


@dataclass(frozen=True, slots=True)
class Welcome:
    kind: ClassVar[str] = "welcome"
    agent: str
    info: PeerInfo
    heads: HeadRange
    num_blocks: int
    store_port: int
    backend: str


@dataclass(frozen=True, slots=True)
class Refused:
    """``failure`` is a ``FailureKind`` value."""

    kind: ClassVar[str] = "refused"
    failure: str
    error: str


@dataclass(frozen=True, slots=True)
class Frame:
    kind: ClassVar[str] = "frame"
    group: str
    seq: int
    request_id: str
    dst: list[int]
    heads: HeadRange
    notice: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    """``failure`` (a ``FailureKind`` value) and ``error`` are set when ``ok`` is False."""

    kind: ClassVar[str] = "ack"
    group: str
    seq: int
    ok: bool
    failure: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True)
class Ping:
    kind: ClassVar[str] = "ping"
    group: str


@dataclass(frozen=True, slots=True)
class Pong:
    """``known`` is False when the receiver no longer has the group (the link must go)."""

    kind: ClassVar[str] = "pong"
    group: str
    known: bool


@dataclass(frozen=True, slots=True)
class Bye:
    kind: ClassVar[str] = "bye"
    group: str


Message = Hello | Welcome | Refused | Frame | Ack | Ping | Pong | Bye
_TYPES: dict[str, Any] = {t.kind: t for t in (Hello, Welcome, Refused, Frame, Ack, Ping, Pong, Bye)}


def _plain(value: Any) -> Any:
    if isinstance(value, PeerInfo):
        return asdict(value)
    if isinstance(value, HeadRange):
        return [value.start, value.stop]
    return value


def encode(message: Message) -> bytes:
    body = [message.kind] + [_plain(getattr(message, f.name)) for f in fields(message)]
    return msgpack.packb(body, use_bin_type=True)


def decode(raw: bytes) -> Message:
    """The message in ``raw``; ``ValueError`` for anything that is not a well-formed one."""
    try:
        kind, *values = msgpack.unpackb(raw, raw=False)
        cls = _TYPES[kind]
        names = [f.name for f in fields(cls)]
        if len(values) != len(names):
            raise ValueError(f"{kind}: {len(values)} fields, expected {len(names)}")
        args = dict(zip(names, values, strict=True))
        if "info" in args:
            args["info"] = PeerInfo(**args["info"])
        if "heads" in args:
            args["heads"] = HeadRange(*args["heads"])
        if "dst" in args:
            args["dst"] = [int(b) for b in args["dst"]]
        return cls(**args)
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"not a KV control message: {exc}") from None
