"""Balancer: the prefill TTFT formula and score, ties, policies, decode choice, queueing."""

from __future__ import annotations

import random

import pytest

from pdserve.engine.hashing import hash_blocks
from pdserve.engine.kv_events import BlockStored
from pdserve.router.balancer import (
    POLICIES,
    BalancerConfig,
    DecodeChoice,
    DecodeQueue,
    LoadView,
    NoWorkerAvailableError,
    PrefillChoice,
    ResourceExhaustedError,
    RouteRequest,
    WorkerLoad,
    make_balancer,
)
from pdserve.router.prefix_index import PrefixIndex

BS = 16
H = hash_blocks(list(range(3 * BS)), BS)  # the prompt's three full blocks
REQ = RouteRequest("r1", tuple(H), num_prompt_tokens=50)
PURE_TTFT = BalancerConfig(default_prefill_tokens_per_s=100.0, recompute_weight=0.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def index_with(holdings: dict[str, int]) -> PrefixIndex:
    """An index where worker w holds the first holdings[w] blocks of H."""
    idx = PrefixIndex(BS, clock=FakeClock())
    for w, n in holdings.items():
        idx.apply_events(w, 0, [BlockStored(tuple(H[:n]), None, BS)] if n else [])
    return idx


def test_predicted_ttft_is_queue_plus_uncached_prefill_plus_transfer() -> None:
    bal = make_balancer("prefix_aware", index_with({"a": 2, "b": 0}), config=PURE_TTFT)
    loads = [
        WorkerLoad("a", pending_prefill_tokens=100, prefill_tokens_per_s=100.0,
                   transfer_tokens_per_s=1000.0),
        WorkerLoad("b", pending_prefill_tokens=0, prefill_tokens_per_s=50.0,
                   transfer_tokens_per_s=1000.0),
    ]  # fmt: skip
    cands = bal.candidates(REQ, loads)
    # a: (100 + 50 - 32) / 100 + 50 / 1000 = 1.23;  b: (0 + 50) / 50 + 0.05 = 1.05
    assert cands == [
        PrefillChoice("a", pytest.approx(1.23, abs=1e-12), 32, 1.0, 0.18),
        PrefillChoice("b", pytest.approx(1.05, abs=1e-12), 0, 0.0, 1.0),
    ]
    choice = bal.choose_prefill(REQ, loads)
    assert choice.worker_id == "b"  # the holder's queue is slower than recomputing
    assert choice.cached_tokens == 0


def test_holder_wins_when_its_queue_is_shorter_than_the_recompute() -> None:
    bal = make_balancer("prefix_aware", index_with({"a": 3, "b": 0}), config=PURE_TTFT)
    loads = [WorkerLoad("a", pending_prefill_tokens=40), WorkerLoad("b")]
    # a: (40 + 50 - 48) / 100 = 0.42 (default rate);  b: 50 / 100 = 0.5
    choice = bal.choose_prefill(REQ, loads)
    assert choice == PrefillChoice("a", pytest.approx(0.42, abs=1e-12), 48, 0.4, 0.02)


def test_recompute_weight_charges_recomputing_tokens_another_worker_holds() -> None:
    cfg = BalancerConfig(default_prefill_tokens_per_s=100.0, recompute_weight=4.0)
    bal = make_balancer("prefix_aware", index_with({"a": 2, "b": 0, "c": 1}), config=cfg)
    loads = [
        WorkerLoad("a", pending_prefill_tokens=100, prefill_tokens_per_s=100.0),
        WorkerLoad("b", prefill_tokens_per_s=50.0),
        WorkerLoad("c", pending_prefill_tokens=10, prefill_tokens_per_s=100.0),
    ]
    cands = bal.candidates(REQ, loads)
    # a: ttft 1.18, holds the most (32)        -> 1.18
    # b: ttft 1.0 + 4 * (32 - 0) / 50 = 3.56
    # c: ttft (10 + 34) / 100 = 0.44 + 4 * (32 - 16) / 100 = 1.08
    assert bal.scores(REQ, cands) == pytest.approx([1.18, 3.56, 1.08], abs=1e-12)
    assert bal.choose_prefill(REQ, loads).worker_id == "c"


def test_unmeasured_rate_falls_back_to_the_configured_default() -> None:
    bal = make_balancer("prefix_aware", index_with({}), config=PURE_TTFT)
    (cand,) = bal.candidates(REQ, [WorkerLoad("a", pending_prefill_tokens=50)])
    assert cand.predicted_ttft_s == 1.0  # (50 + 50) / 100


def test_ties_are_broken_by_the_injected_rng() -> None:
    loads = [WorkerLoad("a"), WorkerLoad("b"), WorkerLoad("c", pending_prefill_tokens=1)]
    bal = make_balancer("prefix_aware", index_with({}), config=PURE_TTFT, rng=random.Random(7))
    picks = [bal.choose_prefill(RouteRequest(f"r{i}", (), 50), loads).worker_id for i in range(8)]
    ref = random.Random(7)
    assert picks == [ref.choice(["a", "b"]) for _ in range(8)]
    assert set(picks) == {"a", "b"}


def test_dead_workers_are_skipped_and_no_alive_worker_raises() -> None:
    bal = make_balancer("least_loaded", index_with({}))
    loads = [WorkerLoad("a", alive=False), WorkerLoad("b", pending_prefill_tokens=10**6)]
    assert bal.choose_prefill(REQ, loads).worker_id == "b"
    with pytest.raises(NoWorkerAvailableError, match="r1"):
        bal.choose_prefill(REQ, [WorkerLoad("a", alive=False)])


def test_round_robin_cycles_alive_workers_in_id_order() -> None:
    bal = make_balancer("round_robin", index_with({"c": 3}))
    loads = [WorkerLoad("c"), WorkerLoad("a"), WorkerLoad("b")]
    assert [bal.choose_prefill(REQ, loads).worker_id for _ in range(4)] == ["a", "b", "c", "a"]


def test_least_loaded_ignores_the_cache() -> None:
    bal = make_balancer("least_loaded", index_with({"a": 3}))
    loads = [WorkerLoad("a", pending_prefill_tokens=1), WorkerLoad("b")]
    assert bal.choose_prefill(REQ, loads).worker_id == "b"


def test_choice_is_recorded_in_the_index_and_the_metrics() -> None:
    idx = index_with({"a": 0, "b": 0})
    bal = make_balancer("prefix_aware", idx, config=PURE_TTFT, rng=random.Random(0))
    first = bal.choose_prefill(REQ, [WorkerLoad("a"), WorkerLoad("b")])
    assert idx.match(first.worker_id, H) == 3  # provisional until events confirm
    second = bal.choose_prefill(
        RouteRequest("r2", tuple(H), 50), [WorkerLoad("a"), WorkerLoad("b")]
    )
    assert second.worker_id == first.worker_id
    assert second.cached_tokens == 48
    assert bal.observe_ttft("r1", first.predicted_ttft_s + 0.25) == pytest.approx(0.25)
    assert bal.observe_ttft("r1", 1.0) is None
    m = bal.metrics
    assert (m.decisions, m.prompt_tokens, m.cached_tokens) == (2, 100, 48)
    assert m.cached_fraction == 0.48
    assert m.ttft_mean_abs_error_s == pytest.approx(0.25)
    assert m.by_worker == {first.worker_id: 2}


def test_make_balancer_knows_every_policy_and_rejects_others() -> None:
    for name in POLICIES:
        assert make_balancer(name, index_with({})).name == name
    with pytest.raises(ValueError, match="round_robin, least_loaded, prefix_aware"):
        make_balancer("random", index_with({}))
    with pytest.raises(ValueError, match="recompute_weight"):
        BalancerConfig(recompute_weight=-1.0)


# --- decode -------------------------------------------------------------------------------


def test_decode_picks_the_most_headroom_after_reservation() -> None:
    bal = make_balancer("prefix_aware", index_with({}))
    # 50 prompt tokens + 1 -> 4 blocks of 16
    loads = [
        WorkerLoad("a", free_blocks=10, total_blocks=20),  # (10 - 4) / 20 = 0.3
        WorkerLoad("b", free_blocks=14, total_blocks=40),  # (14 - 4) / 40 = 0.25
        WorkerLoad("c", free_blocks=3, total_blocks=4),  # cannot fit 4
        WorkerLoad("d", free_blocks=40, total_blocks=40, alive=False),
    ]
    assert bal.choose_decode(REQ, loads) == DecodeChoice("a", 4, 0, 0.3)


def test_decode_counts_its_own_prefix_hits_and_batch_limit() -> None:
    bal = make_balancer("prefix_aware", index_with({}), decode_index=index_with({"b": 3}))
    loads = [
        WorkerLoad("a", free_blocks=12, total_blocks=20),  # (12 - 4) / 20 = 0.4
        WorkerLoad("b", free_blocks=9, total_blocks=20, running_seqs=1, max_running_seqs=4),
        # b reuses 3 blocks: min((9 - 1) / 20, 1 - 2 / 4) = 0.4: tie on headroom; a runs fewer
        WorkerLoad("c", free_blocks=20, total_blocks=20, running_seqs=2, max_running_seqs=2),
    ]
    assert bal.choose_decode(REQ, loads) == DecodeChoice("a", 4, 0, 0.4)
    assert bal.decode_index is not None and bal.decode_index.match("a", H) == 3  # provisional
    bal = make_balancer("prefix_aware", index_with({}), decode_index=index_with({"b": 3}))
    loads[0] = WorkerLoad("a", free_blocks=12, total_blocks=20, running_seqs=1)
    assert bal.choose_decode(REQ, loads) == DecodeChoice("b", 1, 3, 0.4)  # more cached wins


def test_decode_returns_none_when_no_worker_has_room() -> None:
    bal = make_balancer("prefix_aware", index_with({}))
    assert bal.choose_decode(REQ, [WorkerLoad("a", free_blocks=3, total_blocks=8)]) is None
    assert bal.metrics.decode_no_room == 1


def test_decode_queue_admits_in_order_and_rejects_past_its_bound() -> None:
    clock = FakeClock()
    bal = make_balancer("prefix_aware", index_with({}))
    queue = DecodeQueue(bal, bound=2, max_wait_s=10.0, clock=clock)
    r2, r3 = RouteRequest("r2", (), 50), RouteRequest("r3", (), 50)
    queue.push(REQ)
    queue.push(r2)
    with pytest.raises(ResourceExhaustedError, match="bound 2"):
        queue.push(r3)
    admitted, expired = queue.drain([WorkerLoad("a", free_blocks=6, total_blocks=8)])
    assert [(r.request_id, c.worker_id) for r, c in admitted] == [("r1", "a")]  # 4 of 6 used
    assert expired == [] and len(queue) == 1
    clock.now = 10.5
    admitted, expired = queue.drain([WorkerLoad("a", free_blocks=8, total_blocks=8)])
    assert admitted == [] and expired == [r2] and len(queue) == 0


# --- load view ----------------------------------------------------------------------------


def test_load_view_drains_pending_tokens_and_adds_own_routing() -> None:
    clock = FakeClock()
    view = LoadView(clock=clock, default_rate=100.0)
    view.update([WorkerLoad("a", pending_prefill_tokens=300), WorkerLoad("b", free_blocks=5)])
    clock.now = 1.0
    view.add_prefill("a", 50)  # 300 - 100 + 50 = 250
    view.add_decode("b", 2)
    clock.now = 2.0
    a, b = view.current()
    assert a.pending_prefill_tokens == 150
    assert (b.free_blocks, b.running_seqs) == (3, 1)
    clock.now = 10.0
    assert view.current()[0].pending_prefill_tokens == 0
