"""The CPU attention backend: C++ kernels that read the paged KV cache in place.

One call per layer attends the whole step (decodes and prefill chunks alike: a decode is a
one-token chunk) straight from the blocks, in the cache's dtype, with float32 softmax and
accumulation; nothing is gathered or converted per step (see
``engine/csrc/paged_attention.cpp``). The functional ops of
``pdserve.engine.attention.torch_backend`` stay the reference these kernels are tested
against, and the torch backend remains the path on machines where the kernels cannot be
built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata
from pdserve.engine.cpu_kernels import available


@dataclass(frozen=True, slots=True)
class CpuStep:
    """A step's batch as the kernels take it (tensors only, so that a compiled layer stack
    can take it as input): the new tokens' slots, and every sequence as one entry,
    decodes first (one query each), then the prefill chunks."""

    slot_block_ids: torch.Tensor  # [num_tokens] int64
    slot_offsets: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32

    @classmethod
    def build(cls, meta: AttentionMetadata) -> CpuStep:
        n_dec, n_pre = meta.num_decodes, meta.num_prefills
        slots = (meta.slot_block_ids, meta.slot_offsets)
        if n_pre == 0:
            return cls(*slots, torch.arange(n_dec + 1, dtype=torch.int32),
                       meta.decode_seq_lens, meta.decode_block_tables)
        if n_dec == 0:
            return cls(*slots, meta.prefill_query_start_loc, meta.prefill_seq_lens,
                       meta.prefill_block_tables)
        dec, pre = meta.decode_block_tables, meta.prefill_block_tables
        tables = torch.zeros((n_dec + n_pre, max(dec.shape[1], pre.shape[1])),
                             dtype=torch.int32)
        tables[:n_dec, : dec.shape[1]] = dec
        tables[n_dec:, : pre.shape[1]] = pre
        return cls(
            *slots,
            torch.cat((torch.arange(n_dec + 1, dtype=torch.int32),
                       meta.prefill_query_start_loc[1:] + n_dec)),
            torch.cat((meta.decode_seq_lens, meta.prefill_seq_lens)),
            tables,
        )


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, without a dispatch when ``x`` already has it (the usual case: the
    cache holds the model's dtype); each layer of a step passes here three times."""
    return x if x.dtype == dtype else x.to(dtype)


def _step(meta: AttentionMetadata | CpuStep) -> CpuStep:
    if isinstance(meta, CpuStep):
        return meta
    if not isinstance(meta.backend_plan, CpuStep):  # a caller that skipped plan_step
        meta.backend_plan = CpuStep.build(meta)
    return meta.backend_plan


class CpuAttentionBackend(AttentionBackend):
    """Paged attention through ``torch.ops.pdserve_cpu`` (CPU tensors only). Layers get a
    ``CpuStep`` from ``plan_step`` (plain ``AttentionMetadata`` works too).

    Construct it only where ``cpu_kernels.available()`` is True (``get_attention_backend``
    checks); otherwise ``RuntimeError``."""

    name = "cpu"

    def __init__(self) -> None:
        if not available():
            raise RuntimeError(
                "the CPU attention kernels are not available on this machine (see the "
                "warning above); use the 'torch' attention backend"
            )

    def plan_step(self, meta: AttentionMetadata) -> CpuStep:
        return CpuStep.build(meta)

    def write_kv(
        self,
        kv_layer: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        meta: AttentionMetadata | CpuStep,
    ) -> None:
        step = _step(meta)
        torch.ops.pdserve_cpu.write_kv(kv_layer, _as(key, kv_layer.dtype),
                                       _as(value, kv_layer.dtype), step.slot_block_ids,
                                       step.slot_offsets)

    def attend(
        self,
        query: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata | CpuStep,
        scale: float,
    ) -> torch.Tensor:
        step = _step(meta)
        out = torch.empty(query.shape, dtype=kv_layer.dtype, device=query.device)
        torch.ops.pdserve_cpu.paged_attention(out, _as(query, kv_layer.dtype), kv_layer,
                                              step.query_start_loc, step.seq_lens,
                                              step.block_tables, scale)
        return out if out.dtype == query.dtype else out.to(query.dtype)

    def decode(
        self,
        query: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        result = torch.empty(query.shape, dtype=kv_layer.dtype)
        torch.ops.pdserve_cpu.paged_attention(
            result, query.to(kv_layer.dtype), kv_layer,
            torch.arange(meta.num_decodes + 1, dtype=torch.int32), meta.decode_seq_lens,
            meta.decode_block_tables, scale)
        out.copy_(result)

    def prefill(
        self,
        query: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        result = torch.empty(query.shape, dtype=kv_layer.dtype)
        torch.ops.pdserve_cpu.paged_attention(
            result, query.to(kv_layer.dtype), kv_layer, meta.prefill_query_start_loc,
            meta.prefill_seq_lens, meta.prefill_block_tables, scale)
        out.copy_(result)
