"""The KV block pool: fixed-size blocks, reference counts, an LRU free list, prefix caching.

Every block is either referenced (``ref_cnt > 0``, owned by one or more sequences) or on
the free list. A free block may still hold a cached full block (it has a hash): it is
reused for its content by ``get_cached_block`` + ``touch`` until ``allocate`` needs the
space, which evicts the least recently freed block first. Caching a block emits a
``BlockStored`` event; evicting it emits ``BlockRemoved``.

Pure Python, no torch. Not thread-safe: one engine step loop owns it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pdserve.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


@dataclass(slots=True, eq=False)
class Block:
    """One block of ``block_size`` token slots in every layer's KV cache."""

    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    parent_hash: int | None = None
    token_ids: tuple[int, ...] | None = None
    prev_free: Block | None = None
    next_free: Block | None = None


class FreeBlockQueue:
    """Doubly linked list of free blocks, least recently freed first; O(1) remove."""

    def __init__(self, blocks: Iterable[Block]) -> None:
        self._head = Block(-1)
        self._tail = Block(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def append(self, block: Block) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self._len += 1

    def popleft(self) -> Block:
        block = self._head.next_free
        if block is None or block is self._tail:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: Block) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._len -= 1

    def block_ids(self) -> list[int]:
        """Free block ids in eviction order (for tests and debugging)."""
        out: list[int] = []
        node = self._head.next_free
        while node is not None and node is not self._tail:
            out.append(node.block_id)
            node = node.next_free
        return out


class NoFreeBlocksError(RuntimeError):
    """``allocate`` was asked for more blocks than are free."""


class BlockPool:
    """Owns ``num_blocks`` blocks of ``block_size`` tokens; hands them out and takes them back.

    Callers own the blocks they ``allocate`` or ``touch`` until they ``free`` them (once per
    reference). A block id is never handed out again while referenced.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free = FreeBlockQueue(self.blocks)
        self._cached: dict[int, Block] = {}
        self._events: list[KVEvent] = []

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now (unreferenced, cached or not)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one owner."""
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def free_block_ids(self) -> list[int]:
        return self._free.block_ids()

    def cached_hashes(self) -> list[int]:
        """Hashes of every cached block (a snapshot for the router's index)."""
        return list(self._cached)

    def get_cached_block(
        self, block_hash: int, parent_hash: int | None, token_ids: Sequence[int]
    ) -> Block | None:
        """The cached block with this hash, if its parent and tokens match exactly."""
        block = self._cached.get(block_hash)
        if block is None or block.parent_hash != parent_hash:
            return None
        if block.token_ids != tuple(token_ids):
            return None
        return block

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take one more reference to each (cached) block, pulling it off the free list."""
        for block in blocks:
            if block.ref_cnt == 0:
                self._free.remove(block)
            block.ref_cnt += 1

    def allocate(self, n: int) -> list[Block]:
        """Hand out ``n`` blocks with ``ref_cnt == 1``, evicting cached ones LRU-first."""
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block = self._free.popleft()
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference to each block, in the given order: blocks that reach zero go
        to the tail of the free list, so the ones passed first are evicted first."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed more often than taken")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free.append(block)

    def cache_block(
        self, block: Block, block_hash: int, parent_hash: int | None, token_ids: Sequence[int]
    ) -> bool:
        """Mark a referenced, now full and computed block reusable under ``block_hash``.

        Returns False (and leaves the block uncached) if caching is off, or another block
        already holds that hash.
        """
        if not self.enable_caching or block.block_hash is not None:
            return False
        if block_hash in self._cached:
            return False
        block.block_hash = block_hash
        block.parent_hash = parent_hash
        block.token_ids = tuple(token_ids)
        self._cached[block_hash] = block
        self._events.append(BlockStored((block_hash,), parent_hash, self.block_size))
        return True

    def _evict(self, block: Block) -> None:
        assert block.block_hash is not None
        del self._cached[block.block_hash]
        self._events.append(BlockRemoved((block.block_hash,)))
        block.block_hash = block.parent_hash = None
        block.token_ids = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; refused (False) while any block is referenced."""
        if self.num_used_blocks:
            return False
        for block in self._cached.values():
            block.block_hash = block.parent_hash = None
            block.token_ids = None
        self._cached.clear()
        self._events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVEvent]:
        """Events since the last call, oldest first; consecutive stores and removals are
        merged into one event each."""
        events, self._events = self._events, []
        merged: list[KVEvent] = []
        for ev in events:
            last = merged[-1] if merged else None
            if (
                isinstance(ev, BlockStored)
                and isinstance(last, BlockStored)
                and ev.parent_hash == last.block_hashes[-1]
            ):
                merged[-1] = BlockStored(last.block_hashes + ev.block_hashes, last.parent_hash,
                                         last.block_size)
            elif isinstance(ev, BlockRemoved) and isinstance(last, BlockRemoved):
                merged[-1] = BlockRemoved(last.block_hashes + ev.block_hashes)
            else:
                merged.append(ev)
        return merged
