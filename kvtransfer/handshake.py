"""Agent metadata exchange over a ZMQ side channel.

Each NIXL connector runs a ``HandshakeServer``: a REP socket on its own thread answering
``fetch_peer`` requests with the connector's ``PeerInfo``, its NIXL agent metadata and the
layout of its registered KV region. The server refuses an incompatible initiator (and the
initiator refuses an incompatible server) with an error naming both sides' values.

Both directions are sealed with the cluster's ``ChannelKey`` (``pdserve.kvtransfer.auth``):
the server answers nothing but a refusal to a request that does not verify (the answer holds
what a peer needs to WRITE into this worker's KV cache), and the initiator loads no metadata
from an answer that does not verify or that answers another request.

The server thread only reads immutable bytes prepared before it starts, so it never touches
the NIXL agent. ``fetch_peer`` is a blocking call with a timeout; connectors run it off their
owner thread.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from dataclasses import asdict, dataclass

import zmq

from pdserve.kvtransfer.auth import ChannelKey, ForgedMessageError, RefusalLog, Sealer
from pdserve.kvtransfer.base import (
    IncompatiblePeerError,
    PeerInfo,
    PeerUnreachableError,
    compatibility_problems,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KVRegion:
    """Where a connector's KV cache lives: ``num_blocks`` blocks of ``block_bytes`` from
    ``base_addr`` on ``mem_type`` ('DRAM' or 'VRAM') device ``device_id``, holding the model's
    KV heads ``kv_heads`` (``[start, stop)``; None: all of them)."""

    base_addr: int
    num_blocks: int
    block_bytes: int
    mem_type: str
    device_id: int
    kv_heads: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class PeerHello:
    """A handshake answer: who the peer is and how to address its cache."""

    agent_name: str
    info: PeerInfo
    region: KVRegion
    metadata: bytes


REQUEST_CHANNEL = "kv-handshake"
MAX_REQUEST_BYTES = 1 << 16
"""A handshake request is a few hundred bytes; ZMQ drops a peer that sends more."""
_LEN = struct.Struct("!I")


def _encode_info(agent_name: str, info: PeerInfo, region: KVRegion | None) -> bytes:
    body = {"agent": agent_name, "info": asdict(info)}
    if region is not None:
        body["region"] = asdict(region)
    return json.dumps(body).encode()


def _reply_channel(request: bytes) -> str:
    """Replies are sealed for the one request they answer (its sender and counter)."""
    return f"kv-handshake-reply/{request[1:17].hex()}"


def _reply(key: ChannelKey, request: bytes, head: dict | bytes, metadata: bytes = b"") -> bytes:
    raw = head if isinstance(head, bytes) else json.dumps(head).encode()
    return key.sealer(_reply_channel(request)).seal(_LEN.pack(len(raw)) + raw + metadata)


class HandshakeServer:
    """Answers handshakes on ``tcp://host:port`` (port 0 = pick a free one) until ``close()``."""

    def __init__(
        self,
        host: str,
        port: int,
        agent_name: str,
        info: PeerInfo,
        region: KVRegion,
        metadata: bytes,
        key: ChannelKey,
    ) -> None:
        self._info = info
        self._agent_name = agent_name
        self._key = key
        self._opener = key.opener(REQUEST_CHANNEL)
        self._hello = _encode_info(agent_name, info, region)
        self._metadata = metadata
        self._refusals = RefusalLog(logger, f"unauthenticated KV handshakes to {agent_name}")
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        if port:
            self._sock.bind(f"tcp://{host}:{port}")
        else:
            port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.host, self.port = host, port
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, name=f"kv-handshake-{agent_name}", daemon=True
        )
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            try:
                sealed = self._sock.recv()
            except zmq.ZMQError:
                if not self._stop.is_set():
                    logger.exception("handshake server of %s failed", self._agent_name)
                return
            try:
                answer = self._answer(sealed)
            except Exception as exc:  # never let one request stop the server
                logger.exception("handshake server of %s: bad request", self._agent_name)
                answer = json.dumps({"error": f"bad request: {type(exc).__name__}"}).encode()
            try:
                self._sock.send(answer)
            except zmq.ZMQError:
                if not self._stop.is_set():
                    logger.exception("handshake server of %s failed", self._agent_name)
                return

    def _answer(self, sealed: bytes) -> bytes:
        try:
            request = json.loads(self._opener.open(sealed))
        except ForgedMessageError as exc:
            self._refusals.refused(exc)
            return json.dumps({"error": "handshake refused: not authenticated"}).encode()
        except ValueError as exc:
            return _reply(self._key, sealed, {"error": f"bad request: {exc}"})
        try:
            peer = PeerInfo(**request["info"])
        except (KeyError, TypeError) as exc:
            return _reply(self._key, sealed, {"error": f"bad request: {exc!r}"})
        problems = compatibility_problems(self._info, peer)
        if problems:
            # Both sides' values, from the initiator's point of view.
            flipped = compatibility_problems(peer, self._info)
            logger.warning("refused handshake from %s: %s", request.get("agent"),
                           "; ".join(problems))
            return _reply(self._key, sealed, {"error": "; ".join(flipped)})
        return _reply(self._key, sealed, self._hello, self._metadata)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._sock.close(linger=0)
        self._ctx.term()


def fetch_peer(
    host: str, port: int, agent_name: str, info: PeerInfo, timeout_s: float, key: ChannelKey,
    sealer: Sealer | None = None,
) -> PeerHello:
    """Handshake with the server at ``host:port``: send our info, get the peer's.

    Raises ``PeerUnreachableError`` if no answer comes within ``timeout_s`` and
    ``IncompatiblePeerError`` (naming both sides' values) if either side refuses, including
    an answer that is not sealed with ``key`` for this request. ``sealer`` (one per
    connector) seals the request; by default a fresh one.
    """
    sealer = sealer or key.sealer(REQUEST_CHANNEL)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, max(1, int(timeout_s * 1000)))
    sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout_s * 1000)))
    where = f"{host}:{port}"
    request = sealer.seal(_encode_info(agent_name, info, None))
    try:
        sock.connect(f"tcp://{where}")
        sock.send(request)
        answer = sock.recv()
    except zmq.Again:
        raise PeerUnreachableError(
            f"KV transfer peer at {where} did not answer the handshake within {timeout_s:g} s"
        ) from None
    finally:
        sock.close(linger=0)
        ctx.term()
    try:
        raw = key.opener(_reply_channel(request)).open(answer)
        (size,) = _LEN.unpack_from(raw)
        body = json.loads(raw[_LEN.size : _LEN.size + size])
        metadata = raw[_LEN.size + size :]
    except (ForgedMessageError, ValueError, struct.error) as exc:
        refusal = _plain_error(answer)
        raise IncompatiblePeerError(
            f"KV transfer peer at {where} " + (f"refused: {refusal}" if refusal else
                                               f"sent an unauthenticated answer: {exc}")
        ) from None
    if "error" in body:
        raise IncompatiblePeerError(f"KV transfer peer at {where} refused: {body['error']}")
    hello = PeerHello(
        agent_name=body["agent"],
        info=PeerInfo(**body["info"]),
        region=_region(body["region"]),
        metadata=metadata,
    )
    problems = compatibility_problems(info, hello.info)
    if problems:
        raise IncompatiblePeerError(
            f"KV transfer peer {hello.agent_name} at {where} is incompatible: "
            + "; ".join(problems)
        )
    return hello


def _region(d: dict) -> KVRegion:
    heads = d.get("kv_heads")
    return KVRegion(**{**d, "kv_heads": None if heads is None else (int(heads[0]), int(heads[1]))})


def _plain_error(answer: bytes) -> str | None:
    """The server's unsealed refusal (it could not authenticate us), if that is what came."""
    try:
        body = json.loads(answer)
    except ValueError:
        return None
    return str(body["error"])[:200] if isinstance(body, dict) and "error" in body else None
