"""Events a block pool emits when full blocks enter or leave its prefix cache.

Consumers (the router's prefix index) rebuild the set of cached block hashes of each worker
from these events alone. Pure Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks became reusable: ``block_hashes`` in chain order, the first chained to
    ``parent_hash`` (``None`` when it is the first block of a sequence)."""

    block_hashes: tuple[int, ...]
    parent_hash: int | None
    block_size: int


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks were evicted: their hashes no longer hit in this worker's cache."""

    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The whole cache was dropped (reset); the consumer forgets everything it knew."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
