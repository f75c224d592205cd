"""Per-worker index of cached KV block hashes, kept from the workers' KV events.

The router asks "how many leading blocks of this prompt does worker W already hold?" and
answers from a set of block hashes per worker (the ids of ``pdserve.engine.hashing``):

- Event-fed workers: their block pools publish ``BlockStored`` / ``BlockRemoved`` /
  ``AllBlocksCleared`` in batches numbered 0, 1, 2, ... per worker incarnation. Batches are
  applied in order; a gap (a number other than last + 1) marks the worker stale and
  ``needs_resync`` turns true until ``snapshot`` brings the full set. A new incarnation id
  (the worker restarted) resets everything known about that worker.
- Workers that publish no events: an approximate index of the blocks routed to them, each
  entry expiring ``approx_ttl_s`` after its last routing and bounded to
  ``approx_capacity_blocks`` (least recently routed dropped first).
- Event-fed workers also get short-lived provisional entries for blocks routed to them but
  not yet stored (``pending_ttl_s``), so that a burst of requests sharing a new prefix keeps
  to the worker computing it. A ``BlockStored`` confirms an entry, a ``BlockRemoved`` or
  expiry drops it: the index never holds a provisional guess for long.

Several routers may each keep their own index from the same event stream; it stays exact
from the events alone. Not thread-safe: one owner (the router's event loop) calls it.
Pure Python: no torch, Ray or gRPC.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pdserve.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

MAX_BUFFERED_BATCHES = 4096
"""Batches kept per stale worker for replay on top of a snapshot; past this the buffer is
dropped and only a snapshot newer than every dropped batch brings the worker back in sync."""


@dataclass(slots=True)
class _WorkerState:
    """What one index knows about one worker (one incarnation of it)."""

    incarnation: str | int
    stored: set[int] = field(default_factory=set)
    routed: OrderedDict[int, float] = field(default_factory=OrderedDict)
    """Provisional or approximate entries: hash -> expiry time, least recently routed first."""
    last_seq: int | None = None
    stale: bool = False
    event_fed: bool = False
    buffered: list[tuple[int, tuple[KVEvent, ...]]] = field(default_factory=list)
    """Batches received since the worker went stale, for replay over a snapshot."""
    buffer_overflowed: bool = False


def _seq(batch: tuple[int, tuple[KVEvent, ...]]) -> int:
    return batch[0]


class PrefixIndex:
    """Which block hashes each worker holds; answers leading-prefix matches.

    Promises: for an event-fed worker in sync, ``stored`` equals the set of hashes the
    worker's block pool reported as stored and not since removed, whatever the order of
    ``match`` calls; provisional entries only add blocks routed less than ``pending_ttl_s``
    ago. Block hashes must come from ``pdserve.engine.hashing`` with this index's ``block_size``.
    """

    def __init__(
        self,
        block_size: int,
        *,
        clock: Clock = time.monotonic,
        pending_ttl_s: float = 10.0,
        approx_ttl_s: float = 300.0,
        approx_capacity_blocks: int | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if pending_ttl_s < 0 or approx_ttl_s < 0:
            raise ValueError(
                f"TTLs must be >= 0, got pending_ttl_s={pending_ttl_s}, approx_ttl_s={approx_ttl_s}"
            )
        if approx_capacity_blocks is not None and approx_capacity_blocks <= 0:
            raise ValueError(
                f"approx_capacity_blocks must be positive or None, got {approx_capacity_blocks}"
            )
        self.block_size = block_size
        self._clock = clock
        self._pending_ttl_s = pending_ttl_s
        self._approx_ttl_s = approx_ttl_s
        self._approx_capacity = approx_capacity_blocks
        self._workers: dict[str, _WorkerState] = {}

    # --- membership -----------------------------------------------------------------------

    def add_worker(self, worker_id: str, incarnation: str | int = 0) -> None:
        """Track ``worker_id``; a different incarnation than the one known resets it."""
        self._state(worker_id, incarnation)

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker that left the pool (no error if unknown)."""
        self._workers.pop(worker_id, None)

    def workers(self) -> list[str]:
        """Ids of the tracked workers, sorted."""
        return sorted(self._workers)

    # --- events ---------------------------------------------------------------------------

    def apply_events(
        self,
        worker_id: str,
        seq_no: int,
        events: Sequence[KVEvent],
        incarnation: str | int = 0,
    ) -> bool:
        """Apply one batch of a worker's KV events; returns True while the worker is in sync.

        Batches numbered at or below the last applied one are duplicates and are ignored.
        A gap marks the worker stale (False returned, ``needs_resync`` true); later batches
        are still applied (they are true facts) and buffered for replay over the snapshot.
        """
        st = self._state(worker_id, incarnation)
        st.event_fed = True
        if st.last_seq is not None and seq_no <= st.last_seq:
            return not st.stale
        expected = 0 if st.last_seq is None else st.last_seq + 1
        if seq_no != expected and not st.stale:
            # A first batch past 0 is a late join (the worker published before this router
            # subscribed): routine, resynced like a gap.
            log = logger.info if st.last_seq is None else logger.warning
            log("KV event gap from worker %s: got batch %d, expected %d; resync needed",
                worker_id, seq_no, expected)
            st.stale = True
        st.last_seq = seq_no
        self._apply(st, events)
        if st.stale:
            if len(st.buffered) < MAX_BUFFERED_BATCHES:
                st.buffered.append((seq_no, tuple(events)))
            else:
                st.buffered.clear()
                st.buffer_overflowed = True
        return not st.stale

    def snapshot(
        self,
        worker_id: str,
        seq_no: int,
        hashes: Iterable[int],
        incarnation: str | int = 0,
    ) -> bool:
        """Replace what is known of a worker by its full cache as of batch ``seq_no``
        (-1: before any batch); returns True if the worker is now in sync.

        Batches after ``seq_no`` received while stale are replayed on top; the worker is in
        sync when they continue ``seq_no`` without a gap.
        """
        st = self._state(worker_id, incarnation)
        if not st.stale and st.last_seq is not None and seq_no < st.last_seq:
            return True  # older than what the events already told us
        st.event_fed = True
        st.stored = set(hashes)
        for h in st.stored:
            st.routed.pop(h, None)
        # Batches dropped on overflow came before everything still buffered: the snapshot
        # must be at least as new as the last of them.
        covered = not st.buffer_overflowed or (
            bool(st.buffered) and seq_no >= st.buffered[0][0] - 1
        )
        last = seq_no
        contiguous = True
        for batch_seq, events in sorted((b for b in st.buffered if b[0] > seq_no), key=_seq):
            contiguous = contiguous and batch_seq == last + 1
            self._apply(st, events)  # applied even past a gap: they are still true facts
            last = batch_seq
        in_sync = contiguous and (covered or (st.last_seq is not None and seq_no >= st.last_seq))
        st.last_seq = last if st.last_seq is None else max(last, st.last_seq)
        st.stale = not in_sync
        if in_sync:
            st.buffered.clear()
            st.buffer_overflowed = False
        return in_sync

    def needs_resync(self, worker_id: str) -> bool:
        """True while a gap in the worker's batches has not been repaired by a snapshot."""
        st = self._workers.get(worker_id)
        return st is not None and st.stale

    def stale_workers(self) -> list[str]:
        """Workers waiting for a snapshot, sorted."""
        return sorted(w for w, st in self._workers.items() if st.stale)

    # --- routing feedback -----------------------------------------------------------------

    def record_routed(self, worker_id: str, hashes: Sequence[int]) -> None:
        """Note that a request with these block hashes was sent to ``worker_id``.

        Event-fed workers keep the entries ``pending_ttl_s`` (until events confirm or drop
        them); workers without events keep them ``approx_ttl_s``, refreshed on each routing.
        """
        st = self._workers.get(worker_id)
        if st is None:
            st = self._state(worker_id, 0)
        ttl = self._pending_ttl_s if st.event_fed else self._approx_ttl_s
        if ttl <= 0:
            return
        now = self._clock()
        expiry = now + ttl
        routed = st.routed
        # Least recently routed first: drop the expired head so entries that are never
        # confirmed nor looked up again do not pile up.
        while routed and next(iter(routed.values())) <= now:
            routed.popitem(last=False)
        for h in hashes:
            if h in st.stored:
                continue
            routed[h] = expiry
            routed.move_to_end(h)
        if not st.event_fed and self._approx_capacity is not None:
            while len(routed) > self._approx_capacity:
                routed.popitem(last=False)

    # --- queries --------------------------------------------------------------------------

    def match(self, worker_id: str, hashes: Sequence[int], *, confirmed_only: bool = False) -> int:
        """Number of leading ``hashes`` the worker holds (stored or live routed entries;
        with ``confirmed_only``, stored entries alone: blocks another worker could read)."""
        st = self._workers.get(worker_id)
        if st is None:
            return 0
        stored = st.stored
        routed = st.routed
        now: float | None = None
        n = 0
        for h in hashes:
            if h in stored:
                n += 1
                continue
            if confirmed_only:
                break
            expiry = routed.get(h)
            if expiry is None:
                break
            if now is None:
                now = self._clock()
            if expiry <= now:
                del routed[h]
                break
            n += 1
        return n

    def holders(self, hashes: Sequence[int]) -> list[list[str]]:
        """For each leading block of ``hashes``, the workers whose confirmed (stored) blocks
        include it, sorted; stops before the first block no worker has confirmed."""
        states = sorted(self._workers.items())
        out: list[list[str]] = []
        for h in hashes:
            held = [w for w, st in states if h in st.stored]
            if not held:
                break
            out.append(held)
        return out

    def match_all(self, hashes: Sequence[int]) -> dict[str, int]:
        """``match`` for every tracked worker."""
        return {w: self.match(w, hashes) for w in self._workers}

    def num_blocks(self, worker_id: str) -> int:
        """Blocks the index believes ``worker_id`` holds: stored plus unexpired routed."""
        st = self._workers.get(worker_id)
        if st is None:
            return 0
        self._expire(st)
        return len(st.stored) + len(st.routed)

    def stored_hashes(self, worker_id: str) -> frozenset[int]:
        """The event-confirmed hashes of ``worker_id`` (empty if unknown)."""
        st = self._workers.get(worker_id)
        return frozenset(st.stored) if st is not None else frozenset()

    # --- internals ------------------------------------------------------------------------

    def _state(self, worker_id: str, incarnation: str | int) -> _WorkerState:
        st = self._workers.get(worker_id)
        if st is None or st.incarnation != incarnation:
            if st is not None and st.incarnation != 0:  # 0: registered, not yet heard from
                logger.info(
                    "worker %s restarted (incarnation %r -> %r); index reset",
                    worker_id,
                    st.incarnation,
                    incarnation,
                )
            st = _WorkerState(incarnation=incarnation)
            self._workers[worker_id] = st
        return st

    def _apply(self, st: _WorkerState, events: Sequence[KVEvent]) -> None:
        for ev in events:
            if isinstance(ev, BlockStored):
                if ev.block_size != self.block_size:
                    raise ValueError(
                        f"BlockStored with block_size {ev.block_size}, but this index uses "
                        f"{self.block_size}: router and workers must share one block size"
                    )
                st.stored.update(ev.block_hashes)
                for h in ev.block_hashes:
                    st.routed.pop(h, None)
            elif isinstance(ev, BlockRemoved):
                st.stored.difference_update(ev.block_hashes)
                for h in ev.block_hashes:
                    st.routed.pop(h, None)
            elif isinstance(ev, AllBlocksCleared):
                st.stored.clear()
                st.routed.clear()
            else:
                raise TypeError(f"not a KV event: {ev!r}")

    def _expire(self, st: _WorkerState) -> None:
        if not st.routed:
            return
        now = self._clock()
        for h in [h for h, exp in st.routed.items() if exp <= now]:
            del st.routed[h]
