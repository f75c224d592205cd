"""Pushed KV events: the wire, the numbering logic (gaps, duplicates, resync), and one real
sealed PUB/SUB path over 127.0.0.1 with a subscriber that joins late and resyncs."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq

from pdserve.engine.hashing import hash_blocks
from pdserve.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from pdserve.kvtransfer.auth import ChannelKey
from pdserve.router.events import EventSubscriber, FeedState
from pdserve.router.prefix_index import PrefixIndex
from pdserve.worker.events import EventMessage, EventPublisher, decode_message, encode_message

BS = 4


def stored(tokens: list[int]) -> tuple[BlockStored, list[int]]:
    hashes = hash_blocks(tokens, BS)
    return BlockStored(tuple(hashes), None, BS), hashes


def test_wire_round_trip_and_refusal_of_garbage() -> None:
    ev, _ = stored(list(range(12)))
    msg = EventMessage("prefill-0", "agent-a", 7, 123.5,
                       (ev, BlockRemoved((5, 6)), AllBlocksCleared()),
                       {"num_used_blocks": 3.0})
    assert decode_message(encode_message(msg)) == msg
    for raw in (b"", b"\x00\x01", encode_message(msg)[:-3]):
        with pytest.raises(ValueError):
            decode_message(raw)


def test_feed_state_numbering_gaps_duplicates_and_retry() -> None:
    st = FeedState()
    assert st.classify("w", "a", 0) == "apply"
    assert st.classify("w", "a", 1) == "apply"
    assert st.classify("w", "a", 1) == "duplicate"
    assert st.classify("w", "a", 4) == "gap"  # 2 and 3 lost: one snapshot asked for
    assert st.classify("w", "a", 6) == "apply"  # another gap while it is in flight
    assert st.gaps == 2
    st.resynced("w", "a", ok=False)  # the snapshot did not bring it in sync: ask again
    assert st.classify("w", "a", 7) == "gap"
    st.resynced("w", "a", ok=True)
    assert st.classify("w", "a", 8) == "apply"
    assert st.classify("w", "b", 0) == "apply"  # a new incarnation starts over at 0
    assert st.classify("late", "x", 5) == "gap"  # a late join is a gap


def test_subscriber_logic_resyncs_a_gap_from_the_snapshot() -> None:
    """The receive loop's work on opened messages: after a gap the index is rebuilt from a
    snapshot plus the batches that arrived meanwhile, and equals the worker's cache."""
    tokens_a, tokens_b, tokens_c = list(range(8)), list(range(100, 112)), list(range(50, 54))
    ev_a, ha = stored(tokens_a)
    ev_b, hb = stored(tokens_b)
    ev_c, hc = stored(tokens_c)
    worker_cache = set(ha) | set(hb)  # at message 1 (message 1, with B, is lost below)
    asked: list[str] = []

    async def snapshot(worker_id: str) -> tuple[str, int, list[int], dict[str, float]]:
        asked.append(worker_id)
        return "a", 1, sorted(worker_cache), {"num_used_blocks": 2.0}

    loads: list[tuple[str, dict[str, float]]] = []

    async def main() -> PrefixIndex:
        index = PrefixIndex(BS)
        sub = EventSubscriber(ChannelKey.generate(), {"prefill": index}, snapshot,
                              lambda w, ld: loads.append((w, ld)))
        sub.add_worker("p0", "prefill", "tcp://127.0.0.1:1")  # never connects: logic only
        sub.apply(EventMessage("p0", "a", 0, time.time(), (ev_a,), {"num_used_blocks": 1.0}))
        assert index.match("p0", ha) == 2 and not asked
        sub.apply(EventMessage("p0", "a", 2, time.time(), (ev_c,), {}))  # message 1 lost
        assert index.needs_resync("p0")
        await asyncio.sleep(0.01)
        assert asked == ["p0"] and sub.resyncs == 1 and sub.gaps == 1
        assert not index.needs_resync("p0")
        assert index.stored_hashes("p0") == frozenset(worker_cache | set(hc))
        sub.apply(EventMessage("p0", "a", 3, time.time(), (BlockRemoved(tuple(ha)),), {}))
        assert index.stored_hashes("p0") == frozenset(set(hb) | set(hc))
        sub.apply(EventMessage("other", "z", 0, time.time(), (ev_a,), {}))  # not subscribed
        assert "other" not in index.workers()
        await sub.close()
        return index

    asyncio.run(main())
    assert loads[0] == ("p0", {"num_used_blocks": 1.0})
    assert ("p0", {"num_used_blocks": 2.0}) in loads


def test_sealed_pub_sub_late_join_resyncs_and_forgeries_are_refused() -> None:
    """Real sockets: a publisher (as a worker runs it) and a subscriber that joins after it
    published; the first message it sees is a gap, the snapshot repairs it, the view
    follows the publisher's cache exactly; unsealed or foreign-key messages are refused."""
    key = ChannelKey.generate()
    pub = EventPublisher("p0", "inc-1", key, "127.0.0.1", heartbeat_s=0.05)
    cache: set[int] = set()

    def push(tokens: list[int]) -> None:
        ev, hashes = stored(tokens)
        cache.update(hashes)
        assert pub.maybe_publish([ev], {"num_cached_blocks": float(len(cache))})

    push(list(range(8)))  # before anyone listens: lost for the late subscriber
    push(list(range(40, 48)))

    async def snapshot(worker_id: str) -> tuple[str, int, list[int], dict[str, float]]:
        return "inc-1", pub.last_seq, sorted(cache), {}

    async def main() -> tuple[PrefixIndex, EventSubscriber]:
        index = PrefixIndex(BS)
        sub = EventSubscriber(key, {"prefill": index}, snapshot, lambda w, ld: None)
        sub.start()
        sub.add_worker("p0", "prefill", pub.endpoint)
        forger = zmq.Context.instance().socket(zmq.PUB)
        forger.bind("tcp://127.0.0.1:0")
        sub._sock.connect(forger.getsockopt_string(zmq.LAST_ENDPOINT))
        deadline = time.monotonic() + 30
        while sub.resyncs == 0 and time.monotonic() < deadline:
            pub.maybe_publish([], {"num_cached_blocks": float(len(cache))})  # heartbeats
            forger.send(b"not sealed at all" * 4)
            forger.send(ChannelKey.generate().sealer("kv-events").seal(b"x"))
            await asyncio.sleep(0.02)
        push(list(range(200, 212)))
        deadline = time.monotonic() + 30
        while index.stored_hashes("p0") != frozenset(cache) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        forger.close(linger=0)
        await sub.close()
        return index, sub

    index, sub = asyncio.run(main())
    pub.close()
    assert sub.gaps >= 1 and sub.resyncs >= 1
    assert index.stored_hashes("p0") == frozenset(cache)
    assert not index.needs_resync("p0")
    assert sub.refused >= 2
    assert sub.lag and 0 <= min(sub.lag) and max(sub.lag) < 10.0  # seconds, same clock


def test_pdserve_router_without_a_cluster_address_says_what_to_give(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from pdserve.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["router", "--port", "0", "--http-port", "0"]) == 2
    assert "--ray-address" in capsys.readouterr().err
