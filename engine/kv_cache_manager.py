"""Per-sequence block tables on top of the block pool: prefix matching, growth, release.

The manager is the only code that calls the pool for sequences: it hands a sequence the
cached blocks of its longest matching prefix, allocates blocks as its tokens grow, marks
its full computed blocks reusable, and frees everything it holds at once.
Pure Python, no torch. Not thread-safe.
"""

from __future__ import annotations

from typing import NamedTuple

from pdserve.engine.block_pool import Block, BlockPool
from pdserve.engine.hashing import ROOT_PARENT, hash_block
from pdserve.engine.sequence import Sequence


class PrefixMatch(NamedTuple):
    """Cached blocks covering a sequence's first ``num_tokens`` tokens."""

    blocks: list[Block]
    num_tokens: int


class KVCacheManager:
    """Maps sequences to blocks of one ``BlockPool``."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self._blocks: dict[str, list[Block]] = {}
        self._num_cached: dict[str, int] = {}  # leading blocks already in the prefix cache
        self.queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # of which found

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[int]:
        """Hashes of the sequence's first ``num_full_blocks`` blocks (memoized on it)."""
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else ROOT_PARENT
            hashes.append(hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs]))
        return hashes[:num_full_blocks]

    def match_prefix(self, seq: Sequence) -> PrefixMatch:
        """Longest run of cached blocks matching the sequence's tokens. At least one token
        is always left to compute (its logits are needed), so a fully cached sequence gives
        back its last block. None for a prefill that asked for prompt logprobs."""
        if not self.pool.enable_caching or (seq.prefill_only
                                             and seq.params.prompt_logprobs is not None):
            return PrefixMatch([], 0)  # prompt logprobs need every prompt token computed
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        blocks: list[Block] = []
        hashes = self._block_hashes(seq, max_blocks)
        for i, h in enumerate(hashes):
            parent = hashes[i - 1] if i else None
            block = self.pool.get_cached_block(h, parent, seq.token_ids[i * bs : (i + 1) * bs])
            if block is None:
                break
            blocks.append(block)
        return PrefixMatch(blocks, len(blocks) * bs)

    def record_lookup(self, num_queried: int, num_hit: int) -> None:
        self.queried_tokens += num_queried
        self.hit_tokens += num_hit

    def can_allocate(self, seq: Sequence, num_new_tokens: int, prefix: PrefixMatch) -> bool:
        return self._blocks_needed(seq, num_new_tokens, prefix) <= self._available(prefix)

    def shortfall(self, seq: Sequence, num_new_tokens: int, prefix: PrefixMatch) -> int:
        """How many blocks the pool is short of for ``allocate`` (0: it would succeed)."""
        return max(0, self._blocks_needed(seq, num_new_tokens, prefix) - self._available(prefix))

    def _blocks_needed(self, seq: Sequence, num_new_tokens: int, prefix: PrefixMatch) -> int:
        held = len(self._blocks.get(seq.request_id, ())) + len(prefix.blocks)
        computed = seq.num_computed_tokens + prefix.num_tokens
        return max(0, self.num_blocks_for(computed + num_new_tokens) - held)

    def _available(self, prefix: PrefixMatch) -> int:
        # Touching a free cached block takes it off the free list.
        return self.pool.num_free_blocks - sum(1 for b in prefix.blocks if b.ref_cnt == 0)

    def allocate(
        self, seq: Sequence, num_new_tokens: int, prefix: PrefixMatch | None = None
    ) -> bool:
        """Give ``seq`` the prefix blocks and enough new blocks to hold ``num_new_tokens``
        more tokens. All or nothing: False (and no change) if the pool is short."""
        prefix = prefix or PrefixMatch([], 0)
        needed = self._blocks_needed(seq, num_new_tokens, prefix)
        if needed > self._available(prefix):
            return False
        blocks = self._blocks.setdefault(seq.request_id, [])
        if prefix.blocks:
            self.pool.touch(prefix.blocks)
            blocks.extend(prefix.blocks)
            self._num_cached[seq.request_id] = len(prefix.blocks)
        if needed:
            blocks.extend(self.pool.allocate(needed))
        seq.block_ids = [b.block_id for b in blocks]
        return True

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Make the sequence's full, computed blocks reusable by later requests."""
        if not self.pool.enable_caching:
            return
        rid = seq.request_id
        blocks = self._blocks.get(rid)
        if not blocks:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(blocks))
        start = self._num_cached.get(rid, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(seq, num_full)
        for i in range(start, num_full):
            self.pool.cache_block(
                blocks[i], hashes[i], hashes[i - 1] if i else None,
                seq.token_ids[i * bs : (i + 1) * bs],
            )
        self._num_cached[rid] = num_full

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Give ``child`` (the same tokens as ``parent``, whose KV is computed) the parent's
        blocks up to the one holding the last token, shared (one more reference each), and
        a new block for that last one: returns ``(src, dst)`` block ids, whose KV the caller
        copies before either sequence writes again. None (and no change) if no block is
        free."""
        blocks = self._blocks.get(parent.request_id, [])
        last = (parent.num_tokens - 1) // self.block_size
        if last >= len(blocks) or self.pool.num_free_blocks < 1:
            return None
        shared = blocks[:last]
        self.pool.touch(shared)
        (new,) = self.pool.allocate(1)
        self._blocks[child.request_id] = [*shared, new]
        self._num_cached[child.request_id] = min(self._num_cached.get(parent.request_id, 0),
                                                 last)
        child.block_ids = [b.block_id for b in self._blocks[child.request_id]]
        return blocks[last].block_id, new.block_id

    def free(self, seq: Sequence) -> None:
        """Release every block the sequence holds; its tail blocks become evictable first."""
        blocks = self._blocks.pop(seq.request_id, None)
        self._num_cached.pop(seq.request_id, None)
        seq.block_ids = []
        if blocks:
            self.pool.free(reversed(blocks))

    def num_held(self, seq: Sequence) -> int:
        return len(self._blocks.get(seq.request_id, ()))

    def num_exclusive(self, seq: Sequence) -> int:
        """Blocks that freeing ``seq`` would return to the pool (held by it alone)."""
        return sum(1 for b in self._blocks.get(seq.request_id, ()) if b.ref_cnt == 1)
