"""What pulling cached KV blocks from another worker costs, against recomputing them.

A cluster-wide prefix pool (Mooncake-style): when a prompt's prefix is cached on a worker
other than the prefill worker the balancer picks (a prefill worker, or a decode worker that
received it), the chosen worker may pull those blocks over the KV transport instead of
computing them. The pull is worth it when it is faster:

    pull_s(tokens)    = latency_s + tokens * kv_bytes_per_token / link_bytes_per_s
    compute_s(tokens) = tokens / prefill_tokens_per_s

``link_bytes_per_s`` and ``prefill_tokens_per_s`` are measured rates (the link's from
``pdserve.bench.kvtransfer`` or the service's own transfer counters, the prefill rate from
the worker's stats); the model holds the defaults used until a worker reports its own.
Pulled blocks only ever come from blocks a source has *confirmed* (stored, per its KV
events), never from provisional routing guesses: a pull of a block still being computed
would have nothing to read.

Pure logic, no I/O: the balancer, the balancer benchmark and the planner's simulator all
decide with this one function (``plan``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple


class PullPlan(NamedTuple):
    """What a worker pulls for one request: ``tokens`` (0 = recompute) from ``source``."""

    tokens: int
    seconds: float
    source: str | None


NO_PULL = PullPlan(0, 0.0, None)


@dataclass(frozen=True, slots=True)
class PullCostModel:
    """Costs of the KV pool's pulls. ``kv_bytes_per_token`` 0 turns the pool off."""

    kv_bytes_per_token: int = 0
    """Bytes of KV one token occupies across every layer (K and V)."""
    link_bytes_per_s: float = 0.0
    """Link rate assumed between two workers that have not measured theirs."""
    latency_s: float = 0.0
    """Fixed cost of one pull: the request to the holder and its first byte."""
    min_pull_tokens: int = 1
    """Smaller pulls are not worth a round trip; they are recomputed."""

    def __post_init__(self) -> None:
        if self.kv_bytes_per_token < 0:
            raise ValueError(f"kv_bytes_per_token must be >= 0, got {self.kv_bytes_per_token}")
        if self.link_bytes_per_s < 0 or self.latency_s < 0:
            raise ValueError(
                f"link_bytes_per_s and latency_s must be >= 0, got {self.link_bytes_per_s}, "
                f"{self.latency_s}"
            )
        if self.min_pull_tokens < 1:
            raise ValueError(f"min_pull_tokens must be >= 1, got {self.min_pull_tokens}")

    @property
    def enabled(self) -> bool:
        return self.kv_bytes_per_token > 0 and self.link_bytes_per_s > 0

    def pull_s(self, tokens: int, link_bytes_per_s: float = 0.0) -> float:
        """Seconds to pull ``tokens`` tokens' KV (``link_bytes_per_s`` 0: the default)."""
        link = link_bytes_per_s if link_bytes_per_s > 0 else self.link_bytes_per_s
        if link <= 0:
            return float("inf")
        return self.latency_s + tokens * self.kv_bytes_per_token / link

    def plan(
        self,
        local_tokens: int,
        source_tokens: int,
        source: str | None,
        prefill_tokens_per_s: float,
        link_bytes_per_s: float = 0.0,
    ) -> PullPlan:
        """Pull the ``source_tokens - local_tokens`` tokens the worker lacks (from
        ``source``, the main holder) when that beats computing them at
        ``prefill_tokens_per_s``; else ``NO_PULL``. The pull's time is the puller's: its
        link carries every pulled byte, whichever workers hold them."""
        gain = source_tokens - local_tokens
        if source is None or gain < self.min_pull_tokens or not self.enabled:
            return NO_PULL
        seconds = self.pull_s(gain, link_bytes_per_s)
        if seconds >= gain / prefill_tokens_per_s:
            return NO_PULL
        return PullPlan(gain, seconds, source)


def merge_holders(*lists: Sequence[Sequence[str]]) -> list[list[str]]:
    """Per-block holders of several indexes (prefill, decode) as one list: block ``i`` is
    held by every worker any list names for it, up to the first block none holds."""
    out: list[list[str]] = []
    for i in range(max((len(x) for x in lists), default=0)):
        held = sorted({w for x in lists if i < len(x) for w in x[i]})
        if not held:
            break
        out.append(held)
    return out


def pool_reach(
    worker: str, local_blocks: int, holders: Sequence[Sequence[str]]
) -> tuple[int, str | None]:
    """How far ``worker``, holding the first ``local_blocks`` blocks of a prompt, can get
    without computing: past its own blocks, while some worker holds each next block
    (``holders[i]``: the workers holding block ``i``; blocks may come from several).
    Returns (leading blocks reachable, the worker supplying most of the pulled ones)."""
    supply: dict[str, int] = {}
    reach = local_blocks
    while reach < len(holders):
        held = holders[reach]
        if worker not in held:
            source = held[0]
            supply[source] = supply.get(source, 0) + 1
        reach += 1
    main = max(sorted(supply), key=supply.__getitem__) if supply else None
    return reach, main


def source_span(source: str, first_block: int, holders: Sequence[Sequence[str]]) -> int:
    """The end of the run of blocks ``source`` holds from ``first_block`` on (per-block
    ``holders`` as for ``pool_reach``): a pull from one source reads blocks
    ``[first_block, source_span(...))``; ``first_block`` itself if it holds none."""
    end = first_block
    while end < len(holders) and source in holders[end]:
        end += 1
    return end
