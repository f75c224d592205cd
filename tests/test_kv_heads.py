"""KV head ranges over both transports (NIXL and nccl, connectors in one process): the moves
between tensor-parallel workers of different degrees. A sender holding every head feeds
receivers holding half each (prefill TP=1 -> decode TP=2), and two senders holding half each
feed one receiver holding all (TP=2 -> TP=1): one part per sender, received only when both
parts landed, each head exactly where it belongs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from pdserve.engine.config import KVCacheSpec
from pdserve.kvtransfer.auth import ChannelKey
from pdserve.kvtransfer.factory import make_connector

pytestmark = pytest.mark.timeout(60)

SPEC4 = KVCacheSpec(num_layers=2, num_kv_heads=4, head_dim=8, block_size=4, dtype="float32")
SPEC2 = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
KEY = ChannelKey(b"h" * 32)


@pytest.fixture(params=["nixl", "nccl"])
def make(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "nixl":
        pytest.importorskip("nixl")
    made: list[Any] = []

    def build(num_blocks: int, seed: int, heads: tuple[int, int] | None) -> tuple[Any, Any]:
        spec = SPEC4 if heads is None else SPEC2
        cache = torch.randn(spec.shape(num_blocks), generator=torch.Generator().manual_seed(seed))
        conn = make_connector(request.param, cache, spec, model="m", host="127.0.0.1",
                              name=f"c{seed}", lease_s=5.0, channel_key=KEY, kv_heads=heads,
                              total_kv_heads=None if heads is None else 4)
        made.append(conn)
        return conn, cache

    yield build
    for conn in made:
        conn.close()


def _wait(conns: list[Any], want: dict[tuple[int, str], str], timeout: float = 20.0
          ) -> dict[tuple[int, str], str]:
    """Poll until every (connector index, request id) in ``want`` has an outcome."""
    seen: dict[tuple[int, str], str] = {}
    deadline = time.monotonic() + timeout
    while True:
        for i, c in enumerate(conns):
            got = c.poll()
            seen.update({(i, r): "sent" for r in got.sent})
            seen.update({(i, x.request_id): f"received {x.payload.decode()}"
                         for x in got.received})
            seen.update({(i, f.request_id): f"failed {f.kind.value}" for f in got.failed})
        if all(k in seen for k in want) or time.monotonic() >= deadline:
            break
        time.sleep(0.002)
    return seen


def test_a_full_sender_gives_each_half_receiver_its_heads(make) -> None:
    full, src = make(16, 0, None)
    halves = [make(8, 1 + r, (2 * r, 2 * r + 2)) for r in range(2)]
    for r, (conn, _) in enumerate(halves):
        conn.expect(f"q{r}", [6, 1, 3], lease_s=5)
        full.write_blocks(conn.describe(), f"q{r}", [9, 4], [6, 1])
        full.write_blocks(conn.describe(), f"q{r}", [11], [3], last=True, payload=b"x")
    conns = [full, *(c for c, _ in halves)]
    want = {(0, "q0"): "sent", (0, "q1"): "sent", (1, "q0"): "received x",
            (2, "q1"): "received x"}
    seen = _wait(conns, want)
    assert {k: seen.get(k) for k in want} == want
    for r, (_, cache) in enumerate(halves):
        assert torch.equal(cache[[6, 1, 3]], src[[9, 4, 11]][..., 2 * r : 2 * r + 2, :])
        assert not torch.equal(cache[0], src[0][..., 2 * r : 2 * r + 2, :])  # untouched


def test_two_half_senders_fill_one_receiver_in_two_parts(make) -> None:
    full, dst = make(16, 0, None)
    halves = [make(8, 1 + r, (2 * r, 2 * r + 2)) for r in range(2)]
    before = dst.clone()
    full.expect("m", [5, 2], lease_s=5)
    (low, low_cache), (high, high_cache) = halves
    low.write_blocks(full.describe(), "m", [3, 7], [5, 2], last=True, payload=b"y",
                     part=(0, 2))
    seen = _wait([full, low, high], {(1, "m"): "sent"})
    assert seen.get((1, "m")) == "sent"
    time.sleep(0.05)
    seen.update(_wait([full], {}, timeout=0.0))
    assert (0, "m") not in seen  # half the heads landed: not received yet
    assert torch.equal(dst[[5, 2]][..., 0:2, :], low_cache[[3, 7]])
    assert torch.equal(dst[[5, 2]][..., 2:4, :], before[[5, 2]][..., 2:4, :])  # not yet
    high.write_blocks(full.describe(), "m", [0], [5], part=(1, 2))
    high.write_blocks(full.describe(), "m", [1], [2], last=True, payload=b"y", part=(1, 2))
    want = {(0, "m"): "received y", (2, "m"): "sent"}
    seen = _wait([full, low, high], want)
    assert {k: seen.get(k) for k in want} == want
    assert torch.equal(dst[[5, 2]][..., 0:2, :], low_cache[[3, 7]])
    assert torch.equal(dst[[5, 2]][..., 2:4, :], high_cache[[0, 1]])
    assert torch.equal(dst[[0, 1, 3]], before[[0, 1, 3]])


def test_a_part_with_other_blocks_fails_the_request(make) -> None:
    full, _ = make(16, 0, None)
    (low, _), (high, _) = make(8, 1, (0, 2)), make(8, 2, (2, 4))
    full.expect("w", [5, 2], lease_s=5)
    low.write_blocks(full.describe(), "w", [3, 7], [5, 2], last=True, part=(0, 2))
    high.write_blocks(full.describe(), "w", [0], [5], last=True, part=(1, 2))  # one block short
    seen = _wait([full, low, high], {(0, "w"): "failed mismatch"})
    assert seen.get((0, "w")) == "failed mismatch"
