"""Decode steps as CUDA graphs: one graph per batch size of a ladder, inputs in persistent
buffers.

A decode-only batch of ``n`` sequences runs as the graph captured for the smallest ladder
size ``s >= n``. Its inputs are copied into persistent device buffers (a graph reads fixed
addresses). Rows ``n..s-1`` are padding: token 0 at position 0, whose K/V goes to offset 0 of
a reserved padding block and which attends over that single slot (``seq_len`` 1). The owner
of the KV tensor allocates the padding block one past the block pool's ``num_blocks``
(``ModelRunner`` does), so no block the pool hands out is ever written by padding.

Capture shapes. Every graph is captured with ``max_decode_seq_len`` = ``max_blocks_per_seq *
block_size``, the longest context a sequence may reach: the Triton decode kernel derives its
split count on the host from that value, and a graph freezes it. Each sequence then cuts
its own context into that many splits on the device, so a short context still spreads over
all the programs; it may get more splits than eager decode would give it, which changes
the summation order only. Results agree with eager decode up to rounding, not bit for bit.

Only the Triton backend is captured. The torch backend has no host syncs once
``max_decode_seq_len`` is given, but it gathers ``max_decode_seq_len`` tokens of K/V per
sequence: captured at the longest context it would copy the whole context window of every
row every step, so it always runs eagerly.

Prefill and mixed batches, and decode batches larger than the ladder's top size, run
eagerly (the runner decides, through ``DecodeGraphRunner.can_run``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata
from pdserve.engine.sequence import Sequence

logger = logging.getLogger(__name__)

DEFAULT_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Decode batch sizes captured by default (capped by ``max_num_seqs``)."""


def graphs_supported(device: torch.device, backend: AttentionBackend) -> bool:
    """Whether decode steps on ``device`` with ``backend`` may be captured: CUDA + Triton."""
    return torch.device(device).type == "cuda" and backend.name == "triton"


def ladder_sizes(max_num_seqs: int, ladder: Seq[int] = DEFAULT_LADDER) -> tuple[int, ...]:
    """The batch sizes to capture, ascending: the ladder's sizes below
    ``cap = min(max_num_seqs, max(ladder))``, then ``cap`` itself, so every decode batch the
    scheduler can form (up to the cap) has a graph and none is captured for larger ones."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
    if not ladder or min(ladder) < 1:
        raise ValueError(f"ladder sizes must be positive, got {tuple(ladder)}")
    cap = min(max_num_seqs, max(ladder))
    return tuple(sorted({s for s in ladder if s < cap} | {cap}))


def padded_batch_size(num_seqs: int, sizes: Seq[int]) -> int | None:
    """The smallest of ``sizes`` holding ``num_seqs`` rows; None when none does."""
    return min((s for s in sizes if s >= num_seqs), default=None)


@dataclass(frozen=True, slots=True)
class PaddedDecode:
    """Host-side inputs of one decode step padded to ``size`` rows; the first ``num_seqs``
    rows are real. Every list has ``size`` entries; ``block_tables`` rows have the length of
    their sequence's block list (padding rows: ``[padding_block]``)."""

    num_seqs: int
    input_ids: list[int]
    positions: list[int]
    slot_block_ids: list[int]
    slot_offsets: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]

    @property
    def size(self) -> int:
        return len(self.input_ids)


def pad_decode_batch(
    decodes: Seq[Sequence], size: int, block_size: int, padding_block: int
) -> PaddedDecode:
    """The decode inputs of ``decodes`` (as ``ModelRunner.build_inputs`` builds them: each
    sequence's token at ``num_computed_tokens``) followed by padding rows up to ``size``."""
    if len(decodes) > size:
        raise ValueError(f"{len(decodes)} decodes do not fit a padded batch of {size}")
    ids, positions, blocks, offsets, lens = [], [], [], [], []
    tables: list[list[int]] = []
    for seq in decodes:
        pos = seq.num_computed_tokens
        ids.append(seq.token_ids[pos])
        positions.append(pos)
        blocks.append(seq.block_ids[pos // block_size])
        offsets.append(pos % block_size)
        lens.append(pos + 1)
        tables.append(list(seq.block_ids))
    pad = size - len(decodes)
    return PaddedDecode(
        num_seqs=len(decodes),
        input_ids=ids + [0] * pad,
        positions=positions + [0] * pad,
        slot_block_ids=blocks + [padding_block] * pad,
        slot_offsets=offsets + [0] * pad,
        seq_lens=lens + [1] * pad,
        block_tables=tables + [[padding_block] for _ in range(pad)],
    )


class DecodeBuffers:
    """Persistent device inputs for decode batches of up to ``max_batch`` rows.

    Views of the first ``size`` rows (``input_ids(size)``, ``meta(size, ...)``) keep their
    addresses across ``load`` calls, which is what lets a captured graph read new inputs.
    Block-table entries past a row's blocks may hold stale but valid block ids: kernels read
    a row only up to its ``seq_len``.

    ``load`` never waits for the device: on CUDA its copies leave pinned host memory
    asynchronously (the caching host allocator keeps each staging tensor alive until its
    copy ran), so the host builds step ``n + 1`` while the device still runs step ``n``.
    Block-table rows are copied only where they differ from what the row last received
    (decode mostly appends a block every ``block_size`` steps, if at all).
    """

    def __init__(self, max_batch: int, max_blocks_per_seq: int, device: torch.device) -> None:
        self.max_batch = max_batch
        self.max_blocks_per_seq = max_blocks_per_seq
        i32, i64 = torch.int32, torch.int64
        # Rows: input ids, positions, slot blocks, slot offsets, seq lens (one copy).
        self.tokens = torch.zeros((5, max_batch), dtype=i64, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=i32, device=device)
        self.block_tables = torch.zeros((max_batch, max_blocks_per_seq), dtype=i32, device=device)
        self._no_prefill_loc = torch.zeros(1, dtype=i32, device=device)
        self._no_prefill_lens = torch.zeros(0, dtype=i32, device=device)
        self._no_prefill_tables = torch.zeros((0, 1), dtype=i32, device=device)
        self._pin = torch.device(device).type == "cuda"
        # The block ids each row of ``block_tables`` holds on the device, as last loaded.
        self._tables: list[list[int]] = [[] for _ in range(max_batch)]

    def _staged(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, pin_memory=self._pin)

    def load(self, padded: PaddedDecode) -> None:
        """Copy ``padded`` into the first ``padded.size`` rows."""
        size = padded.size
        width = max(len(row) for row in padded.block_tables)
        if size > self.max_batch or width > self.max_blocks_per_seq:
            raise ValueError(
                f"decode batch of {size} rows x {width} blocks exceeds the buffers "
                f"({self.max_batch} x {self.max_blocks_per_seq})"
            )
        tokens = self._staged(
            [
                padded.input_ids,
                padded.positions,
                padded.slot_block_ids,
                padded.slot_offsets,
                padded.seq_lens,
            ],
            torch.int64,
        )
        self.tokens[:, :size].copy_(tokens, non_blocking=True)
        self.seq_lens[:size].copy_(self.tokens[4, :size])
        flat: list[int] = []
        values: list[int] = []
        stride = self.max_blocks_per_seq
        for i, row in enumerate(padded.block_tables):
            held = self._tables[i]
            if row == held:
                continue
            # Decode appends blocks: then only the new tail travels.
            start = len(held) if len(held) < len(row) and row[: len(held)] == held else 0
            flat.extend(range(i * stride + start, i * stride + len(row)))
            values.extend(row[start:])
            self._tables[i] = list(row)
        if flat:
            index = self._staged(flat, torch.int64).to(self.block_tables.device, non_blocking=True)
            update = self._staged(values, torch.int32).to(
                self.block_tables.device, non_blocking=True
            )
            self.block_tables.view(-1).index_copy_(0, index, update)

    def input_ids(self, size: int) -> torch.Tensor:
        return self.tokens[0, :size]

    def positions(self, size: int) -> torch.Tensor:
        return self.tokens[1, :size]

    def meta(self, size: int, max_seq_len: int) -> AttentionMetadata:
        """Decode-only metadata over the first ``size`` rows; ``max_seq_len`` is the host
        bound the kernels size their launch by (see the module docstring)."""
        return AttentionMetadata(
            slot_block_ids=self.tokens[2, :size],
            slot_offsets=self.tokens[3, :size],
            num_decodes=size,
            decode_block_tables=self.block_tables[:size],
            decode_seq_lens=self.seq_lens[:size],
            prefill_query_start_loc=self._no_prefill_loc,
            prefill_seq_lens=self._no_prefill_lens,
            prefill_block_tables=self._no_prefill_tables,
            prefill_query_lens_cpu=[],
            prefill_seq_lens_cpu=[],
            max_decode_seq_len=max_seq_len,
        )


class DecodeGraphRunner:
    """Runs decode-only batches of up to ``max(sizes)`` sequences on padded persistent
    buffers: through CUDA graphs captured at construction (``capture=True``, CUDA only), or
    eagerly on the same buffers (``capture=False``: identical inputs and padding, no graphs;
    this is how CPU tests exercise it).

    ``kv_storage`` is the whole KV tensor including ``padding_block``, which must belong to
    no sequence. Capture runs the model only on padding rows, so it writes nothing else.
    The hidden states ``run`` returns live in memory shared by all graphs: they are valid
    until the next ``run``. Not thread-safe; model, backend and storage must outlive it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        backend: AttentionBackend,
        kv_storage: torch.Tensor,
        *,
        block_size: int,
        padding_block: int,
        max_blocks_per_seq: int,
        sizes: Seq[int] = DEFAULT_LADDER,
        capture: bool = True,
    ) -> None:
        if not 0 <= padding_block < kv_storage.shape[0]:
            raise ValueError(
                f"padding block {padding_block} is outside the KV storage "
                f"({kv_storage.shape[0]} blocks)"
            )
        if capture and kv_storage.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {kv_storage.device}")
        self.model = model
        self.backend = backend
        self.kv_storage = kv_storage
        self.block_size = block_size
        self.padding_block = padding_block
        self.max_blocks_per_seq = max_blocks_per_seq
        self.sizes = tuple(sorted(set(sizes)))
        self.max_seq_len = max_blocks_per_seq * block_size
        self.buffers = DecodeBuffers(max(self.sizes), max_blocks_per_seq, kv_storage.device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture_all()

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def can_run(self, decodes: Seq[Sequence]) -> bool:
        """Whether ``run`` takes this batch: at most ``max(sizes)`` sequences, none holding
        more than ``max_blocks_per_seq`` blocks."""
        return 0 < len(decodes) <= self.sizes[-1] and all(
            len(seq.block_ids) <= self.max_blocks_per_seq for seq in decodes
        )

    @torch.inference_mode()
    def run(self, decodes: Seq[Sequence]) -> torch.Tensor:
        """Final hidden states of one decode step, padded: ``[s, hidden]`` where ``s`` is
        the ladder size that holds ``decodes``; row ``i < len(decodes)`` is ``decodes[i]``'s,
        the rest are padding. Each sequence's new K/V goes to its slot, padding rows write
        ``padding_block``."""
        size = padded_batch_size(len(decodes), self.sizes)
        if size is None or not self.can_run(decodes):
            raise ValueError(
                f"decode batch of {len(decodes)} sequences does not fit the captured sizes "
                f"{self.sizes} / {self.max_blocks_per_seq} blocks per sequence"
            )
        self.buffers.load(pad_decode_batch(decodes, size, self.block_size, self.padding_block))
        if not self._graphs:
            return self._forward(size)
        graph, hidden = self._graphs[size]
        graph.replay()
        return hidden

    def _forward(self, size: int) -> torch.Tensor:
        meta = self.buffers.meta(size, self.max_seq_len)
        return self.model(
            self.buffers.input_ids(size),
            self.buffers.positions(size),
            self.kv_storage,
            meta,
            self.backend,
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """Warm up and capture each size, largest first, all graphs in one memory pool."""
        start = time.perf_counter()
        with torch.cuda.device(self.kv_storage.device):
            self._capture_each()
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %s, context up to %d tokens) in %.1fs",
            len(self._graphs),
            ",".join(map(str, self.sizes)),
            self.max_seq_len,
            time.perf_counter() - start,
        )

    def _capture_each(self) -> None:
        pool = None
        for size in reversed(self.sizes):
            self.buffers.load(pad_decode_batch([], size, self.block_size, self.padding_block))
            # Warm-up on a side stream (as the PyTorch CUDA graphs notes advise): compiles the
            # Triton kernels for this size and sets up library workspaces before capture.
            side = torch.cuda.Stream(self.kv_storage.device)
            side.wait_stream(torch.cuda.current_stream(self.kv_storage.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(size)
            torch.cuda.current_stream(self.kv_storage.device).wait_stream(side)
            torch.cuda.synchronize(self.kv_storage.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._forward(size)
            pool = graph.pool()
            self._graphs[size] = (graph, hidden)
        torch.cuda.synchronize(self.kv_storage.device)


def seq_block_limit(block_size: int, num_blocks: int, max_model_len: int) -> int:
    """Blocks one sequence can hold: its longest context, capped by the pool's size."""
    return min(-(-max_model_len // block_size), num_blocks)


def capture_decode_graphs(
    model: torch.nn.Module,
    backend: AttentionBackend,
    kv_storage: torch.Tensor,
    block_size: int,
    max_num_seqs: int,
    max_model_len: int | None = None,
) -> DecodeGraphRunner:
    """Graphs for ``ModelRunner``: ``kv_storage``'s LAST block is the padding block (the pool
    owns the others); sizes from ``ladder_sizes(max_num_seqs)``; contexts up to
    ``max_model_len`` (default: the model config's ``max_position_embeddings``), capped by
    the pool."""
    num_blocks = kv_storage.shape[0] - 1
    if max_model_len is None:
        config = getattr(model, "config", None)
        max_model_len = getattr(config, "max_position_embeddings", None)
    return DecodeGraphRunner(
        model,
        backend,
        kv_storage,
        block_size=block_size,
        padding_block=num_blocks,
        max_blocks_per_seq=seq_block_limit(
            block_size, num_blocks, max_model_len or num_blocks * block_size
        ),
        sizes=ladder_sizes(max_num_seqs),
    )
