"""Block hash chain shared by the router and every worker.

A full block of ``block_size`` tokens is identified by the hash of its token ids chained to
the hash of the block before it, so two sequences share a block id only if they share the
whole prefix up to and including that block. The key is FIXED (not per process, not
PYTHONHASHSEED): the router computes the same ids as the workers' block pools, and ids stay
stable across restarts and machines.

Pure Python: no torch, no I/O.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

HASH_KEY = b"pdserve-kv-block-v1"
"""The fixed key of the chain. Changing it invalidates every prefix index: bump the suffix."""

ROOT_PARENT = 0
"""Parent hash used for the first block of a sequence."""


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Hash of one block: its token ids chained to ``parent_hash`` (ROOT_PARENT for block 0).

    Returns a non-negative 63-bit int (fits a signed int64 in protobuf and numpy).
    """
    h = hashlib.blake2b(key=HASH_KEY, digest_size=8)
    h.update(parent_hash.to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def hash_blocks(
    token_ids: Sequence[int], block_size: int, parent_hash: int = ROOT_PARENT
) -> list[int]:
    """Hashes of every FULL block of ``token_ids`` (a trailing partial block has none)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block(parent_hash, token_ids[start : start + block_size])
        hashes.append(parent_hash)
    return hashes
