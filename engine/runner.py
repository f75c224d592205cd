"""Runs one scheduled batch: builds the flattened input tensors, runs the model, returns the
logits of every sequence whose next token is due.

The runner owns the KV cache tensor (see ``pdserve.engine.config.KVCacheSpec`` for its layout). It
reads sequences but never changes them: the engine applies the results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pdserve.engine import huge_pages as pages
from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata
from pdserve.engine.config import KVCacheSpec
from pdserve.engine.cuda_graphs import DecodeGraphRunner, capture_decode_graphs, graphs_supported
from pdserve.engine.sampler import compares_only
from pdserve.engine.scheduler import ScheduledBatch
from pdserve.engine.sequence import Sequence
from pdserve.engine.thread_pinning import PoolPinning

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class RunResult:
    """Logits ``[len(sampled), vocab]`` for the sequences whose token is due (float32, or
    the model's dtype when every one of them only compares its logits: ``compares_only``);
    ``prompt_logits``: for prefill chunks of sequences that asked for prompt logprobs,
    (sequence, first position of the chunk, the chunk's logits ``[n, vocab]``)."""

    sampled: list[Sequence]
    logits: torch.Tensor
    prompt_logits: list[tuple[Sequence, int, torch.Tensor]] = field(default_factory=list)


def _padded(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32,
                        device=device)


class ModelRunner:
    """Owns the model and the KV cache of one engine. Not thread-safe.

    ``kv_cache`` holds exactly the pool's ``num_blocks`` blocks. With ``cuda_graphs`` on a
    CUDA device and the Triton backend, decode-only batches of up to ``max_num_seqs``
    (at most 256) sequences replay CUDA graphs captured here (see ``pdserve.engine.cuda_graphs``);
    their padding rows write one extra block allocated just past ``kv_cache``, which no
    sequence ever owns. Elsewhere ``cuda_graphs`` is ignored. ``max_model_len`` (default: the
    model's and the pool's limit) bounds the contexts the graphs are captured for.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        spec: KVCacheSpec,
        num_blocks: int,
        device: torch.device,
        backend: AttentionBackend,
        *,
        cuda_graphs: bool = True,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        huge_pages: bool = False,
    ) -> None:
        self.model = model
        self.spec = spec
        self.device = device
        self.backend = backend
        use_graphs = cuda_graphs and graphs_supported(device, backend)
        storage = pages.zeros(
            spec.shape(num_blocks + int(use_graphs)), TORCH_DTYPES[spec.dtype], device,
            huge=huge_pages,
        )
        self.kv_cache = storage[:num_blocks] if use_graphs else storage
        self.pinning = PoolPinning(device)
        self.graphs: DecodeGraphRunner | None = None
        if use_graphs:
            self.graphs = capture_decode_graphs(
                model, backend, storage, spec.block_size, max_num_seqs, max_model_len
            )

    def build_inputs(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[Sequence]]:
        """input ids, positions, attention metadata, rows of the hidden states to sample
        from, and the sequences those rows belong to."""
        bs = self.spec.block_size
        ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []

        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        for seq in batch.decodes:
            pos = seq.num_computed_tokens
            ids.append(seq.token_ids[pos])
            positions.append(pos)
            slot_blocks.append(seq.block_ids[pos // bs])
            slot_offsets.append(pos % bs)
            decode_tables.append(seq.block_ids)
            decode_lens.append(pos + 1)
            sample_rows.append(len(ids) - 1)
            sampled.append(seq)

        prefill_tables: list[list[int]] = []
        q_lens: list[int] = []
        seq_lens: list[int] = []
        for seq, n in batch.prefills:
            start = seq.num_computed_tokens
            end = start + n
            ids.extend(seq.token_ids[start:end])
            rng = range(start, end)
            positions.extend(rng)
            table = seq.block_ids
            slot_blocks.extend(table[p // bs] for p in rng)
            slot_offsets.extend(p % bs for p in rng)
            prefill_tables.append(table)
            q_lens.append(n)
            seq_lens.append(end)
            if end == seq.num_tokens:
                sample_rows.append(len(ids) - 1)
                sampled.append(seq)

        dev = self.device
        starts = [0]
        for q in q_lens:
            starts.append(starts[-1] + q)
        meta = AttentionMetadata(
            slot_block_ids=torch.tensor(slot_blocks, dtype=torch.int64, device=dev),
            slot_offsets=torch.tensor(slot_offsets, dtype=torch.int64, device=dev),
            num_decodes=len(batch.decodes),
            decode_block_tables=_padded(decode_tables, dev),
            decode_seq_lens=torch.tensor(decode_lens, dtype=torch.int32, device=dev),
            prefill_query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            prefill_seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            prefill_block_tables=_padded(prefill_tables, dev),
            prefill_query_lens_cpu=q_lens,
            prefill_seq_lens_cpu=seq_lens,
            max_decode_seq_len=max(decode_lens, default=0),
            decode_seq_lens_cpu=decode_lens,
        )
        input_ids = torch.tensor(ids, dtype=torch.int64, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        return input_ids, pos_t, meta, sample_rows, sampled

    @torch.inference_mode()
    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's KV (every layer) into another (a forked sequence's own copy)."""
        self.kv_cache[dst].copy_(self.kv_cache[src])

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> RunResult:
        with self.pinning.bound():
            return self._execute(batch)

    def _execute(self, batch: ScheduledBatch) -> RunResult:
        if self.graphs is not None and not batch.prefills and self.graphs.can_run(batch.decodes):
            # Logits of the padding rows too: every matmul of the step sees the padded row
            # count, as in the graph (the LM head's weight read costs the same either way).
            logits = self.model.compute_logits(self.graphs.run(batch.decodes),
                                               as_float=not compares_only(batch.decodes))
            return RunResult(list(batch.decodes), logits[: len(batch.decodes)])
        input_ids, positions, meta, rows, sampled = self.build_inputs(batch)
        step = self.backend.plan_step(meta)
        hidden = self.model(input_ids, positions, self.kv_cache, step, self.backend)
        prompt_logits = []
        offset = len(batch.decodes)  # prefill chunks follow the decode rows, in order
        for seq, n in batch.prefills:
            start = seq.num_computed_tokens
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                prompt_logits.append((seq, start, self.model.compute_logits(
                    hidden[offset : offset + n]).float()))
            offset += n
        if not rows:
            return RunResult([], hidden.new_empty((0, 0), dtype=torch.float32), prompt_logits)
        if len(rows) != hidden.shape[0]:
            hidden = hidden[torch.tensor(rows, device=hidden.device)]
        return RunResult(sampled, self.model.compute_logits(
            hidden, as_float=not compares_only(sampled)), prompt_logits)
