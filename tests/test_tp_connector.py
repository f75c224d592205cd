"""RankedConnector over real in-process connectors (one per rank), with the ranks' messages
going through JSON as over the tensor-parallel group: a request counts as sent / received
only when every rank's part is, exactly once, with the rank's own heads in place; a failed
part fails the request once and stops its other parts; a decode worker of a smaller degree
gets each of its heads from the prefill rank that holds it, a larger one its share."""

from __future__ import annotations

import json
import time

import torch

from pdserve.engine.config import KVCacheSpec
from pdserve.kvtransfer.base import PollResult
from pdserve.kvtransfer.heads import shard_range
from pdserve.kvtransfer.inprocess import InProcessConnector, LocalFabric
from pdserve.worker.tp_connector import RankedConnector, RankKV, wire_id

TOTAL_HEADS = 2  # the model's KV heads; a rank of a TP=2 worker holds one
NUM_BLOCKS = 8


def _spec(heads: int) -> KVCacheSpec:
    return KVCacheSpec(num_layers=2, num_kv_heads=heads, head_dim=4, block_size=4,
                       dtype="float32")


def _worker(fabric: LocalFabric, world: int, name: str, fill: float | None = None):
    """A ``world``-rank worker: rank caches (each its share of the heads), the
    RankedConnector of rank 0."""
    ranges = [shard_range(TOTAL_HEADS, world, r) for r in range(world)]
    caches = [torch.zeros(_spec(h.count).shape(NUM_BLOCKS)) for h in ranges]
    if fill is not None:
        for r, c in enumerate(caches):
            c.copy_(torch.arange(c.numel(), dtype=torch.float32).view_as(c) + 1000 * r + fill)
    conns = [InProcessConnector(c, _spec(h.count), fabric, model="m", name=f"{name}{r}",
                                kv_heads=(h.start, h.stop), total_kv_heads=TOTAL_HEADS)
             for r, (c, h) in enumerate(zip(caches, ranges, strict=True))]
    ranks = [None] + [RankKV(c, r) for r, c in enumerate(conns) if r]

    def call(msg):
        msg = json.loads(json.dumps(msg))  # what crosses the group is JSON
        return [None] + [json.loads(json.dumps(k.handle(msg))) for k in ranks[1:]]

    return caches, conns, RankedConnector(conns[0], world, call if world > 1 else None,
                                          total_kv_heads=TOTAL_HEADS, transport="inprocess")


def _drain(*connectors, until, timeout: float = 5.0) -> list[PollResult]:
    seen: list[PollResult] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in connectors:
            r = c.poll()
            if r:
                seen.append(r)
        if until(seen):
            return seen
        time.sleep(0.01)
    raise AssertionError(f"not done in {timeout} s: {seen}")


def test_equal_degrees_move_each_ranks_heads_and_report_once() -> None:
    fabric = LocalFabric()
    src_caches, _, prefill = _worker(fabric, 2, "p", fill=1.0)
    dst_caches, _, decode = _worker(fabric, 2, "d")
    target = decode.describe()
    assert len(target.ranks) == 1
    decode.expect("req", [4, 5, 6], lease_s=5)
    prefill.write_blocks(target, "req", [0, 1], [4, 5])
    prefill.write_blocks(target, "req", [2], [6], last=True, payload=b"tok")
    seen = _drain(prefill, decode, until=lambda s: sum(len(r.sent) + len(r.received)
                                                      for r in s) >= 2)
    seen += _drain(prefill, decode, until=lambda s: True, timeout=0.3)
    assert [rid for r in seen for rid in r.sent] == ["req"]
    assert [(x.request_id, x.payload) for r in seen for x in r.received] == [("req", b"tok")]
    assert not [f for r in seen for f in r.failed]
    for rank in range(2):  # each decode rank holds its own prefill rank's blocks
        assert torch.equal(dst_caches[rank][[4, 5, 6]], src_caches[rank][[0, 1, 2]])
        assert not dst_caches[rank][[0, 1, 2, 3, 7]].any()
    assert not prefill.writes_pending("req")


def test_one_failed_rank_fails_the_request_once_and_aborts_its_other_parts() -> None:
    fabric = LocalFabric()
    _, _, prefill = _worker(fabric, 2, "p", fill=1.0)
    _, dst_conns, decode = _worker(fabric, 2, "d")
    target = decode.describe()
    decode.expect("req", [1, 2], lease_s=5)
    dst_conns[1].close()  # decode rank 1 is gone: its part cannot land
    prefill.write_blocks(target, "req", [0, 1], [1, 2], last=True, payload=b"x")
    seen = _drain(prefill, until=lambda s: any(r.failed for r in s))
    seen += _drain(prefill, until=lambda s: True, timeout=0.3)
    failed = [f for r in seen for f in r.failed]
    assert [f.request_id for f in failed] == ["req"]
    assert not [rid for r in seen for rid in r.sent]  # rank 0's part landed; not "sent"
    assert not prefill.writes_pending("req")


def _send_and_drain(prefill, decode, rid: str) -> list[PollResult]:
    target = decode.describe()
    decode.expect(rid, [4, 5, 6], lease_s=5)
    prefill.write_blocks(target, rid, [0, 1], [4, 5])
    prefill.write_blocks(target, rid, [2], [6], last=True, payload=b"tok")
    seen = _drain(prefill, decode, until=lambda s: sum(len(r.sent) + len(r.received)
                                                      for r in s) >= 2)
    return seen + _drain(prefill, decode, until=lambda s: True, timeout=0.3)


def test_two_prefill_ranks_fill_one_decode_rank_each_with_its_heads() -> None:
    fabric = LocalFabric()
    src_caches, _, prefill = _worker(fabric, 2, "p", fill=1.0)
    dst_caches, _, decode = _worker(fabric, 1, "d")
    seen = _send_and_drain(prefill, decode, "req")
    assert [rid for r in seen for rid in r.sent] == ["req"]  # once, when both ranks sent
    assert [(x.request_id, x.payload) for r in seen for x in r.received] == [("req", b"tok")]
    assert not [f for r in seen for f in r.failed]
    (dst,) = dst_caches
    for rank in range(2):  # head ``rank`` of the decode cache came from prefill rank ``rank``
        assert torch.equal(dst[[4, 5, 6]][..., rank : rank + 1, :], src_caches[rank][[0, 1, 2]])
    assert not dst[[0, 1, 2, 3, 7]].any()


def test_one_prefill_rank_feeds_two_decode_ranks_their_heads() -> None:
    fabric = LocalFabric()
    (src,), _, prefill = _worker(fabric, 1, "p", fill=1.0)
    dst_caches, _, decode = _worker(fabric, 2, "d")
    seen = _send_and_drain(prefill, decode, "req")
    assert [rid for r in seen for rid in r.sent] == ["req"]
    assert [(x.request_id, x.payload) for r in seen for x in r.received] == [("req", b"tok")]
    for rank in range(2):
        assert torch.equal(dst_caches[rank][[4, 5, 6]], src[[0, 1, 2]][..., rank : rank + 1, :])


def test_single_rank_workers_pass_request_ids_through_unchanged() -> None:
    fabric = LocalFabric()
    _, _, prefill = _worker(fabric, 1, "p", fill=1.0)
    _, _, decode = _worker(fabric, 1, "d")
    assert decode.describe().ranks == ()
    assert wire_id("r", 0, 1) == "r" and wire_id("r", 1, 2) == "r#r1"
    decode.expect("r", [3], lease_s=5)
    prefill.write_blocks(decode.describe(), "r", [0], [3], last=True, payload=b"p")
    seen = _drain(prefill, decode, until=lambda s: sum(len(r.sent) + len(r.received)
                                                      for r in s) >= 2)
    assert [rid for r in seen for rid in r.sent] == ["r"]
    assert [x.request_id for r in seen for x in r.received] == ["r"]
