"""Cached blocks lent to a peer worker while it reads them (the cluster-wide prefix pool).

A worker that holds a prompt's prefix in its prefix cache may be asked to send those blocks
to another worker (which then computes only the rest of the prompt). While the blocks are
being sent they must not be evicted nor reused: ``lend`` pins them (one more reference
each, taking free cached blocks off the free list) under a lease id, and ``give_back``
drops that reference once the transfer is over, whatever its outcome. The caller (the
worker) ends every lease: when its connector reports the transfer sent or failed, and the
connector's own lease bounds how long that takes.

Only blocks in the prefix cache are lent, matched by the same hash chain, parent and tokens
as a local prefix hit (``BlockPool.get_cached_block``): a cached block holds computed KV, so
what is lent is exactly what the peer would have computed. Pure Python, no torch. Not
thread-safe: the engine's owner thread calls it.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.engine.block_pool import Block, BlockPool
from pdserve.engine.hashing import hash_blocks


class BlockLeases:
    """The leases of one block pool: lease id -> the blocks it pins."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self._leases: dict[str, list[Block]] = {}
        self.lent_blocks = 0
        """Blocks lent since start (counted when the lease is taken)."""

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, lease_id: str) -> bool:
        return lease_id in self._leases

    def lend(self, lease_id: str, token_ids: Sequence[int], first_block: int,
             num_blocks: int) -> list[int] | None:
        """Pin the cached blocks ``[first_block, num_blocks)`` of the prompt ``token_ids``
        (its full blocks) under ``lease_id`` and return their ids in order; None (and
        nothing pinned) if any of them is not in the cache. ValueError for a lease id in use
        or a range outside the prompt's full blocks."""
        if lease_id in self._leases:
            raise ValueError(f"lease {lease_id!r} is already held")
        bs = self.pool.block_size
        if not 0 <= first_block < num_blocks <= len(token_ids) // bs:
            raise ValueError(f"blocks [{first_block}, {num_blocks}) are not full blocks of a "
                             f"prompt of {len(token_ids)} tokens (block size {bs})")
        hashes = hash_blocks(token_ids[: num_blocks * bs], bs)
        blocks: list[Block] = []
        for i in range(first_block, num_blocks):
            block = self.pool.get_cached_block(hashes[i], hashes[i - 1] if i else None,
                                               token_ids[i * bs: (i + 1) * bs])
            if block is None:
                return None
            blocks.append(block)
        self.pool.touch(blocks)
        self._leases[lease_id] = blocks
        self.lent_blocks += len(blocks)
        return [b.block_id for b in blocks]

    def give_back(self, lease_id: str) -> bool:
        """End a lease: its blocks lose the reference it held (they stay cached). False if
        unknown (already given back)."""
        blocks = self._leases.pop(lease_id, None)
        if blocks is None:
            return False
        self.pool.free(blocks)
        return True
