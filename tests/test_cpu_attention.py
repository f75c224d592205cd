"""The C++ CPU attention kernels against the torch reference ops, on random paged layouts:
block sizes, MHA / GQA / MQA, head_dim 32 / 64 / 128 (and the portable path's 16 and 48),
fp32 / bf16 / fp16, contexts of 1 to 2,000 tokens, ragged batches mixing decodes and
prefill chunks over cached context; the backend's choice and its fallback.

Relative error is ``max|out - ref| / max|ref|`` against the reference computed in float32:
under 1e-5 in fp32; in bf16 / fp16 under 1e-2 (the output's own rounding is ~4e-3).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pdserve.engine import cpu_kernels
from pdserve.engine.attention import get_attention_backend
from pdserve.engine.attention.base import AttentionMetadata
from pdserve.engine.attention.torch_backend import (
    TorchAttentionBackend,
    paged_prefill_attention,
    write_kv_slots,
)

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(), reason="the CPU kernels did not build (see the warning)"
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPES = pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
NUM_LAYERS, LAYER = 2, 1


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


class Paged:
    """A random two-layer cache whose sequences own distinct blocks drawn in random order
    (tables padded with 0), and the queries of their last ``query_lens`` tokens."""

    def __init__(self, seed: int, dtype: torch.dtype, block_size: int, num_kv_heads: int,
                 group: int, head_dim: int, query_lens: list[int], seq_lens: list[int]) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        counts = [-(-n // block_size) for n in seq_lens]
        num_blocks = sum(counts) + 3
        self.cache = self.randn(num_blocks, NUM_LAYERS, 2, block_size, num_kv_heads,
                                head_dim).to(dtype)
        order = torch.randperm(num_blocks, generator=self.gen).tolist()
        width = max(counts) + 1
        self.tables = torch.tensor(
            [[order.pop() for _ in range(c)] + [0] * (width - c) for c in counts],
            dtype=torch.int32,
        )
        self.query_lens, self.seq_lens = query_lens, seq_lens
        self.lens = torch.tensor(seq_lens, dtype=torch.int32)
        self.starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()],
                                   dtype=torch.int32)
        self.query = self.randn(sum(query_lens), num_kv_heads * group, head_dim).to(dtype)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen)

    @property
    def kv_layer(self) -> torch.Tensor:
        return self.cache[:, LAYER]

    def reference(self) -> torch.Tensor:
        """The torch reference, in float32."""
        return paged_prefill_attention(
            self.query.float(), self.kv_layer.float(), self.starts, self.lens, self.tables,
            self.query.shape[-1] ** -0.5, self.query_lens, self.seq_lens,
        )

    def kernel(self, query: torch.Tensor | None = None) -> torch.Tensor:
        query = self.query if query is None else query
        out = torch.empty_like(query)
        torch.ops.pdserve_cpu.paged_attention(out, query, self.kv_layer, self.starts, self.lens,
                                              self.tables, query.shape[-1] ** -0.5)
        return out


# (block_size, num_kv_heads, group, head_dim): MHA, GQA, MQA; SmolLM2's 3 x 3; head_dim
# 16 and 48 take the portable path (48) and the prefill-only SIMD path (16).
LAYOUTS = [(16, 4, 1, 64), (16, 2, 4, 128), (32, 1, 8, 64), (8, 3, 3, 64), (4, 2, 2, 32),
           (16, 1, 6, 32), (16, 2, 2, 16), (8, 2, 2, 48)]


@DTYPES
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda s: "bs{}-kv{}-g{}-d{}".format(*s))
def test_ragged_batch_of_decodes_and_chunks_matches_reference(
    dtype: torch.dtype, layout: tuple[int, int, int, int]
) -> None:
    block_size, kv_heads, group, head_dim = layout
    # Decodes over 1 to 2,000 tokens, a whole prefill, chunks after cached context (one
    # of them longer than a 16-row tile), a one-token chunk.
    seq_lens = [1, 2, 17, 300, 2000, 37, 250, 700, 9]
    query_lens = [1, 1, 1, 1, 1, 37, 20, 45, 1]
    paged = Paged(sum(layout), dtype, block_size, kv_heads, group, head_dim, query_lens,
                  seq_lens)
    out = paged.kernel()
    assert out.dtype == dtype and out.shape == paged.query.shape
    assert rel_err(out, paged.reference()) < TOLERANCE[dtype]


@DTYPES
@pytest.mark.parametrize("seq_len", [1, 31, 33, 128, 129, 1000, 2000])
def test_single_decode_split_over_threads_matches_reference(dtype: torch.dtype,
                                                            seq_len: int) -> None:
    """One sequence: its keys are split into segments merged by log-sum-exp."""
    paged = Paged(seq_len, dtype, 16, 2, 4, 64, [1], [seq_len])
    assert rel_err(paged.kernel(), paged.reference()) < TOLERANCE[dtype]


def test_strided_query_and_output_rows_are_respected() -> None:
    """Queries as a view of a fused projection (row stride past the heads)."""
    paged = Paged(5, torch.float32, 16, 2, 3, 64, [1, 12], [40, 60])
    fused = torch.randn(paged.query.shape[0], 6 + 4, 64)
    query = fused[:, :6]
    out = paged.kernel(query)
    paged.query = query.contiguous()
    assert rel_err(out, paged.reference()) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_write_kv_writes_exactly_the_slots(dtype: torch.dtype) -> None:
    paged = Paged(3, dtype, 8, 2, 1, 64, [1], [5])
    num_blocks, block_size = paged.cache.shape[0], paged.cache.shape[3]
    slots = torch.randperm(num_blocks * block_size, generator=paged.gen)[:11]
    block_ids, offsets = slots // block_size, slots % block_size
    kv = paged.randn(11, 2, 2, 64).to(dtype)  # strided views, as the model produces them
    key, value = kv[:, 0], kv[:, 1]
    expected = paged.cache.clone()
    write_kv_slots(expected[:, LAYER], key, value, block_ids, offsets)
    torch.ops.pdserve_cpu.write_kv(paged.kv_layer, key, value, block_ids, offsets)
    assert torch.equal(paged.cache, expected)


def test_out_of_range_inputs_are_refused() -> None:
    paged = Paged(4, torch.float32, 8, 2, 1, 32, [1], [20])
    paged.tables[0, 1] = paged.cache.shape[0]  # a block past the cache
    with pytest.raises(RuntimeError, match="outside the cache"):
        paged.kernel()
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.pdserve_cpu.write_kv(paged.kv_layer, paged.query[:, :2], paged.query[:, :2],
                                       torch.tensor([paged.cache.shape[0]]), torch.tensor([0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backend_equals_torch_backend_on_a_mixed_step(dtype: torch.dtype) -> None:
    from pdserve.engine.attention.cpu_backend import CpuAttentionBackend

    paged = Paged(6, dtype, 16, 2, 4, 64, [1, 1, 50, 5], [30, 6, 50, 21])
    tables = paged.tables
    slot_blocks, slot_offsets = [], []
    for i, (q, n) in enumerate(zip(paged.query_lens, paged.seq_lens, strict=True)):
        for pos in range(n - q, n):
            slot_blocks.append(int(tables[i, pos // 16]))
            slot_offsets.append(pos % 16)
    meta = AttentionMetadata(
        slot_block_ids=torch.tensor(slot_blocks), slot_offsets=torch.tensor(slot_offsets),
        num_decodes=2, decode_block_tables=tables[:2], decode_seq_lens=paged.lens[:2],
        prefill_query_start_loc=torch.tensor([0, 50, 55], dtype=torch.int32),
        prefill_seq_lens=paged.lens[2:], prefill_block_tables=tables[2:],
        prefill_query_lens_cpu=[50, 5], prefill_seq_lens_cpu=[50, 21],
        max_decode_seq_len=30, decode_seq_lens_cpu=[30, 6],
    )
    qkv = paged.randn(57, 8 + 2 + 2, 64).to(dtype)  # fused projection: strided views
    query, key, value = qkv[:, :8], qkv[:, 8:10], qkv[:, 10:]
    ref_cache = paged.cache.clone()
    torch_backend = TorchAttentionBackend()
    torch_backend.write_kv(ref_cache[:, LAYER], key, value, meta)
    ref = torch_backend.attend(query, ref_cache[:, LAYER], meta, 0.125)
    backend = get_attention_backend(None, torch.device("cpu"))
    assert isinstance(backend, CpuAttentionBackend)  # the CPU default, where it builds
    step = backend.plan_step(meta)
    backend.write_kv(paged.kv_layer, key, value, step)
    out = backend.attend(query, paged.kv_layer, step, 0.125)
    assert torch.equal(paged.cache, ref_cache)
    assert rel_err(out, ref) < TOLERANCE[dtype] * 10  # the reference rounds bf16 products
    out = backend.attend(query, paged.kv_layer, meta, 0.125)  # metadata without a plan
    assert rel_err(out, ref) < TOLERANCE[dtype] * 10


def test_without_a_compiler_the_torch_path_is_used_after_one_warning(tmp_path) -> None:
    """No compiler on PATH and an empty kernel cache: ``auto`` picks the torch backend and
    says why once, however many engines ask."""
    script = textwrap.dedent("""
        import logging, sys, torch
        records = []
        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record)
        logging.getLogger("pdserve").addHandler(Keep())
        logging.getLogger("pdserve").setLevel(logging.INFO)
        from pdserve.engine.attention import get_attention_backend
        names = [get_attention_backend(None, torch.device("cpu")).name for _ in range(3)]
        warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
        print(names, len(warnings))
        print(warnings[0])
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "PDSERVE_CPU_KERNELS")}
    env["PATH"] = str(tmp_path)  # no c++ / g++ here
    env["CXX"] = str(tmp_path / "no-such-c++")  # and $CXX names a compiler that is missing
    env["PDSERVE_KERNEL_CACHE"] = str(tmp_path / "cache")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, message = out.stdout.strip().splitlines()
    assert first == "['torch', 'torch', 'torch'] 1"
    assert "no C++ compiler" in message and "torch attention path" in message
