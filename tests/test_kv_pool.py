"""The cluster-wide prefix pool: the pull cost model, the pool's reach over several holders,
and the ``kv_pool`` balancer's choice and TTFT formula (pure logic, milliseconds)."""

from __future__ import annotations

import random

import pytest

from pdserve.engine.hashing import hash_blocks
from pdserve.engine.kv_events import BlockStored
from pdserve.router.balancer import (
    BalancerConfig,
    KVPoolBalancer,
    PrefillChoice,
    RouteRequest,
    WorkerLoad,
    make_balancer,
)
from pdserve.router.kv_pool import NO_PULL, PullCostModel, PullPlan, merge_holders, pool_reach
from pdserve.router.prefix_index import PrefixIndex

BS = 16
H = tuple(hash_blocks(list(range(4 * BS)), BS))  # four full blocks
REQ = RouteRequest("r1", H, num_prompt_tokens=70)
# 100 bytes a token over 100,000 B/s: a pulled token costs 1 ms; computing one at 100
# tokens/s costs 10 ms.
PULL = PullCostModel(kv_bytes_per_token=100, link_bytes_per_s=100_000.0, latency_s=0.005)
CONFIG = BalancerConfig(default_prefill_tokens_per_s=100.0, recompute_weight=0.0, pull=PULL)


def index_with(holdings: dict[str, int], routed: dict[str, int] | None = None) -> PrefixIndex:
    """Worker w holds the first holdings[w] blocks of H (confirmed), and was routed the
    first routed[w] (provisional)."""
    now = [0.0]
    idx = PrefixIndex(BS, clock=lambda: now[0])
    for w, n in holdings.items():
        idx.apply_events(w, 0, [BlockStored(H[:n], None, BS)] if n else [])
    for w, n in (routed or {}).items():
        idx.record_routed(w, H[:n])
    return idx


def test_pull_when_the_link_beats_the_compute() -> None:
    plan = PULL.plan(16, 48, "b", prefill_tokens_per_s=100.0)
    assert plan == PullPlan(32, pytest.approx(0.005 + 32 * 100 / 100_000), "b")
    # A faster prefill (1,000 tokens/s: 32 ms) beats the pull (37 ms): recompute.
    assert PULL.plan(16, 48, "b", prefill_tokens_per_s=1000.0) == NO_PULL
    # A measured link rate overrides the default: 100x faster (5.3 ms) pulls again.
    assert PULL.plan(16, 48, "b", 1000.0, link_bytes_per_s=1e7).tokens == 32


def test_no_pull_without_a_gain_a_source_or_a_pool() -> None:
    assert PULL.plan(48, 48, "b", 100.0) == NO_PULL
    assert PULL.plan(48, 16, "b", 100.0) == NO_PULL
    assert PULL.plan(0, 48, None, 100.0) == NO_PULL
    assert PullCostModel().plan(0, 48, "b", 100.0) == NO_PULL
    assert PullCostModel(100, 1e5, min_pull_tokens=64).plan(0, 48, "b", 100.0) == NO_PULL


def test_bad_costs_are_refused() -> None:
    with pytest.raises(ValueError, match="kv_bytes_per_token"):
        PullCostModel(kv_bytes_per_token=-1)
    with pytest.raises(ValueError, match="link_bytes_per_s"):
        PullCostModel(100, -1.0)
    with pytest.raises(ValueError, match="min_pull_tokens"):
        PullCostModel(100, 1.0, min_pull_tokens=0)


def test_reach_continues_across_holders_until_a_block_nobody_holds() -> None:
    holders = [["a"], ["a", "b"], ["c"], ["b"]]
    assert pool_reach("a", 2, holders) == (4, "b")  # blocks 2 (c) and 3 (b): tie -> "b"
    assert pool_reach("b", 0, holders) == (4, "a")  # a supplies blocks 0 and 1
    assert pool_reach("a", 0, [["b"], ["a"]]) == (2, "b")  # its own non-leading block
    assert pool_reach("a", 1, []) == (1, None)


def test_holders_list_confirmed_blocks_only_and_merge() -> None:
    idx = index_with({"a": 2, "b": 3}, routed={"c": 4})
    assert idx.holders(H) == [["a", "b"], ["a", "b"], ["b"]]
    assert idx.match("c", H) == 4 and idx.match("c", H, confirmed_only=True) == 0
    assert merge_holders([["a"], ["a"]], [["d"]]) == [["a", "d"], ["a"]]
    assert merge_holders([["a"]], [["d"], ["d"]], []) == [["a", "d"], ["d"]]


def test_busy_holder_loses_to_an_idle_worker_that_pulls() -> None:
    bal = make_balancer("kv_pool", index_with({"a": 3}), config=CONFIG)
    loads = [WorkerLoad("a", pending_prefill_tokens=1000), WorkerLoad("b")]
    cands = {c.worker_id: c for c in bal.candidates(REQ, loads)}
    # a: (1000 + 70 - 48) / 100 = 10.22 s.  b: pulls 48 tokens in 5 ms + 48 ms and
    # computes the other 22 tokens in 0.22 s.
    assert cands["a"] == PrefillChoice("a", pytest.approx(10.22), 48, 10.0, pytest.approx(0.22))
    assert cands["b"] == PrefillChoice(
        "b", pytest.approx(0.053 + 0.22), 0, 0.0, pytest.approx(0.22),
        pulled_tokens=48, pull_from="a", pull_s=pytest.approx(0.053),
    )  # fmt: skip
    choice = bal.choose_prefill(REQ, loads)
    assert choice.worker_id == "b" and choice.pulled_tokens == 48
    assert bal.metrics.pulled_tokens == 48 and bal.metrics.cached_tokens == 0


def test_prefix_aware_recomputes_where_kv_pool_pulls() -> None:
    loads = [WorkerLoad("a", pending_prefill_tokens=1000), WorkerLoad("b")]
    plain = BalancerConfig(default_prefill_tokens_per_s=100.0, recompute_weight=0.0)
    pa = make_balancer("prefix_aware", index_with({"a": 3}), config=plain)
    choice = pa.choose_prefill(REQ, loads)
    assert (choice.worker_id, choice.pulled_tokens, choice.prefill_s) == ("b", 0, 0.7)


def test_a_prefix_still_being_computed_cannot_be_pulled() -> None:
    # "a" was only routed the blocks: nothing confirmed, so "b" would recompute, and the
    # recompute weight keeps the request behind "a" (it computes them once).
    cfg = BalancerConfig(default_prefill_tokens_per_s=100.0, recompute_weight=4.0, pull=PULL)
    bal = make_balancer("kv_pool", index_with({}, routed={"a": 3}), config=cfg)
    loads = [WorkerLoad("a", pending_prefill_tokens=50), WorkerLoad("b")]
    choice = bal.choose_prefill(REQ, loads)
    assert (choice.worker_id, choice.cached_tokens, choice.pulled_tokens) == ("a", 48, 0)


def test_decode_workers_are_sources_too() -> None:
    decode = index_with({"decode-0": 4})
    bal = KVPoolBalancer(index_with({}), decode_index=decode, config=CONFIG,
                         rng=random.Random(0))
    choice = bal.choose_prefill(REQ, [WorkerLoad("a")])
    assert (choice.pulled_tokens, choice.pull_from) == (64, "decode-0")


def test_without_a_pull_model_kv_pool_is_prefix_aware() -> None:
    plain = BalancerConfig(default_prefill_tokens_per_s=100.0, recompute_weight=4.0)
    loads = [WorkerLoad("a", pending_prefill_tokens=1000), WorkerLoad("b")]
    kv = make_balancer("kv_pool", index_with({"a": 3}), config=plain, rng=random.Random(1))
    pa = make_balancer("prefix_aware", index_with({"a": 3}), config=plain, rng=random.Random(1))
    assert kv.candidates(REQ, loads) == pa.candidates(REQ, loads)
    assert kv.choose_prefill(REQ, loads) == pa.choose_prefill(REQ, loads)
