"""Internal channels are authenticated: sealed messages verify once, anything else is refused.

Pure checks of ``pdserve.kvtransfer.auth`` (tampering, wrong key, wrong channel, replay, a
window for reordering), then the real ZMQ side channels on 127.0.0.1: the KV handshake
server answers only initiators holding the cluster's key (and the initiator loads nothing
from a server that does not), and the router's token inbox drops batches another process
forged while genuine ones reach their request's queue.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import asdict

import pytest
import zmq

from pdserve.kvtransfer.auth import ChannelKey, ForgedMessageError
from pdserve.kvtransfer.base import PROTOCOL_VERSION, IncompatiblePeerError, PeerInfo
from pdserve.kvtransfer.handshake import HandshakeServer, KVRegion, fetch_peer
from pdserve.router.stream import TokenInbox
from pdserve.worker.protocol import TokenRecord, encode_batch, token_channel

KEY = ChannelKey(b"k" * 32)
OTHER = ChannelKey(b"o" * 32)
INFO = PeerInfo(PROTOCOL_VERSION, "m", "float32", 16, "blocks-first", 2, 2, 8)


def test_sealed_messages_open_once_and_tampering_is_refused() -> None:
    sealer, opener = KEY.sealer("tokens/a"), KEY.opener("tokens/a")
    first, second = sealer.seal(b"one"), sealer.seal(b"two")
    assert opener.open(second) == b"two"
    assert opener.open(first) == b"one"  # out of order, inside the window: once
    for forged in (first, second,  # replays
                   first[:-1] + b"X",  # payload changed
                   OTHER.sealer("tokens/a").seal(b"one"),  # another cluster's key
                   KEY.sealer("tokens/b").seal(b"one"),  # another channel
                   b"short", b""):
        with pytest.raises(ForgedMessageError):
            opener.open(forged)
    assert opener.refused == 7
    assert "k" * 8 not in repr(KEY)


def test_counters_older_than_the_window_are_refused() -> None:
    sealer, opener = KEY.sealer("c"), KEY.opener("c", window=8)
    old = sealer.seal(b"old")
    for _ in range(8):
        opener.open(sealer.seal(b"x"))
    with pytest.raises(ForgedMessageError, match="replayed or too old"):
        opener.open(old)


@pytest.fixture
def server():
    region = KVRegion(4096, 8, 1024, "DRAM", 0)
    srv = HandshakeServer("127.0.0.1", 0, "agent-a", INFO, region, b"secret-metadata", KEY)
    yield srv
    srv.close()


def test_handshake_answers_only_the_cluster(server: HandshakeServer) -> None:
    hello = fetch_peer("127.0.0.1", server.port, "b", INFO, 2.0, KEY)
    assert hello.agent_name == "agent-a" and hello.metadata == b"secret-metadata"
    with pytest.raises(IncompatiblePeerError, match="not authenticated"):
        fetch_peer("127.0.0.1", server.port, "b", INFO, 2.0, OTHER)
    # A raw client that knows the protocol but not the key gets no metadata.
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.RCVTIMEO, 2000)
    sock.connect(f"tcp://127.0.0.1:{server.port}")
    sock.send(json.dumps({"agent": "x", "info": asdict(INFO)}).encode())
    answer = sock.recv()
    sock.close(linger=0)
    ctx.term()
    assert b"secret-metadata" not in answer and b"not authenticated" in answer
    assert fetch_peer("127.0.0.1", server.port, "b", INFO, 2.0, KEY).agent_name == "agent-a"


def test_initiator_refuses_a_server_of_another_cluster() -> None:
    region = KVRegion(4096, 8, 1024, "DRAM", 0)
    impostor = HandshakeServer("127.0.0.1", 0, "agent-x", INFO, region, b"evil", OTHER)
    try:
        with pytest.raises(IncompatiblePeerError, match="not authenticated"):
            fetch_peer("127.0.0.1", impostor.port, "b", INFO, 2.0, KEY)
    finally:
        impostor.close()


FORGER = """
import sys, zmq, msgpack
ctx = zmq.Context()
push = ctx.socket(zmq.PUSH)
push.connect(sys.argv[1])
# What a decode worker would send, unsealed, and sealed with a guessed key.
batch = msgpack.packb([["victim", [13], "stop", None, None, True]])
push.send(batch)
push.send(bytes(49) + batch)
push.close(linger=2000)
ctx.term()
"""


def test_token_inbox_drops_batches_forged_by_another_process() -> None:
    async def main() -> tuple[list[TokenRecord], int]:
        inbox = TokenInbox(KEY)
        inbox.start()
        queue = inbox.open("victim")
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", FORGER,
                                                    inbox.endpoint)
        assert await proc.wait() == 0
        for _ in range(100):  # both forged messages have arrived and been refused
            if inbox.refused == 2:
                break
            await asyncio.sleep(0.02)
        ctx = zmq.Context.instance()
        push = ctx.socket(zmq.PUSH)
        push.connect(inbox.endpoint)
        sealer = KEY.sealer(token_channel(inbox.endpoint))
        genuine = sealer.seal(encode_batch([TokenRecord("victim", [7])]))
        push.send(genuine)
        push.send(genuine)  # a replay of a genuine batch
        got = [await asyncio.wait_for(queue.get(), 5.0)]
        await asyncio.sleep(0.2)
        while not queue.empty():
            got.append(queue.get_nowait())
        push.close(linger=0)
        refused = inbox.refused
        await inbox.close()
        return got, refused

    got, refused = asyncio.run(main())
    assert got == [TokenRecord("victim", [7])]
    assert refused == 3


def test_forger_script_is_a_real_process() -> None:
    # The forged batch is well-formed: only the seal is missing (what the inbox refuses).
    out = subprocess.run([sys.executable, "-c", "import msgpack; from pdserve.worker.protocol "
                          "import decode_batch; print(decode_batch(msgpack.packb([['victim', "
                          "[13], 'stop', None, None, True]])))"], capture_output=True,
                         text=True, check=True)
    assert "TokenRecord(request_id='victim', token_ids=[13], finish_reason='stop'" in out.stdout
