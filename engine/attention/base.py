"""The attention backend contract: paged attention over one layer's KV blocks.

A step's batch is flattened: ``num_tokens`` new tokens, the first ``num_decodes`` of them
one decode token per sequence, then the prefill chunks back to back. Every backend

- writes each new token's key and value into its slot (``write_kv``) BEFORE attending, and
- computes causal attention of each new token over its sequence's whole context (cached
  blocks + the new tokens up to itself), reading K/V only through the block tables.

``kv_layer`` is one layer's view ``cache[:, layer]`` of the engine's KV tensor (see
``engine.config.KVCacheSpec``): shape ``[num_blocks, 2, block_size, num_kv_heads, head_dim]``,
not contiguous (the block stride spans all layers). Backends index it through its strides.
Metadata tensors live on the cache's device; a backend never allocates or frees blocks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Where the step's new tokens go and what each sequence may attend to.

    slot_block_ids, slot_offsets: ``[num_tokens]`` int64: the block and the offset in that
        block of each new token's K/V.
    num_decodes: the first ``num_decodes`` tokens are single-token decodes.
    decode_block_tables: ``[num_decodes, max_blocks]`` int32, padded with 0.
    decode_seq_lens: ``[num_decodes]`` int32: context length including the new token.
    prefill_query_start_loc: ``[num_prefills + 1]`` int32: offsets of each prefill chunk's
        tokens, relative to the first prefill token (index ``num_decodes`` of the batch).
    prefill_seq_lens: ``[num_prefills]`` int32: context length including the chunk; the
        chunk holds the LAST ``query_len`` tokens of that context.
    prefill_block_tables: ``[num_prefills, max_blocks]`` int32, padded with 0.
    prefill_query_lens_cpu / prefill_seq_lens_cpu / decode_seq_lens_cpu: the same lengths
        as Python ints, so that host-side loops need no device sync (the last is optional).
    backend_plan: what a backend derives from this metadata once per step (set by the first
        layer that needs it, reused by the others); ``None`` until then.
    """

    slot_block_ids: torch.Tensor
    slot_offsets: torch.Tensor
    num_decodes: int
    decode_block_tables: torch.Tensor
    decode_seq_lens: torch.Tensor
    prefill_query_start_loc: torch.Tensor
    prefill_seq_lens: torch.Tensor
    prefill_block_tables: torch.Tensor
    prefill_query_lens_cpu: list[int]
    prefill_seq_lens_cpu: list[int]
    max_decode_seq_len: int = 0
    decode_seq_lens_cpu: list[int] | None = None
    backend_plan: Any = None

    @property
    def num_prefills(self) -> int:
        return len(self.prefill_seq_lens_cpu)


class AttentionBackend(ABC):
    """Computes one layer's attention for a flattened batch. Stateless across steps.

    The runner calls ``plan_step`` once per step and hands what it returns to every layer's
    ``write_kv`` and ``attend`` as ``meta``: work that depends only on the batch (combined
    tables, tensors a kernel wants) is done once per step, not once per layer."""

    name: str = "abstract"

    def plan_step(self, meta: AttentionMetadata) -> Any:
        """What the layers of this step receive as ``meta``; by default ``meta`` itself."""
        return meta

    @abstractmethod
    def write_kv(
        self,
        kv_layer: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        """Store ``key``/``value`` (``[num_tokens, num_kv_heads, head_dim]``) in their slots."""

    def attend(
        self, query: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """``query`` ``[num_tokens, num_heads, head_dim]`` -> output of the same shape
        (contiguous): the batch's decodes, then its prefill chunks.

        ``num_heads`` is a multiple of ``num_kv_heads`` (GQA / MQA): query head ``h`` reads
        KV head ``h // (num_heads // num_kv_heads)``.
        """
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        n_dec = meta.num_decodes
        if n_dec:
            self.decode(query[:n_dec], kv_layer, meta, scale, out[:n_dec])
        if meta.num_prefills:
            self.prefill(query[n_dec:], kv_layer, meta, scale, out[n_dec:])
        return out

    @abstractmethod
    def decode(
        self,
        query: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        """Write into ``out`` the attention of the ``meta.num_decodes`` single-token
        decodes (``query`` holds just those rows)."""

    @abstractmethod
    def prefill(
        self,
        query: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        """Write into ``out`` the attention of the prefill chunks (``query`` holds just
        their rows, back to back in ``meta.prefill_query_start_loc`` order)."""
