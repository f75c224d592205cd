"""Which KV heads a tensor-parallel rank holds, and which heads move between two layouts.

Pure Python (no torch). A model has ``total`` KV heads; with tensor parallelism of degree
``tp`` rank ``r`` keeps a contiguous range of them in every KV block, under the same block ids
as its sibling ranks. When ``tp`` exceeds ``total`` the heads are replicated (as vLLM does):
each head is held by ``tp // total`` consecutive ranks.

A transfer between a prefill worker of TP ``a`` and a decode worker of TP ``b`` is a set of
rank-to-rank moves: prefill rank ``i`` sends to decode rank ``j`` exactly the heads both hold
(``transfer_plan``), so nothing is gathered through one process. A KV connector addresses
such a move as "these blocks, this head range" (see ``pdserve.kvtransfer.nccl``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, order=True)
class HeadRange:
    """KV heads ``[start, stop)`` of the model (global head indices)."""

    start: int
    stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise ValueError(
                f"a head range needs 0 <= start < stop, got [{self.start}, {self.stop})"
            )

    @property
    def count(self) -> int:
        return self.stop - self.start

    def contains(self, other: HeadRange) -> bool:
        return self.start <= other.start and other.stop <= self.stop

    def local(self, inner: HeadRange) -> slice:
        """Where ``inner`` (global heads, inside this range) lies in a cache holding ours."""
        if not self.contains(inner):
            raise ValueError(f"heads {inner} are not inside {self}")
        return slice(inner.start - self.start, inner.stop - self.start)

    def __str__(self) -> str:
        return f"[{self.start}, {self.stop})"


def overlap(a: HeadRange, b: HeadRange) -> HeadRange | None:
    """The heads both ``a`` and ``b`` hold, or None."""
    start, stop = max(a.start, b.start), min(a.stop, b.stop)
    return HeadRange(start, stop) if start < stop else None


def shard_range(total: int, tp: int, rank: int) -> HeadRange:
    """The KV heads rank ``rank`` of ``tp`` holds.

    ``total`` must divide by ``tp`` (each rank holds ``total // tp`` heads) or ``tp`` by
    ``total`` (each head replicated on ``tp // total`` ranks); anything else is refused.
    """
    if total < 1 or tp < 1:
        raise ValueError(f"need at least one KV head and one rank, got {total} heads, TP {tp}")
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} is not in [0, {tp})")
    if total % tp == 0:
        per = total // tp
        return HeadRange(rank * per, (rank + 1) * per)
    if tp % total == 0:
        head = rank // (tp // total)
        return HeadRange(head, head + 1)
    raise ValueError(
        f"{total} KV heads cannot be split over TP {tp}: use a degree that divides the "
        f"heads or that the heads divide"
    )


@dataclass(frozen=True, slots=True)
class HeadMove:
    """Prefill rank ``src_rank`` sends heads ``heads`` of every block to decode rank
    ``dst_rank``."""

    src_rank: int
    dst_rank: int
    heads: HeadRange


def transfer_plan(total: int, src_tp: int, dst_tp: int) -> list[HeadMove]:
    """Rank-to-rank moves that give every destination rank exactly the heads it holds, each
    head from exactly one source rank (the lowest one holding it when heads are replicated).

    Sorted by destination rank, then source rank.
    """
    moves: list[HeadMove] = []
    for dst in range(dst_tp):
        want = shard_range(total, dst_tp, dst)
        covered = want.start
        for src in range(src_tp):
            have = shard_range(total, src_tp, src)
            common = overlap(have, HeadRange(covered, want.stop)) if covered < want.stop else None
            if common is not None and common.start == covered:
                moves.append(HeadMove(src, dst, common))
                covered = common.stop
        if covered != want.stop:  # unreachable when both layouts are valid shardings
            raise AssertionError(f"heads {want} of rank {dst} are not covered")
    return moves
