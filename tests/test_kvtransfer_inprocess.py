"""The connector contract in one process, on the in-process and the nccl backends (the
latter over real gloo groups and sockets on 127.0.0.1), and the completion ledger behind them.

Asynchronous backends report later than the call that caused it: ``_Watch`` polls both ends
until the expected outcome arrives (with a deadline), and "nothing yet" is checked after
giving the transfer time to land.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from pdserve.engine.config import KVCacheSpec
from pdserve.kvtransfer.base import (
    FailureKind,
    KVConnector,
    PeerInfo,
    PollResult,
    Received,
    compatibility_problems,
)
from pdserve.kvtransfer.inprocess import InProcessConnector, LocalFabric
from pdserve.kvtransfer.ledger import ChunkNotice, ReceiveLedger, SendLedger, block_digest

pytestmark = pytest.mark.timeout(30)

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
BACKENDS = ["inprocess", "nccl"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.param
    for conn in _OPEN:
        conn.close()
    _OPEN.clear()


_OPEN: list[KVConnector] = []


def _pair(backend: str, lease_s: float = 5.0, **receiver_spec: object):
    torch.manual_seed(0)
    src_cache = torch.randn(SPEC.shape(32))
    spec_b = KVCacheSpec(**{**_spec_fields(SPEC), **receiver_spec})
    dst_cache = torch.randn(spec_b.shape(16)).to(getattr(torch, spec_b.dtype))
    if backend == "inprocess":
        fabric = LocalFabric()
        sender = InProcessConnector(src_cache, SPEC, fabric, model="m", lease_s=lease_s)
        receiver = InProcessConnector(dst_cache, spec_b, fabric, model="m", lease_s=lease_s)
    else:
        from pdserve.kvtransfer.auth import ChannelKey
        from pdserve.kvtransfer.nccl import NcclConfig, NcclConnector

        config = NcclConfig(model="m", lease_s=lease_s, handshake_timeout_s=0.5,
                            channel_key=ChannelKey.generate())
        sender = NcclConnector(src_cache, SPEC, config)
        receiver = NcclConnector(dst_cache, spec_b, config)
    _OPEN.extend([sender, receiver])
    return sender, receiver, src_cache, dst_cache


class _Watch:
    """Polls connectors, keeping everything they reported."""

    def __init__(self, *connectors: KVConnector) -> None:
        self.connectors = connectors
        self.got = [PollResult() for _ in connectors]

    def poll(self) -> None:
        for conn, acc in zip(self.connectors, self.got, strict=True):
            r = conn.poll()
            acc.sent += r.sent
            acc.received += r.received
            acc.failed += r.failed

    def until(self, done, timeout: float = 10.0) -> list[PollResult]:
        deadline = time.monotonic() + timeout
        self.poll()
        while not done(self.got) and time.monotonic() < deadline:
            time.sleep(0.002)
            self.poll()
        return self.got

    def settle(self, seconds: float = 0.2) -> list[PollResult]:
        return self.until(lambda _: False, timeout=seconds)


def _spec_fields(spec: KVCacheSpec) -> dict[str, object]:
    return {name: getattr(spec, name) for name in spec.__slots__}


def test_chunks_land_exactly_and_complete_only_after_the_last(backend: str) -> None:
    sender, receiver, src, dst = _pair(backend)
    watch = _Watch(sender, receiver)
    before = dst.clone()
    receiver.expect("r", [9, 2, 14, 5], lease_s=5)
    assert sender.write_blocks(receiver.describe(), "r", [30, 1], [9, 2]) == 0
    assert not any(watch.settle())  # chunk 0 landed, but the request is not complete
    assert (
        sender.write_blocks(receiver.describe(), "r", [7, 0], [14, 5], last=True, payload=b"42")
        == 1
    )
    got = watch.until(lambda g: g[0].sent and g[1].received)
    assert got[0].sent == ["r"]
    assert got[1].received == [Received("r", b"42")]
    assert torch.equal(dst[[9, 2, 14, 5]], src[[30, 1, 7, 0]])
    rest = [b for b in range(16) if b not in (9, 2, 14, 5)]
    assert torch.equal(dst[rest], before[rest])


def test_writes_not_covering_the_reservation_fail_as_mismatch(backend: str) -> None:
    sender, receiver, _, _ = _pair(backend)
    watch = _Watch(sender, receiver)
    receiver.expect("r", [1, 2, 3], lease_s=5)
    sender.write_blocks(receiver.describe(), "r", [0, 1], [1, 2], last=True)
    got = watch.until(lambda g: g[1].failed)
    assert [(f.request_id, f.kind) for f in got[1].failed] == [("r", FailureKind.MISMATCH)]
    assert got[1].received == []


def test_reservation_whose_writes_never_come_fails_at_its_lease(backend: str) -> None:
    sender, receiver, _, _ = _pair(backend, lease_s=0.05)
    watch = _Watch(sender, receiver)
    receiver.expect("r", [1], lease_s=0.05)
    sender.write_blocks(receiver.describe(), "r", [0], [1])  # never closed with last=True
    got = watch.until(lambda g: g[0].failed and g[1].failed)
    assert [f.kind for f in got[1].failed] == [FailureKind.TIMEOUT]
    if backend == "inprocess":  # grace for writes that may still be draining
        assert got[1].failed[0].reuse_after >= time.monotonic()
    else:  # the nccl receiver refuses late writes itself: reusable at once
        assert got[1].failed[0].reuse_after <= time.monotonic()
    assert [f.kind for f in got[0].failed] == [FailureKind.TIMEOUT]
    assert sender.write_blocks(receiver.describe(), "r", [0], [1], last=True) == -1


def test_incompatible_peer_is_refused_naming_both_values(backend: str) -> None:
    sender, receiver, _, _ = _pair(backend, dtype="bfloat16")
    sender.write_blocks(receiver.describe(), "r", [0], [0], last=True)
    (failure,) = _Watch(sender).until(lambda g: g[0].failed)[0].failed
    assert failure.kind is FailureKind.INCOMPATIBLE
    assert "dtype: local 'float32' vs peer 'bfloat16'" in failure.message


def test_closed_peer_fails_the_write_and_abort_is_reported_once(backend: str) -> None:
    sender, receiver, _, _ = _pair(backend)
    target = receiver.describe()
    receiver.expect("r", [0], lease_s=5)
    receiver.abort("r")
    assert [f.kind for f in receiver.poll().failed] == [FailureKind.ABORTED]
    assert not any(_Watch(receiver).settle(0.05))
    receiver.close()
    start = time.monotonic()
    sender.write_blocks(target, "r2", [0], [0], last=True)
    (failure,) = _Watch(sender).until(lambda g: g[0].failed)[0].failed
    assert time.monotonic() - start < 0.5 + 2.0  # the handshake timeout, plus slack
    # In process the peer is known to be gone; over the network it no longer answers.
    gone = FailureKind.PEER_RESTARTED if backend == "inprocess" else FailureKind.PEER_UNREACHABLE
    assert failure.kind is gone


def test_invalid_arguments_raise_value_error(backend: str) -> None:
    sender, receiver, _, _ = _pair(backend)
    target = receiver.describe()
    with pytest.raises(ValueError, match="destination block ids"):
        sender.write_blocks(target, "r", [0], [16])
    with pytest.raises(ValueError, match="2 source blocks but 1"):
        sender.write_blocks(target, "r", [0, 1], [0])
    sender.write_blocks(target, "r", [0], [0], last=True)
    with pytest.raises(ValueError, match="after its last write"):
        sender.write_blocks(target, "r", [1], [1])
    with pytest.raises(ValueError, match="duplicate"):
        receiver.expect("x", [1, 1], lease_s=1)
    with pytest.raises(ValueError, match="does not match the spec"):
        InProcessConnector(torch.zeros(4, 2), SPEC, LocalFabric(), model="m")


def test_receive_ledger_accepts_out_of_order_and_early_notices() -> None:
    ledger = ReceiveLedger(grace_s=1.0)
    ids = [5, 1, 9]
    last = ChunkNotice("r", 1, 1, block_digest([9]), total_chunks=2, payload=b"t")
    ledger.on_notice(last, now=0.0)  # arrives before expect() and before chunk 0
    ledger.expect("r", ids, lease_s=10, now=0.0)
    assert ledger.drain() == ([], [])
    ledger.on_notice(ChunkNotice("r", 0, 2, block_digest([1, 5])), now=0.1)
    assert ledger.drain() == ([Received("r", b"t")], [])


def test_notice_round_trips_and_foreign_messages_are_ignored() -> None:
    notice = ChunkNotice("req/1", 3, 7, block_digest(range(7)), total_chunks=4, payload=b"\x00")
    assert ChunkNotice.decode(notice.encode()) == notice
    assert ChunkNotice.decode(b"something else") is None
    assert block_digest([1, 2, 3]) == block_digest([3, 1, 2]) != block_digest([1, 2, 4])


def test_send_ledger_reports_sent_after_every_write_finished() -> None:
    ledger = SendLedger(lease_s=1.0)
    assert ledger.begin_write("r", last=False, now=0.0) == 0
    assert ledger.begin_write("r", last=True, now=0.1) == 1
    ledger.write_done("r")
    assert ledger.drain() == ([], [])
    ledger.write_done("r")
    assert ledger.drain() == (["r"], [])
    assert ledger.expired(now=5.0) == []


def test_compatibility_problems_name_both_sides() -> None:
    a = PeerInfo(1, "m", "float32", 16, "L", 12, 4, 64)
    b = PeerInfo(2, "m", "float32", 32, "L", 12, 4, 64)
    assert compatibility_problems(a, b) == [
        "protocol_version: local 1 vs peer 2",
        "block_size: local 16 vs peer 32",
    ]
