"""How a connector's KV cache tensor maps to transferable blocks, and what peers compare.

Shared by every backend; imports no transport.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pdserve.engine.config import KVCacheSpec, normalize_dtype
from pdserve.kvtransfer.base import PROTOCOL_VERSION, PeerInfo, TransferTarget


def peer_info(spec: KVCacheSpec, model: str) -> PeerInfo:
    """The handshake identity of a cache laid out as ``spec`` holding ``model``'s KV."""
    return PeerInfo(
        protocol_version=PROTOCOL_VERSION,
        model=model,
        dtype=normalize_dtype(spec.dtype),
        block_size=spec.block_size,
        layout=spec.layout,
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
    )


def check_kv_cache(kv_cache: torch.Tensor, spec: KVCacheSpec) -> int:
    """Validate ``kv_cache`` against ``spec`` and return its number of blocks."""
    if kv_cache.dim() != 6 or tuple(kv_cache.shape) != spec.shape(kv_cache.shape[0]):
        raise ValueError(
            f"KV cache shape {tuple(kv_cache.shape)} does not match the spec "
            f"{spec.shape(kv_cache.shape[0]) if kv_cache.dim() else '?'} ({spec.layout})"
        )
    if str(kv_cache.dtype).removeprefix("torch.") != normalize_dtype(spec.dtype):
        raise ValueError(f"KV cache dtype {kv_cache.dtype} does not match spec {spec.dtype}")
    if not kv_cache.is_contiguous():
        raise ValueError("KV cache tensor must be contiguous (one region per block)")
    return int(kv_cache.shape[0])


def checked_block_ids(block_ids: Sequence[int], num_blocks: int, what: str) -> np.ndarray:
    """``block_ids`` as int32 indices, each checked to lie in ``[0, num_blocks)``."""
    ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
    if len(ids) and (ids.min() < 0 or ids.max() >= num_blocks):
        raise ValueError(f"{what} block ids must be in [0, {num_blocks}), got {ids.tolist()}")
    return ids.astype(np.int32)


def checked_write(
    backend: str,
    target: TransferTarget,
    src_block_ids: Sequence[int],
    dst_block_ids: Sequence[int],
    num_blocks: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The arguments of a ``write_blocks`` call, checked: the target is of ``backend``, the
    source ids lie in our ``num_blocks``, the destination ids in the target's, and they pair
    up one to one. ``ValueError`` otherwise."""
    if target.backend != backend:
        raise ValueError(f"target backend {target.backend!r} is not {backend!r}")
    src = checked_block_ids(src_block_ids, num_blocks, "source")
    dst = checked_block_ids(dst_block_ids, target.num_blocks, "destination")
    if len(src) != len(dst):
        raise ValueError(f"{len(src)} source blocks but {len(dst)} destination blocks")
    return src, dst


def _head_view(kv_cache: torch.Tensor, heads: slice) -> torch.Tensor:
    return kv_cache if heads == slice(0, kv_cache.shape[4]) else kv_cache[:, :, :, :, heads]


def _byte_rows(t: torch.Tensor) -> np.ndarray:
    """A numpy view of ``t`` (CPU, unit stride in its last dimension) as bytes."""
    return t.view(torch.uint8).numpy()


# On CPU, blocks are copied row by row with numpy (one memcpy-like copy per block, on the
# calling thread, without the GIL): torch's indexed copies run on the intra-op thread pool,
# which the engine's own thread uses too, and degrade badly when the two contend.


def gather_blocks(
    kv_cache: torch.Tensor, block_ids: np.ndarray, heads: slice, out: torch.Tensor
) -> torch.Tensor:
    """Copy KV heads ``heads`` (a slice of the cache's own head axis) of blocks ``block_ids``,
    in that order, into ``out`` (contiguous, shaped as ``frame_shape`` says) and return it:
    what one transfer moves."""
    source = _head_view(kv_cache, heads)
    if kv_cache.device.type == "cpu":
        src, dst = _byte_rows(source), _byte_rows(out)
        for i, b in enumerate(block_ids.tolist()):
            dst[i] = src[b]
        return out
    index = torch.from_numpy(block_ids.astype(np.int64)).to(kv_cache.device)
    return torch.index_select(source, 0, index, out=out)


def scatter_blocks(
    kv_cache: torch.Tensor, block_ids: np.ndarray, heads: slice, data: torch.Tensor
) -> None:
    """Write ``data`` (as made by ``gather_blocks``) into heads ``heads`` of ``block_ids``."""
    target = _head_view(kv_cache, heads)
    if kv_cache.device.type == "cpu":
        dst, src = _byte_rows(target), _byte_rows(data)
        for i, b in enumerate(block_ids.tolist()):
            dst[b] = src[i]
        return
    index = torch.from_numpy(block_ids.astype(np.int64)).to(kv_cache.device)
    target.index_copy_(0, index, data)


def frame_shape(spec: KVCacheSpec, num_blocks: int, num_heads: int) -> tuple[int, ...]:
    """Shape of ``num_blocks`` blocks cut to ``num_heads`` KV heads (see ``gather_blocks``)."""
    return (num_blocks, spec.num_layers, 2, spec.block_size, num_heads, spec.head_dim)


def frame_buffer(
    scratch: torch.Tensor | None, like: torch.Tensor, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A contiguous tensor of ``shape`` (dtype and device of ``like``) carved from ``scratch``,
    which is replaced by a larger one when too small: (the view, the scratch to keep). Reusing
    one buffer spares an allocation and its page faults per transfer."""
    numel = 1
    for n in shape:
        numel *= n
    if scratch is None or scratch.numel() < numel:
        scratch = torch.empty(numel, dtype=like.dtype, device=like.device)
    return scratch[:numel].view(shape), scratch
