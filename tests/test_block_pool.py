"""Block pool and KV cache manager: exact ids, ref counts, eviction order, events."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.engine.block_pool import BlockPool, NoFreeBlocksError
from pdserve.engine.hashing import ROOT_PARENT, hash_block, hash_blocks
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.sequence import Sequence

REPO = Path(__file__).resolve().parents[1]


def make_seq(rid: str, tokens: list[int], order: int = 0) -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(max_tokens=4), 0.0, order)


def test_hash_chain_is_fixed_and_prefix_dependent() -> None:
    # The same ids on every process and run: the router relies on it.
    # Golden value: changing the scheme must be deliberate (it invalidates every index).
    assert hash_block(ROOT_PARENT, [1, 2, 3, 4]) == 224768140811789198
    code = "from engine.hashing import hash_block; print(hash_block(0, [1, 2, 3, 4]))"
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": seed}, cwd=REPO,
        ).stdout
        assert int(out) == 224768140811789198
    a = hash_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    b = hash_blocks([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and len(b) == 2  # the partial trailing block has no hash
    assert a[1] != b[1]  # same tokens in block 1, different parent
    assert all(0 <= h < 2**63 for h in a + b)


def test_allocate_hands_out_lowest_ids_first_and_free_returns_to_tail() -> None:
    pool = BlockPool(num_blocks=6, block_size=4)
    blocks = pool.allocate(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 3 and pool.num_used_blocks == 3
    pool.free(reversed(blocks))
    assert pool.free_block_ids() == [3, 4, 5, 2, 1, 0]
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(7)
    with pytest.raises(ValueError, match="freed more often"):
        pool.free([blocks[0]])


def test_prefix_hit_shares_blocks_and_counts_references() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    kv = KVCacheManager(pool)
    a = make_seq("a", list(range(10)))  # 2 full blocks + 2 tokens
    assert kv.allocate(a, 10)
    assert a.block_ids == [0, 1, 2]
    a.num_computed_tokens = 10
    kv.cache_computed_blocks(a)
    assert pool.num_cached_blocks == 2
    hashes = hash_blocks(list(range(10)), 4)
    assert pool.take_events() == [BlockStored(tuple(hashes), None, 4)]

    b = make_seq("b", list(range(8)) + [99, 98, 97], order=1)
    prefix = kv.match_prefix(b)
    assert [blk.block_id for blk in prefix.blocks] == [0, 1] and prefix.num_tokens == 8
    assert kv.allocate(b, 3, prefix)
    assert b.block_ids == [0, 1, 3]
    assert [pool.blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]

    kv.free(a)
    assert [pool.blocks[i].ref_cnt for i in range(4)] == [1, 1, 0, 1]
    kv.free(b)
    assert pool.num_used_blocks == 0
    # Tail blocks first: b's [3, 1, 0] after a's [2] (a freed its blocks in reverse, but 0
    # and 1 were still referenced by b then).
    assert pool.free_block_ids() == [4, 5, 6, 7, 2, 3, 1, 0]


def test_fully_cached_prompt_recomputes_its_last_block() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    kv = KVCacheManager(pool)
    a = make_seq("a", list(range(8)))
    assert kv.allocate(a, 8)
    a.num_computed_tokens = 8
    kv.cache_computed_blocks(a)
    kv.free(a)
    b = make_seq("b", list(range(8)), order=1)
    prefix = kv.match_prefix(b)
    assert prefix.num_tokens == 4  # the last token's logits are needed


def test_eviction_is_lru_and_emits_removed_events() -> None:
    pool = BlockPool(num_blocks=6, block_size=2)
    kv = KVCacheManager(pool)
    seqs = []
    for i, tokens in enumerate(([1, 2], [3, 4], [5, 6])):
        s = make_seq(f"s{i}", tokens + [0], order=i)
        assert kv.allocate(s, 3)
        s.num_computed_tokens = 3
        kv.cache_computed_blocks(s)
        seqs.append(s)
    assert [s.block_ids for s in seqs] == [[0, 1], [2, 3], [4, 5]]
    for s in seqs:
        kv.free(s)
    assert len(pool.take_events()) == 3  # one BlockStored per sequence
    # Least recently freed first; within a sequence its tail block first.
    assert pool.free_block_ids() == [1, 0, 3, 2, 5, 4]
    taken = pool.allocate(3)
    assert [b.block_id for b in taken] == [1, 0, 3]
    assert pool.take_events() == [BlockRemoved((hash_block(ROOT_PARENT, [1, 2]),))]
    assert kv.match_prefix(make_seq("x", [1, 2, 9], order=7)).num_tokens == 0
    assert kv.match_prefix(make_seq("y", [3, 4, 9], order=8)).num_tokens == 2
    assert kv.match_prefix(make_seq("z", [5, 6, 9], order=9)).num_tokens == 2


def test_events_merge_and_reset() -> None:
    pool = BlockPool(num_blocks=4, block_size=2)
    kv = KVCacheManager(pool)
    s = make_seq("s", [1, 2, 3, 4, 5])
    assert kv.allocate(s, 5)
    s.num_computed_tokens = 5
    kv.cache_computed_blocks(s)
    h = hash_blocks([1, 2, 3, 4], 2)
    assert pool.take_events() == [BlockStored((h[0], h[1]), None, 2)]
    assert pool.take_events() == []
    assert not pool.reset_prefix_cache()  # refused while blocks are referenced
    kv.free(s)
    assert pool.reset_prefix_cache()
    assert pool.take_events() == [AllBlocksCleared()]
    assert pool.num_cached_blocks == 0


def test_hash_hit_is_confirmed_by_tokens() -> None:
    pool = BlockPool(num_blocks=4, block_size=2)
    block = pool.allocate(1)[0]
    h = hash_block(ROOT_PARENT, [1, 2])
    assert pool.cache_block(block, h, None, [1, 2])
    assert pool.get_cached_block(h, None, [1, 2]) is block
    assert pool.get_cached_block(h, None, [1, 3]) is None  # a (forged) collision misses
    assert pool.get_cached_block(h, 123, [1, 2]) is None


def test_allocation_is_all_or_nothing() -> None:
    pool = BlockPool(num_blocks=3, block_size=4)
    kv = KVCacheManager(pool)
    s = make_seq("s", list(range(20)))
    assert not kv.allocate(s, 20)
    assert pool.num_used_blocks == 0 and s.block_ids == []
    assert kv.allocate(s, 12)
    assert s.block_ids == [0, 1, 2]
