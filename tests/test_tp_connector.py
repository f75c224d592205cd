"""RankedConnector over real in-process connectors (one per rank), with the ranks' messages
going through JSON as over the tensor-parallel group: a request counts as sent / received
only when every rank's part is, exactly once, with the rank's own heads in place; a failed
part fails the request once and stops its other parts; unsupported layouts fail clearly."""

from __future__ import annotations

import json
import time

import torch

from pdserve.engine.config import KVCacheSpec
from pdserve.kvtransfer.base import FailureKind, PollResult
from pdserve.kvtransfer.inprocess import InProcessConnector, LocalFabric
from pdserve.worker.tp_connector import RankedConnector, RankKV, wire_id

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=1, head_dim=4, block_size=4, dtype="float32")
NUM_BLOCKS = 8


def _worker(fabric: LocalFabric, world: int, name: str, fill: float | None = None):
    """A ``world``-rank worker: rank caches, the RankedConnector of rank 0."""
    caches = [torch.zeros(SPEC.shape(NUM_BLOCKS)) for _ in range(world)]
    if fill is not None:
        for r, c in enumerate(caches):
            c.copy_(torch.arange(c.numel(), dtype=torch.float32).view_as(c) + 1000 * r + fill)
    conns = [InProcessConnector(c, SPEC, fabric, model="m", name=f"{name}{r}")
             for r, c in enumerate(caches)]
    ranks = [None] + [RankKV(c, r) for r, c in enumerate(conns) if r]

    def call(msg):
        msg = json.loads(json.dumps(msg))  # what crosses the group is JSON
        return [None] + [json.loads(json.dumps(k.handle(msg))) for k in ranks[1:]]

    return caches, conns, RankedConnector(conns[0], world, call if world > 1 else None,
                                          total_kv_heads=world, transport="inprocess")


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


def test_a_layout_no_rank_can_feed_fails_as_incompatible_instead_of_raising() -> None:
    fabric = LocalFabric()
    _, _, prefill = _worker(fabric, 2, "p", fill=1.0)
    _, _, decode = _worker(fabric, 1, "d")
    prefill.write_blocks(decode.describe(), "req", [0], [0], last=True)
    (result,) = _drain(prefill, until=lambda s: bool(s))
    (failure,) = result.failed
    assert failure.request_id == "req" and failure.kind is FailureKind.INCOMPATIBLE
    assert "not supported" in failure.message


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
