"""Agent metadata exchange over a ZMQ side channel.

Each NIXL connector runs a ``HandshakeServer``: a REP socket on its own thread answering
``fetch_peer`` requests with the connector's ``PeerInfo``, its NIXL agent metadata and the
layout of its registered KV region. The server refuses an incompatible initiator (and the
initiator refuses an incompatible server) with an error naming both sides' values.

The server thread only reads immutable bytes prepared before it starts, so it never touches
the NIXL agent. ``fetch_peer`` is a blocking call with a timeout; connectors run it off their
owner thread.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass

import zmq

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
    ``base_addr`` on ``mem_type`` ('DRAM' or 'VRAM') device ``device_id``."""

    base_addr: int
    num_blocks: int
    block_bytes: int
    mem_type: str
    device_id: int


@dataclass(frozen=True, slots=True)
class PeerHello:
    """A handshake answer: who the peer is and how to address its cache."""

    agent_name: str
    info: PeerInfo
    region: KVRegion
    metadata: bytes


def _encode_info(agent_name: str, info: PeerInfo, region: KVRegion | None) -> bytes:
    body = {"agent": agent_name, "info": asdict(info)}
    if region is not None:
        body["region"] = asdict(region)
    return json.dumps(body).encode()


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
    ) -> None:
        self._info = info
        self._agent_name = agent_name
        self._reply = [_encode_info(agent_name, info, region), metadata]
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
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
                request = json.loads(self._sock.recv())
                peer = PeerInfo(**request["info"])
                problems = compatibility_problems(self._info, peer)
                if problems:
                    # Both sides' values, from the initiator's point of view.
                    flipped = compatibility_problems(peer, self._info)
                    logger.warning(
                        "refused handshake from %s: %s", request.get("agent"), "; ".join(problems)
                    )
                    self._sock.send_multipart(
                        [json.dumps({"error": "; ".join(flipped)}).encode(), b""]
                    )
                else:
                    self._sock.send_multipart(self._reply)
            except (ValueError, KeyError, TypeError) as exc:
                self._sock.send_multipart(
                    [json.dumps({"error": f"bad request: {exc}"}).encode(), b""]
                )
            except zmq.ZMQError:
                if not self._stop.is_set():
                    logger.exception("handshake server of %s failed", self._agent_name)
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._sock.close(linger=0)
        self._ctx.term()


def fetch_peer(
    host: str, port: int, agent_name: str, info: PeerInfo, timeout_s: float
) -> PeerHello:
    """Handshake with the server at ``host:port``: send our info, get the peer's.

    Raises ``PeerUnreachableError`` if no answer comes within ``timeout_s`` and
    ``IncompatiblePeerError`` (naming both sides' values) if either side refuses.
    """
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, max(1, int(timeout_s * 1000)))
    sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout_s * 1000)))
    where = f"{host}:{port}"
    try:
        sock.connect(f"tcp://{where}")
        sock.send(_encode_info(agent_name, info, None))
        head, metadata = sock.recv_multipart()
    except zmq.Again:
        raise PeerUnreachableError(
            f"KV transfer peer at {where} did not answer the handshake within {timeout_s:g} s"
        ) from None
    finally:
        sock.close(linger=0)
        ctx.term()
    body = json.loads(head)
    if "error" in body:
        raise IncompatiblePeerError(f"KV transfer peer at {where} refused: {body['error']}")
    hello = PeerHello(
        agent_name=body["agent"],
        info=PeerInfo(**body["info"]),
        region=KVRegion(**body["region"]),
        metadata=metadata,
    )
    problems = compatibility_problems(info, hello.info)
    if problems:
        raise IncompatiblePeerError(
            f"KV transfer peer {hello.agent_name} at {where} is incompatible: "
            + "; ".join(problems)
        )
    return hello
