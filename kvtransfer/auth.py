"""Authentication of pdserve's internal channels: every message carries an HMAC-SHA256 tag
under a per-cluster secret, and receivers refuse what does not verify or was seen before.

The router creates the secret at start (``ChannelKey.generate()``) and hands it to each
worker through Ray (actor arguments; Ray's own authentication guards that path). Any
channel between pdserve processes seals with it: the token stream (decode worker -> router
over ZMQ), the KV handshake side channel (``pdserve.kvtransfer.handshake``), the nccl KV
transport's control channel (``pdserve.kvtransfer.nccl_wire``), and KV event channels. A
process that does not hold the secret can neither forge nor replay a message, even one that
can reach the sockets (any local user can reach 127.0.0.1).

A sealed message is ``version (1) | sender (8) | counter (8) | tag (32) | payload`` with
``tag = HMAC(secret, channel | sender | counter | payload)``. ``channel`` names the use (and,
for the token stream, the receiving endpoint), so a message cannot be replayed on another
channel; ``sender`` is random per ``Sealer``; ``counter`` counts up per sender, and an
``Opener`` accepts each (sender, counter) once within a sliding window, so replays are
refused while messages of several threads may arrive slightly out of order. Confidentiality
is not a goal here (payloads are token ids and block layouts on the cluster's own network).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import os
import secrets
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

VERSION = 1
_HEADER = struct.Struct("!BQQ")
_TAG_BYTES = 32
OVERHEAD = _HEADER.size + _TAG_BYTES
"""Bytes a seal adds to a payload."""
SECRET_ENV = "PDSERVE_CHANNEL_SECRET"
"""Environment variable that may hold the cluster secret as hex; unset: the router that
creates the pools creates one (routers added with ``pdserve router`` read it from the
cluster's directory, over Ray)."""


class ForgedMessageError(ValueError):
    """A message that is not sealed with the cluster's secret, or was already received."""


@dataclass(frozen=True, slots=True)
class ChannelKey:
    """The per-cluster secret (at least 32 bytes). ``repr`` does not show it."""

    secret: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) < 32:
            raise ValueError("a channel key needs a secret of at least 32 bytes")

    def __repr__(self) -> str:
        return "ChannelKey(<secret>)"

    @classmethod
    def generate(cls) -> ChannelKey:
        return cls(secrets.token_bytes(32))

    @classmethod
    def from_env(cls) -> ChannelKey:
        """The key in ``$PDSERVE_CHANNEL_SECRET`` (hex), else a fresh one."""
        text = os.environ.get(SECRET_ENV, "").strip()
        if not text:
            return cls.generate()
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise ValueError(f"${SECRET_ENV} must be at least 64 hex digits") from None

    def sealer(self, channel: str) -> Sealer:
        return Sealer(self, channel)

    def opener(self, channel: str, window: int = 4096, max_senders: int = 4096) -> Opener:
        return Opener(self, channel, window, max_senders)

    def derive(self, purpose: str) -> str:
        """A value only holders of the secret can compute, for ``purpose`` (hex, 64 digits):
        e.g. a rendezvous name that must not be guessable from what travels in clear."""
        return hmac.new(self.secret, b"pdserve-derive/" + purpose.encode(),
                        hashlib.sha256).hexdigest()

    def tag(self, channel: bytes, header: bytes, payload: bytes) -> bytes:
        mac = hmac.new(self.secret, channel, hashlib.sha256)
        mac.update(header)
        mac.update(payload)
        return mac.digest()


class Sealer:
    """Seals messages of one sender on one channel. Thread-safe."""

    def __init__(self, key: ChannelKey, channel: str) -> None:
        self._key = key
        self._channel = _channel_bytes(channel)
        self.sender = int.from_bytes(secrets.token_bytes(8), "big")
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def seal(self, payload: bytes) -> bytes:
        with self._lock:
            counter = next(self._counter)
        header = _HEADER.pack(VERSION, self.sender, counter)
        return header + self._key.tag(self._channel, header, payload) + payload


class Opener:
    """Verifies messages of one channel; each (sender, counter) is accepted once. Keeps a
    window of ``window`` counters per sender for up to ``max_senders`` senders (the least
    recently heard is forgotten first). Not thread-safe: one receiving thread."""

    def __init__(self, key: ChannelKey, channel: str, window: int, max_senders: int) -> None:
        self._key = key
        self._channel = _channel_bytes(channel)
        self._window = window
        self._max_senders = max_senders
        self._senders: OrderedDict[int, tuple[int, int]] = OrderedDict()  # -> (top, seen bits)
        self.refused = 0

    def open(self, message: bytes) -> bytes:
        """The payload of a genuine, first-seen message; ``ForgedMessageError`` otherwise."""
        return self.open_from(message)[1]

    def open_from(self, message: bytes) -> tuple[int, bytes]:
        """``open``, also returning the sender (random per ``Sealer``): a receiver may bind
        state to the sealer that created it."""
        if len(message) < OVERHEAD:
            self.refused += 1
            raise ForgedMessageError(f"message of {len(message)} bytes is not sealed")
        header, tag = message[: _HEADER.size], message[_HEADER.size : OVERHEAD]
        payload = message[OVERHEAD:]
        version, sender, counter = _HEADER.unpack(header)
        if version != VERSION or not hmac.compare_digest(
                tag, self._key.tag(self._channel, header, payload)):
            self.refused += 1
            raise ForgedMessageError("message tag does not verify (not sealed with this "
                                     "cluster's secret, or for another channel)")
        if not self._accept(sender, counter):
            self.refused += 1
            raise ForgedMessageError(f"message {counter} of sender {sender:016x} replayed "
                                     "or too old")
        return sender, payload

    def _accept(self, sender: int, counter: int) -> bool:
        top, seen = self._senders.pop(sender, (0, 0))
        ok = True
        if counter > top:
            shift = counter - top
            seen = ((seen << shift) | 1) & ((1 << self._window) - 1) if shift < self._window else 1
            top = counter
        else:
            age = top - counter
            if age >= self._window or seen >> age & 1:
                ok = False
            else:
                seen |= 1 << age
        self._senders[sender] = (top, seen)
        while len(self._senders) > self._max_senders:
            self._senders.popitem(last=False)
        return ok


def _channel_bytes(channel: str) -> bytes:
    return f"pdserve/{channel}\x00".encode()


class RefusalLog:
    """Logs refused messages without letting a flood of them flood the log: the first one,
    then at most one summary per ``interval_s``."""

    def __init__(self, logger: logging.Logger, what: str, interval_s: float = 60.0) -> None:
        self._logger = logger
        self._what = what
        self._interval_s = interval_s
        self._count = 0
        self._since_log = 0
        self._last = -float("inf")

    @property
    def count(self) -> int:
        return self._count

    def refused(self, reason: object) -> None:
        self._count += 1
        self._since_log += 1
        now = time.monotonic()
        if now - self._last < self._interval_s:
            return
        if self._last < 0:
            self._logger.warning("refused %s: %s (more are summed at most once every %.0f s)",
                                 self._what, reason, self._interval_s)
        else:
            self._logger.warning("refused %d %s in the last %.0f s (%d in all); latest: %s",
                                 self._since_log, self._what, now - self._last, self._count,
                                 reason)
        self._last = now
        self._since_log = 0
