"""The nccl KV transport's own behaviour: pair groups, head ranges, refusals, its wire format.

Connectors here share one process (each runs its own threads, sockets and gloo groups on
127.0.0.1, exactly as across processes); the contract suite across processes, shared with
NIXL, is test_kvtransfer.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from pdserve.engine.config import KVCacheSpec
from pdserve.kvtransfer import nccl_wire as wire
from pdserve.kvtransfer.auth import ChannelKey
from pdserve.kvtransfer.base import FailureKind, PeerInfo
from pdserve.kvtransfer.heads import HeadMove, HeadRange, shard_range, transfer_plan
from pdserve.kvtransfer.nccl import NcclConfig, NcclConnector

pytestmark = pytest.mark.timeout(60)

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
KEY = ChannelKey(b"n" * 32)


def _config(**kw: object) -> NcclConfig:
    base: dict[str, object] = dict(model="m", lease_s=5.0, handshake_timeout_s=2.0,
                                   op_timeout_s=5.0, keepalive_s=0.2, peer_timeout_s=1.5,
                                   channel_key=KEY)
    return NcclConfig(**{**base, **kw})  # type: ignore[arg-type]


class Outcomes:
    """Polls connectors and remembers what each reported, per request."""

    def __init__(self, *connectors: NcclConnector) -> None:
        self.connectors = connectors
        self.seen: dict[tuple[int, str], tuple[str, str]] = {}

    def poll(self) -> None:
        for i, conn in enumerate(self.connectors):
            got = conn.poll()
            for rid in got.sent:
                self.seen[(i, rid)] = ("sent", "")
            for rec in got.received:
                self.seen[(i, rec.request_id)] = ("received", rec.payload.decode())
            for f in got.failed:
                self.seen[(i, f.request_id)] = ("failed", f"{f.kind.value}: {f.message}")

    def wait(self, *keys: tuple[int, str], timeout: float = 15.0) -> list[tuple[str, str]]:
        deadline = time.monotonic() + timeout
        while not all(k in self.seen for k in keys) and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.002)
        return [self.seen.get(k, ("pending", "")) for k in keys]


@pytest.fixture
def closing() -> Iterator[list[NcclConnector]]:
    made: list[NcclConnector] = []
    yield made
    for conn in made:
        conn.close()


def _connector(closing: list[NcclConnector], num_blocks: int, seed: int,
               spec: KVCacheSpec = SPEC, **kw: object) -> tuple[NcclConnector, torch.Tensor]:
    cache = torch.randn(spec.shape(num_blocks), generator=torch.Generator().manual_seed(seed))
    conn = NcclConnector(cache, spec, _config(**kw))
    closing.append(conn)
    return conn, cache


def test_group_is_built_once_per_pair_and_rebuilt_for_a_new_receiver(closing) -> None:
    sender, src = _connector(closing, 32, 0)
    receiver, dst = _connector(closing, 16, 1)
    out = Outcomes(sender, receiver)
    for i in range(4):
        rid = f"r{i}"
        receiver.expect(rid, [2 * i, 2 * i + 1], lease_s=5)
        sender.write_blocks(receiver.describe(), rid, [i], [2 * i])
        sender.write_blocks(receiver.describe(), rid, [i + 8], [2 * i + 1], last=True,
                            payload=b"t")
        assert out.wait((0, rid), (1, rid)) == [("sent", ""), ("received", "t")]
        assert torch.equal(dst[[2 * i, 2 * i + 1]], src[[i, i + 8]])
    assert sender.stats()["send_links_built"] == 1
    assert receiver.stats()["receive_groups_built"] == 1
    assert sender.stats()["backend"] == "gloo"

    replacement, _ = _connector(closing, 16, 2)  # e.g. the decode worker restarted
    out = Outcomes(sender, replacement)
    replacement.expect("r9", [0], lease_s=5)
    sender.write_blocks(replacement.describe(), "r9", [5], [0], last=True)
    assert out.wait((0, "r9"), (1, "r9"))[0] == ("sent", "")
    assert sender.stats()["send_links_built"] == 2
    assert replacement.stats()["receive_groups_built"] == 1


def test_each_receiver_rank_gets_exactly_its_kv_heads(closing) -> None:
    """A sender holding all 4 KV heads (prefill TP=1) feeds two receivers holding heads
    [0, 2) and [2, 4) (the ranks of a decode worker with TP=2), one request id per rank."""
    four = KVCacheSpec(num_layers=2, num_kv_heads=4, head_dim=8, block_size=4, dtype="float32")
    full, src = _connector(closing, 16, 0, spec=four)
    ranks = [_connector(closing, 8, 1 + r, kv_heads=(2 * r, 2 * r + 2), total_kv_heads=4)
             for r in range(2)]
    out = Outcomes(full, *(conn for conn, _ in ranks))
    for r, (conn, _) in enumerate(ranks):
        conn.expect(f"q@{r}", [6, 1, 3], lease_s=5)
        full.write_blocks(conn.describe(), f"q@{r}", [9, 4], [6, 1])
        full.write_blocks(conn.describe(), f"q@{r}", [11], [3], last=True, payload=b"x")
    for r, (_, cache) in enumerate(ranks):
        assert out.wait((0, f"q@{r}"), (r + 1, f"q@{r}")) == [("sent", ""), ("received", "x")]
        assert torch.equal(cache[[6, 1, 3]], src[[9, 4, 11]][:, :, :, :, 2 * r : 2 * r + 2])
    # Ranks holding heads [0, 2) and [2, 4) share none: refused, nothing lands.
    (low, _), (high, high_cache) = ranks
    before = high_cache[0].clone()
    high.expect("p", [0], lease_s=5)
    low.write_blocks(high.describe(), "p", [2], [0], last=True)
    (state, why), = out.wait((1, "p"))
    assert state == "failed" and why.startswith("incompatible"), why
    assert "none in common" in why
    assert torch.equal(high_cache[0], before)


def test_a_write_larger_than_a_frame_goes_in_several_frames(closing) -> None:
    assert SPEC.block_bytes == 1024
    sender, src = _connector(closing, 32, 0, max_frame_bytes=2048)  # 2 blocks per frame
    receiver, dst = _connector(closing, 16, 1)
    out = Outcomes(sender, receiver)
    receiver.expect("f", [3, 1, 4, 15, 9, 2, 6], lease_s=5)
    sender.write_blocks(receiver.describe(), "f", [20, 21, 22, 23, 24], [3, 1, 4, 15, 9])
    sender.write_blocks(receiver.describe(), "f", [5, 6], [2, 6], last=True, payload=b"z")
    assert out.wait((0, "f"), (1, "f")) == [("sent", ""), ("received", "z")]
    assert sender.stats()["send_frames"] == 3 + 1
    assert torch.equal(dst[[3, 1, 4, 15, 9, 2, 6]], src[[20, 21, 22, 23, 24, 5, 6]])


def test_kv_heads_must_match_the_cache(closing) -> None:
    with pytest.raises(ValueError, match="do not match the cache's 2 heads"):
        _connector(closing, 4, 0, kv_heads=(0, 3), total_kv_heads=4)


def test_write_of_an_aborted_reservation_never_lands(closing) -> None:
    sender, _ = _connector(closing, 32, 0)
    receiver, dst = _connector(closing, 16, 1)
    out = Outcomes(sender, receiver)
    before = dst[[4, 5]].clone()
    receiver.expect("a", [4, 5], lease_s=5)
    receiver.abort("a")
    (failure,) = receiver.poll().failed
    assert failure.kind is FailureKind.ABORTED
    assert failure.reuse_after <= time.monotonic()  # no late write can land: reuse at once
    sender.write_blocks(receiver.describe(), "a", [1, 2], [4, 5], last=True)
    (state, why), = out.wait((0, "a"))
    assert state == "failed" and "not expected here" in why, why
    assert torch.equal(dst[[4, 5]], before)
    receiver.expect("b", [4], lease_s=5)  # the link survives a refused write
    sender.write_blocks(receiver.describe(), "b", [3], [4], last=True)
    assert out.wait((0, "b"), (1, "b")) == [("sent", ""), ("received", "")]


def test_writes_outside_the_reservation_are_refused(closing) -> None:
    sender, _ = _connector(closing, 32, 0)
    receiver, dst = _connector(closing, 16, 1)
    out = Outcomes(sender, receiver)
    before = dst[9].clone()
    receiver.expect("m", [1, 2], lease_s=5)
    sender.write_blocks(receiver.describe(), "m", [0, 1], [1, 9], last=True)
    (state, why), = out.wait((0, "m"))
    assert state == "failed" and why.startswith("mismatch"), why
    assert torch.equal(dst[9], before)


def test_closed_receiver_fails_the_write_and_its_group_goes(closing) -> None:
    sender, _ = _connector(closing, 32, 0)
    receiver, _ = _connector(closing, 16, 1)
    out = Outcomes(sender, receiver)
    receiver.expect("c0", [0], lease_s=5)
    sender.write_blocks(receiver.describe(), "c0", [0], [0], last=True)
    assert out.wait((0, "c0"))[0] == ("sent", "")
    target = receiver.describe()
    receiver.close()
    sender.write_blocks(target, "c1", [1], [1], last=True)
    (state, why), = Outcomes(sender).wait((0, "c1"), timeout=10)
    assert state == "failed", why
    assert sender.stats()["send_links"] == 0


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="op_timeout_s must be positive"):
        NcclConfig(model="m", op_timeout_s=0, channel_key=KEY)
    with pytest.raises(ValueError, match="peer_timeout_s"):
        NcclConfig(model="m", keepalive_s=2.0, peer_timeout_s=1.0, channel_key=KEY)
    with pytest.raises(TypeError, match="channel_key"):
        NcclConfig(model="m")  # type: ignore[call-arg]


# -- pure parts -------------------------------------------------------------------------------


def test_control_messages_round_trip_and_garbage_is_refused() -> None:
    info = PeerInfo(1, "m", "float32", 16, "L", 2, 8, 64)
    for message in (
        wire.Hello("a", info, HeadRange(0, 4), "g"),
        wire.Welcome("b", info, HeadRange(4, 8), 100, 1234, "gloo"),
        wire.Refused("incompatible", "dtype: ..."),
        wire.Frame("g", 3, "req", [5, 1, 9], HeadRange(0, 8), b"\x00pdkv1:"),
        wire.Ack("g", 3, False, "mismatch", "why"),
        wire.Ping("g"), wire.Pong("g", False), wire.Bye("g"),
    ):
        assert wire.decode(wire.encode(message)) == message
    for garbage in (b"", b"\x93\x01\x02\x03", wire.encode(wire.Ping("g"))[:-1]):
        with pytest.raises(ValueError, match="not a KV control message"):
            wire.decode(garbage)


def test_shard_ranges_split_or_replicate_heads() -> None:
    assert [shard_range(8, 4, r) for r in range(4)] == [
        HeadRange(0, 2), HeadRange(2, 4), HeadRange(4, 6), HeadRange(6, 8)]
    assert [shard_range(2, 4, r) for r in range(4)] == [  # replicated, as vLLM does
        HeadRange(0, 1), HeadRange(0, 1), HeadRange(1, 2), HeadRange(1, 2)]
    assert shard_range(1, 2, 1) == HeadRange(0, 1)  # MQA
    with pytest.raises(ValueError, match="cannot be split over TP 4"):
        shard_range(6, 4, 0)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        shard_range(8, 2, 2)


def test_transfer_plan_gives_every_destination_rank_exactly_its_heads() -> None:
    assert transfer_plan(8, 1, 2) == [HeadMove(0, 0, HeadRange(0, 4)),
                                      HeadMove(0, 1, HeadRange(4, 8))]
    assert transfer_plan(8, 2, 1) == [HeadMove(0, 0, HeadRange(0, 4)),
                                      HeadMove(1, 0, HeadRange(4, 8))]
    assert transfer_plan(8, 4, 2) == [HeadMove(0, 0, HeadRange(0, 2)),
                                      HeadMove(1, 0, HeadRange(2, 4)),
                                      HeadMove(2, 1, HeadRange(4, 6)),
                                      HeadMove(3, 1, HeadRange(6, 8))]
    assert transfer_plan(2, 4, 1) == [HeadMove(0, 0, HeadRange(0, 1)),  # first holder only
                                      HeadMove(2, 0, HeadRange(1, 2))]
    for total, a, b in [(8, 1, 1), (8, 2, 4), (8, 4, 1), (8, 8, 2), (2, 1, 4), (4, 4, 8)]:
        plan = transfer_plan(total, a, b)
        for dst in range(b):
            got = sorted(m.heads for m in plan if m.dst_rank == dst)
            want = shard_range(total, b, dst)
            assert got[0].start == want.start and got[-1].stop == want.stop
            assert all(x.stop == y.start for x, y in zip(got, got[1:], strict=False))
            for m in plan:
                assert shard_range(total, a, m.src_rank).contains(m.heads)



def test_kv_transport_is_chosen_by_name_on_the_command_line_and_pool() -> None:
    from pdserve.cli import build_parser
    from pdserve.engine.config import EngineConfig
    from pdserve.router.pool_config import PoolConfig

    parser = build_parser()
    assert parser.parse_args(["serve"]).kv_transport == "nixl"
    assert parser.parse_args(["serve", "--kv-transport", "nccl"]).kv_transport == "nccl"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--kv-transport", "tcp"])
    assert PoolConfig(engine=EngineConfig(), kv_transport="nccl").kv_transport == "nccl"
    with pytest.raises(ValueError, match="unknown KV transport 'tcp'; choose one of nixl, nccl"):
        PoolConfig(engine=EngineConfig(), kv_transport="tcp")
