"""PrefixIndex: events, gaps, resync, restarts, expiry of approximate entries."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine.hashing import hash_blocks
from pdserve.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from pdserve.router import prefix_index
from pdserve.router.prefix_index import PrefixIndex

BS = 4
H = hash_blocks(list(range(6 * BS)), BS)  # six chained block hashes
OTHER = hash_blocks([99] * (2 * BS), BS)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def stored(*hashes: int, parent: int | None = None) -> BlockStored:
    return BlockStored(tuple(hashes), parent, BS)


def test_stored_blocks_match_as_leading_prefix() -> None:
    idx = PrefixIndex(BS)
    assert idx.apply_events("w0", 0, [stored(*H[:3])]) is True
    assert idx.match("w0", H) == 3
    assert idx.match("w0", H[:2]) == 2
    assert idx.match("w0", OTHER) == 0
    assert idx.match("unknown", H) == 0
    assert idx.match_all(H) == {"w0": 3}


def test_removed_block_cuts_the_match_at_that_block() -> None:
    idx = PrefixIndex(BS)
    idx.apply_events("w0", 0, [stored(*H[:4])])
    idx.apply_events("w0", 1, [BlockRemoved((H[1],))])
    assert idx.match("w0", H) == 1  # H[2], H[3] still stored but unreachable as a prefix
    assert idx.stored_hashes("w0") == frozenset({H[0], H[2], H[3]})


def test_all_blocks_cleared_forgets_the_worker_cache() -> None:
    idx = PrefixIndex(BS)
    idx.apply_events("w0", 0, [stored(*H[:2])])
    idx.apply_events("w0", 1, [AllBlocksCleared(), stored(OTHER[0])])
    assert idx.match("w0", H) == 0
    assert idx.match("w0", OTHER) == 1


def test_duplicate_or_old_batch_is_ignored() -> None:
    idx = PrefixIndex(BS)
    idx.apply_events("w0", 0, [stored(H[0])])
    idx.apply_events("w0", 1, [BlockRemoved((H[0],))])
    assert idx.apply_events("w0", 0, [stored(H[0])]) is True  # a redelivered batch 0
    assert idx.match("w0", H) == 0
    assert not idx.needs_resync("w0")


def test_gap_marks_stale_and_snapshot_replays_the_later_batches() -> None:
    idx = PrefixIndex(BS)
    idx.apply_events("w0", 0, [stored(H[0])])
    # batch 1 (stores H[1]) is lost
    assert idx.apply_events("w0", 2, [stored(H[2], parent=H[1])]) is False
    assert idx.needs_resync("w0")
    assert idx.stale_workers() == ["w0"]
    assert idx.apply_events("w0", 3, [stored(H[3], parent=H[2])]) is False
    # The worker's cache as of batch 1; batches 2 and 3 are replayed on top of it.
    assert idx.snapshot("w0", 1, [H[0], H[1]]) is True
    assert not idx.needs_resync("w0")
    assert idx.stored_hashes("w0") == frozenset(H[:4])
    assert idx.match("w0", H) == 4
    assert idx.apply_events("w0", 4, [BlockRemoved((H[3],))]) is True
    assert idx.match("w0", H) == 3


def test_snapshot_older_than_the_gap_keeps_the_worker_stale() -> None:
    idx = PrefixIndex(BS)
    idx.apply_events("w0", 0, [stored(H[0])])
    idx.apply_events("w0", 1, [stored(H[1], parent=H[0])])
    idx.apply_events("w0", 3, [stored(H[3], parent=H[2])])  # batch 2 lost
    # Only batch 3 was buffered (after the gap): batches 1 and 2 are not covered.
    assert idx.snapshot("w0", 0, [H[0]]) is False
    assert idx.needs_resync("w0")
    assert idx.snapshot("w0", 3, H[:4]) is True
    assert idx.stored_hashes("w0") == frozenset(H[:4])
    assert idx.apply_events("w0", 4, []) is True


def test_router_joining_a_running_worker_resyncs_from_a_snapshot() -> None:
    idx = PrefixIndex(BS)
    assert idx.apply_events("w0", 57, [stored(H[2], parent=H[1])]) is False
    assert idx.needs_resync("w0")
    assert idx.snapshot("w0", 56, H[:2]) is True
    assert idx.match("w0", H) == 3


def test_snapshot_older_than_applied_events_is_ignored_when_in_sync() -> None:
    idx = PrefixIndex(BS)
    idx.apply_events("w0", 0, [stored(H[0])])
    idx.apply_events("w0", 1, [stored(H[1], parent=H[0])])
    assert idx.snapshot("w0", 0, [H[0]]) is True
    assert idx.match("w0", H) == 2


def test_new_incarnation_resets_the_worker() -> None:
    idx = PrefixIndex(BS)
    idx.apply_events("w0", 0, [stored(*H[:3])], incarnation="a")
    idx.apply_events("w0", 1, [], incarnation="a")
    assert idx.apply_events("w0", 0, [stored(OTHER[0])], incarnation="b") is True
    assert idx.match("w0", H) == 0
    assert idx.match("w0", OTHER) == 1
    # A restarted worker seen first mid-stream needs a snapshot.
    assert idx.apply_events("w0", 5, [], incarnation="c") is False
    assert idx.match("w0", OTHER) == 0
    assert idx.snapshot("w0", 5, [H[0]], incarnation="c") is True
    assert idx.match("w0", H) == 1


def test_buffer_overflow_needs_a_snapshot_newer_than_the_dropped_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(prefix_index, "MAX_BUFFERED_BATCHES", 2)
    idx = PrefixIndex(BS)
    idx.apply_events("w0", 0, [])
    for seq in range(2, 7):  # batch 1 lost; 2, 3 buffered, 4 overflows, 5, 6 buffered
        idx.apply_events("w0", seq, [])
    assert idx.snapshot("w0", 1, []) is False
    assert idx.snapshot("w0", 4, [H[0]]) is True
    assert idx.match("w0", H) == 1


def test_block_size_mismatch_raises() -> None:
    idx = PrefixIndex(BS)
    with pytest.raises(ValueError, match="block_size 8"):
        idx.apply_events("w0", 0, [BlockStored((H[0],), None, 8)])


def test_worker_without_events_keeps_routed_blocks_until_expiry() -> None:
    clock = FakeClock()
    idx = PrefixIndex(BS, clock=clock, approx_ttl_s=60.0)
    idx.record_routed("w0", H[:3])
    clock.now = 59.0
    assert idx.match("w0", H) == 3
    idx.record_routed("w0", H[:1])  # refreshes only H[0]
    clock.now = 60.0
    assert idx.match("w0", H) == 1
    assert idx.num_blocks("w0") == 1
    clock.now = 119.0
    assert idx.match("w0", H) == 0


def test_approximate_index_drops_least_recently_routed_past_capacity() -> None:
    idx = PrefixIndex(BS, clock=FakeClock(), approx_capacity_blocks=3)
    idx.record_routed("w0", H[:2])
    idx.record_routed("w0", OTHER[:2])  # pushes out H[0]
    assert idx.match("w0", OTHER) == 2
    assert idx.match("w0", H) == 0
    assert idx.num_blocks("w0") == 3


def test_pending_entries_of_event_fed_worker_are_confirmed_or_expire() -> None:
    clock = FakeClock()
    idx = PrefixIndex(BS, clock=clock, pending_ttl_s=5.0)
    idx.apply_events("w0", 0, [stored(H[0])])
    idx.record_routed("w0", H[:3])
    assert idx.match("w0", H) == 3
    idx.apply_events("w0", 1, [stored(H[1], parent=H[0])])  # H[1] confirmed, H[2] pending
    clock.now = 5.0
    assert idx.match("w0", H) == 2
    idx.record_routed("w0", H[:4])
    idx.apply_events("w0", 2, [BlockRemoved((H[2],))])  # drops the pending guess too
    assert idx.match("w0", H) == 2


def test_two_routers_fed_the_same_events_agree() -> None:
    a, b = PrefixIndex(BS), PrefixIndex(BS)
    batches = [[stored(*H[:4])], [BlockRemoved((H[3],))], [stored(*OTHER)]]
    for seq, events in enumerate(batches):
        for idx in (a, b):
            idx.apply_events("w0", seq, events)
    assert a.stored_hashes("w0") == b.stored_hashes("w0") == frozenset(H[:3] + OTHER)


_event = st.one_of(
    st.tuples(st.just("store"), st.lists(st.integers(0, 15), min_size=1, max_size=4)),
    st.tuples(st.just("remove"), st.lists(st.integers(0, 15), min_size=1, max_size=4)),
    st.tuples(st.just("clear"), st.just([])),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(_event, max_size=4), max_size=12), st.data())
def test_index_equals_the_worker_cache_after_any_events_gap_and_resync(
    batches: list[list[tuple[str, list[int]]]], data: st.DataObject
) -> None:
    idx = PrefixIndex(BS)
    cache: set[int] = set()
    lost = data.draw(st.sets(st.integers(0, max(0, len(batches) - 1))))
    for seq, batch in enumerate(batches):
        events = []
        for kind, ids in batch:
            if kind == "store":
                events.append(BlockStored(tuple(ids), None, BS))
                cache.update(ids)
            elif kind == "remove":
                events.append(BlockRemoved(tuple(ids)))
                cache.difference_update(ids)
            else:
                events.append(AllBlocksCleared())
                cache.clear()
        if seq in lost:
            continue
        if not idx.apply_events("w0", seq, events):
            idx.snapshot("w0", seq, cache)
        assert not idx.needs_resync("w0")
    if not lost or max(lost) < len(batches) - 1:
        assert idx.stored_hashes("w0") == frozenset(cache)


def test_expired_routed_entries_are_dropped_on_the_next_routing() -> None:
    clock = FakeClock()
    idx = PrefixIndex(BS, clock=clock, pending_ttl_s=1.0)
    idx.apply_events("w0", 0, [])
    idx.record_routed("w0", H[:3])  # never confirmed, never looked up again
    clock.now = 2.0
    idx.record_routed("w0", OTHER[:1])
    assert idx.num_blocks("w0") == 1
