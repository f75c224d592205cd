"""Paged attention on vLLM's FlashAttention build (``vllm_flash_attn``): CUDA, fp16/bf16.

``flash_attn_varlen_func`` reads the paged cache through ``block_table`` with per-sequence
context lengths (``seqused_k``); its causal mask is aligned to the end of the context, which
is exactly our chunk semantics (a chunk holds the LAST ``query_len`` tokens). It accepts the
strided per-layer view, as long as the head dimension is contiguous. New K/V are written
with the reference ``write_kv_slots``.
"""

from __future__ import annotations

import torch

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata
from pdserve.engine.attention.torch_backend import write_kv_slots


class FlashAttnBackend(AttentionBackend):
    """FlashAttention-2 over the paged cache; raises ``ImportError`` at construction when
    ``vllm_flash_attn`` does not import, ``ValueError`` on a cache it cannot read."""

    name = "flash_attn"

    def __init__(self) -> None:
        try:
            from vllm_flash_attn import flash_attn_varlen_func
        except ImportError as exc:
            raise ImportError(
                "the 'flash_attn' attention backend needs vLLM's FlashAttention build "
                "(pip install vllm-flash-attn, matching your torch); use 'triton' or 'torch'"
            ) from exc
        self._varlen = flash_attn_varlen_func

    def write_kv(
        self,
        kv_layer: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        write_kv_slots(kv_layer, key, value, meta.slot_block_ids, meta.slot_offsets)

    @staticmethod
    def _caches(kv_layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        block_size = kv_layer.shape[2]
        if kv_layer.dtype not in (torch.float16, torch.bfloat16) or block_size % 16:
            raise ValueError(
                f"flash_attn needs an fp16/bf16 cache with block_size a multiple of 16, got "
                f"{kv_layer.dtype} and block_size {block_size}; use the 'triton' backend"
            )
        return kv_layer[:, 0], kv_layer[:, 1]  # [blocks, bs, heads, dim]

    def decode(
        self,
        query: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        key_cache, value_cache = self._caches(kv_layer)
        n_dec = meta.num_decodes
        max_len = meta.max_decode_seq_len or int(meta.decode_seq_lens.max())
        out[:] = self._run(
            query,
            key_cache,
            value_cache,
            scale,
            torch.arange(n_dec + 1, dtype=torch.int32, device=query.device),
            1,
            meta.decode_seq_lens,
            max_len,
            meta.decode_block_tables,
        )

    def prefill(
        self,
        query: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        key_cache, value_cache = self._caches(kv_layer)
        out[:] = self._run(
            query,
            key_cache,
            value_cache,
            scale,
            meta.prefill_query_start_loc,
            max(meta.prefill_query_lens_cpu),
            meta.prefill_seq_lens,
            max(meta.prefill_seq_lens_cpu),
            meta.prefill_block_tables,
        )

    def _run(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        scale: float,
        cu_seqlens_q: torch.Tensor,
        max_seqlen_q: int,
        seq_lens: torch.Tensor,
        max_seqlen_k: int,
        block_table: torch.Tensor,
    ) -> torch.Tensor:
        return self._varlen(
            q=query,
            k=key_cache,
            v=value_cache,
            cu_seqlens_q=cu_seqlens_q,
            max_seqlen_q=max_seqlen_q,
            seqused_k=seq_lens,
            max_seqlen_k=max_seqlen_k,
            softmax_scale=scale,
            causal=True,
            block_table=block_table,
        )
