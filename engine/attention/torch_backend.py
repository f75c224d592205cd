"""Paged attention in plain torch: the reference for every other backend, and the CPU path.

The functional ops below are what kernels in other backends must match, argument for
argument (see ``pdserve.engine.attention.base`` for shapes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata
from pdserve.engine.attention.cascade import (
    attention_with_lse,
    cascade_decode_group,
    length_buckets,
    plan_cascade,
)


def write_kv_slots(
    kv_layer: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_block_ids: torch.Tensor,
    slot_offsets: torch.Tensor,
) -> None:
    """kv_layer[b, 0, o] = key[i]; kv_layer[b, 1, o] = value[i] for each token i."""
    kv_layer[slot_block_ids, 0, slot_offsets] = key.to(kv_layer.dtype)
    kv_layer[slot_block_ids, 1, slot_offsets] = value.to(kv_layer.dtype)


def gather_context(
    kv_layer: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[seq_len, num_kv_heads, head_dim]`` of one sequence."""
    block_size = kv_layer.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    table = block_table[:num_blocks].long()
    # Index keys and values separately: each gather is one contiguous copy, and the
    # flatten after it is a view.
    key = kv_layer[:, 0][table].flatten(0, 1)[:seq_len]
    value = kv_layer[:, 1][table].flatten(0, 1)[:seq_len]
    return key, value


# A decode bucket holds sequences whose context is at least this share of the bucket's
# longest: padding never more than doubles the gathered keys, and a batch of similar
# lengths stays one bucket.
DECODE_BUCKET_RATIO = 0.75


def _decode_group(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
) -> torch.Tensor:
    batch = query.shape[0]
    block_size = kv_layer.shape[2]
    max_blocks = (max_seq_len + block_size - 1) // block_size
    tokens = max_blocks * block_size
    table = block_tables[:, :max_blocks].long()
    heads, head_dim = kv_layer.shape[3], kv_layer.shape[4]
    key = kv_layer[:, 0][table].view(batch, tokens, heads, head_dim).transpose(1, 2)
    value = kv_layer[:, 1][table].view(batch, tokens, heads, head_dim).transpose(1, 2)
    positions = torch.arange(tokens, device=query.device)
    mask = (positions[None, :] < seq_lens[:, None].to(positions.dtype))[:, None, None, :]
    if key.dtype != torch.float32 and key.device.type == "cpu":
        # torch's CPU SDPA kernel runs a one-token bf16/fp16 query ~10x slower than fp32;
        # plain float32 products are faster and round nothing before the softmax.
        per_kv = query.shape[1] // heads
        out, _ = attention_with_lse(
            query.view(batch, heads, per_kv, head_dim), key, value, scale, mask
        )
        return out.view(query.shape).to(query.dtype)
    out = F.scaled_dot_product_attention(
        query.unsqueeze(2).to(key.dtype),
        key,
        value,
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(2).to(query.dtype)


def paged_decode_attention(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
    seq_lens_cpu: list[int] | None = None,
) -> torch.Tensor:
    """One query token per sequence: ``query`` [B, Hq, D] over each sequence's first
    ``seq_lens[b]`` cached tokens -> [B, Hq, D].

    Sequences are gathered in buckets of similar context length, so a batch mixing short
    and long contexts does not pad every sequence to the longest."""
    batch = query.shape[0]
    if batch == 0:
        return query.new_empty(query.shape)
    if seq_lens_cpu is None:
        seq_lens_cpu = seq_lens.tolist()
    if max_seq_len is None:
        max_seq_len = max(seq_lens_cpu)
    if min(seq_lens_cpu) >= DECODE_BUCKET_RATIO * max_seq_len:
        return _decode_group(query, kv_layer, block_tables, seq_lens, scale, max_seq_len)
    out = torch.empty_like(query)
    for bucket in length_buckets(seq_lens_cpu, list(range(batch)), DECODE_BUCKET_RATIO):
        rows = torch.tensor(bucket, device=query.device)
        out[rows] = _decode_group(
            query[rows], kv_layer, block_tables[rows], seq_lens[rows], scale,
            seq_lens_cpu[bucket[0]],
        )
    return out


def paged_prefill_attention(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    query_lens_cpu: list[int] | None = None,
    seq_lens_cpu: list[int] | None = None,
) -> torch.Tensor:
    """Chunks of new tokens over cached context: sequence ``i``'s queries
    ``query[query_start_loc[i]:query_start_loc[i+1]]`` are the LAST tokens of its
    ``seq_lens[i]``-token context, attending causally -> same shape as ``query``."""
    if query_lens_cpu is None:
        query_lens_cpu = (query_start_loc[1:] - query_start_loc[:-1]).tolist()
    if seq_lens_cpu is None:
        seq_lens_cpu = seq_lens.tolist()
    out = torch.empty_like(query)
    start = 0
    for i, (q_len, seq_len) in enumerate(zip(query_lens_cpu, seq_lens_cpu, strict=True)):
        key, value = gather_context(kv_layer, block_tables[i], seq_len)
        q = query[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, Hq, q, D]
        k = key.transpose(0, 1).unsqueeze(0)
        v = value.transpose(0, 1).unsqueeze(0)
        if q_len == seq_len:
            o = F.scaled_dot_product_attention(
                q.to(k.dtype), k, v, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            # Query j sits at absolute position seq_len - q_len + j.
            rows = torch.arange(q_len, device=query.device)[:, None] + (seq_len - q_len)
            cols = torch.arange(seq_len, device=query.device)[None, :]
            o = F.scaled_dot_product_attention(
                q.to(k.dtype), k, v, attn_mask=cols <= rows, scale=scale, enable_gqa=True
            )
        out[start : start + q_len] = o[0].transpose(0, 1).to(query.dtype)
        start += q_len
    return out


class TorchAttentionBackend(AttentionBackend):
    """Reference backend: gathers blocks with torch indexing and calls SDPA.

    ``cascade`` (default on) attends shared prefixes once per decode step on the CPU; off,
    every decode goes through ``paged_decode_attention``."""

    name = "torch"

    def __init__(self, cascade: bool = True) -> None:
        self.cascade = cascade

    def write_kv(
        self,
        kv_layer: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        write_kv_slots(kv_layer, key, value, meta.slot_block_ids, meta.slot_offsets)

    def decode(
        self,
        query: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        """On the CPU, groups of sequences sharing a long prefix are attended in cascade
        (``pdserve.engine.attention.cascade``); everything else through the reference."""
        lens = meta.decode_seq_lens_cpu
        if lens is None:
            lens = meta.decode_seq_lens.tolist()
        tables = meta.decode_block_tables
        if tables.device.type == "cpu" and self.cascade:
            if meta.backend_plan is None:  # the same for every layer of the step
                meta.backend_plan = plan_cascade(
                    tables, lens, kv_layer.shape[2], DECODE_BUCKET_RATIO
                )
            plans, rest = meta.backend_plan
        else:
            plans, rest = [], list(range(len(lens)))
        for plan in plans:
            out[plan.rows] = cascade_decode_group(query[plan.rows], kv_layer, plan, scale)
        if len(rest) == len(lens):
            out[:] = paged_decode_attention(
                query, kv_layer, tables, meta.decode_seq_lens, scale,
                meta.max_decode_seq_len or None, lens,
            )
        elif rest:
            rows = torch.tensor(rest)
            out[rows] = paged_decode_attention(
                query[rows], kv_layer, tables[rows], meta.decode_seq_lens[rows], scale,
                None, [lens[r] for r in rest],
            )

    def prefill(
        self,
        query: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        out[:] = paged_prefill_attention(
            query,
            kv_layer,
            meta.prefill_query_start_loc,
            meta.prefill_seq_lens,
            meta.prefill_block_tables,
            scale,
            meta.prefill_query_lens_cpu,
            meta.prefill_seq_lens_cpu,
        )
