"""The Triton kernels against the torch reference ops: paged attention on random paged
layouts, and the decoder's fused elementwise stages (``pdserve.engine.model.triton_ops``).

Without CUDA the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``,
set by ``tests/conftest.py`` before triton is imported); the CUDA variants are marked ``gpu``.
Relative error is ``max|out - ref| / max|ref|``: under 1e-4 in fp32, 1e-2 in bf16/fp16.
"""

from __future__ import annotations

import os

if "TRITON_INTERPRET" not in os.environ:  # conftest.py normally did this already
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton")

from pdserve.engine.attention import get_attention_backend  # noqa: E402
from pdserve.engine.attention.base import AttentionMetadata  # noqa: E402
from pdserve.engine.attention.torch_backend import (  # noqa: E402
    TorchAttentionBackend,
    paged_decode_attention,
    paged_prefill_attention,
    write_kv_slots,
)
from pdserve.engine.attention.triton_backend import (  # noqa: E402
    INTERPRETED,
    TritonAttentionBackend,
    triton_paged_decode_attention,
    triton_paged_prefill_attention,
    triton_write_kv_slots,
)

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not INTERPRETED, reason="kernels compiled for CUDA (TRITON_INTERPRET unset)"
        ),
    ),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                not HAS_CUDA or INTERPRETED, reason="needs CUDA (and TRITON_INTERPRET unset)"
            ),
        ],
    ),
]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
FP32_BF16 = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
NUM_LAYERS, LAYER = 3, 1


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref|, in fp32."""
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


class Paged:
    """A random multi-layer cache and block tables for ``seq_lens``: each sequence gets
    distinct blocks drawn in random order from a larger pool (non-contiguous, out of order),
    tables padded with 0 beyond the blocks used."""

    def __init__(
        self,
        seed: int,
        device: str,
        dtype: torch.dtype,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        seq_lens: list[int],
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        counts = [-(-n // block_size) for n in seq_lens]
        num_blocks = sum(counts) + 4
        self.cache = torch.randn(
            (num_blocks, NUM_LAYERS, 2, block_size, num_kv_heads, head_dim), generator=gen
        ).to(device=device, dtype=dtype)
        order = torch.randperm(num_blocks, generator=gen).tolist()
        width = max(counts) + 1
        rows, start = [], 0
        for count in counts:
            rows.append(order[start : start + count] + [0] * (width - count))
            start += count
        self.block_tables = torch.tensor(rows, dtype=torch.int32, device=device)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        self.gen = gen

    @property
    def kv_layer(self) -> torch.Tensor:
        return self.cache[:, LAYER]

    def randn(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen).to(
            device=self.cache.device, dtype=dtype or self.cache.dtype
        )


# (block_size, num_kv_heads, group = num_heads // num_kv_heads, head_dim)
SHAPES = [(8, 2, 1, 64), (16, 2, 4, 128), (32, 1, 8, 64), (16, 4, 2, 64), (8, 1, 1, 128)]


@pytest.mark.parametrize("device", DEVICES)
@FP32_BF16
def test_write_kv_writes_exactly_the_slots(device: str, dtype: torch.dtype) -> None:
    paged = Paged(0, device, dtype, block_size=8, num_kv_heads=2, head_dim=64, seq_lens=[40, 9])
    num_blocks, _, _, block_size = paged.cache.shape[:4]
    slots = torch.randperm(num_blocks * block_size, generator=paged.gen)[:13].to(device)
    block_ids, offsets = slots // block_size, slots % block_size
    # Key and value as strided slices of one fused projection, like the model produces.
    kv = paged.randn(13, 2, 2, 64)
    key, value = kv[:, 0], kv[:, 1]
    expected = paged.cache.clone()
    write_kv_slots(expected[:, LAYER], key, value, block_ids, offsets)
    before = paged.cache.clone()
    triton_write_kv_slots(paged.kv_layer, key, value, block_ids, offsets)
    assert torch.equal(paged.cache, expected)
    changed = (paged.cache != before).flatten(4).any(-1)  # [blocks, layers, kv, block_size]
    written = zip(block_ids.tolist(), offsets.tolist(), strict=True)
    assert changed.nonzero().tolist() == sorted(
        [b, LAYER, side, o] for b, o in written for side in (0, 1)
    )


@pytest.mark.parametrize("device", DEVICES)
@FP32_BF16
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "bs{}-kv{}-g{}-d{}".format(*s))
def test_decode_matches_reference_single_pass_and_split_k(
    device: str, dtype: torch.dtype, shape: tuple[int, int, int, int]
) -> None:
    block_size, num_kv_heads, group, head_dim = shape
    seq_lens = [1, 3 * block_size + 5, 70, block_size]
    paged = Paged(sum(shape), device, dtype, block_size, num_kv_heads, head_dim, seq_lens)
    query = paged.randn(len(seq_lens), num_kv_heads * group, head_dim)
    scale = head_dim**-0.5
    ref = paged_decode_attention(query, paged.kv_layer, paged.block_tables, paged.seq_lens, scale)
    single = triton_paged_decode_attention(
        query, paged.kv_layer, paged.block_tables, paged.seq_lens, scale
    )
    # 32-token splits: several per long sequence, and empty ones for the short sequences.
    split = triton_paged_decode_attention(
        query,
        paged.kv_layer,
        paged.block_tables,
        paged.seq_lens,
        scale,
        max(seq_lens),
        split_tokens=32,
    )
    assert single.dtype == dtype and single.shape == query.shape
    assert rel_err(single, ref) < TOLERANCE[dtype]
    assert rel_err(split, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@FP32_BF16
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "bs{}-kv{}-g{}-d{}".format(*s))
def test_prefill_matches_reference_with_prefix_hits(
    device: str, dtype: torch.dtype, shape: tuple[int, int, int, int]
) -> None:
    block_size, num_kv_heads, group, head_dim = shape
    # Full prefill, prefix hits (a chunk after cached context), a one-token chunk, and a
    # chunk longer than one 64-row query tile.
    seq_lens = [13, 2 * block_size + 3, 40, 75]
    query_lens = [13, 7, 1, 70]
    paged = Paged(sum(shape) + 1, device, dtype, block_size, num_kv_heads, head_dim, seq_lens)
    query = paged.randn(sum(query_lens), num_kv_heads * group, head_dim)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    starts = starts.to(device)
    args = (query, paged.kv_layer, starts, paged.seq_lens, paged.block_tables, head_dim**-0.5)
    ref = paged_prefill_attention(*args, query_lens, seq_lens)
    out = triton_paged_prefill_attention(*args, query_lens, seq_lens)
    assert out.dtype == dtype and out.shape == query.shape
    assert rel_err(out, ref) < TOLERANCE[dtype]


def _mixed_batch(
    paged: Paged, num_decodes: int, query_lens: list[int], seq_lens: list[int]
) -> AttentionMetadata:
    """Metadata for decodes of sequences ``0..num_decodes-1`` then prefill chunks of the
    rest; new tokens' slots are the last ``query_len`` positions of each context."""
    device = paged.cache.device
    block_size = paged.cache.shape[3]
    tables = paged.block_tables.cpu()
    slot_blocks, slot_offsets = [], []
    for i, (q_len, s_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        for pos in range(s_len - q_len, s_len):
            slot_blocks.append(int(tables[i, pos // block_size]))
            slot_offsets.append(pos % block_size)
    prefill_q = query_lens[num_decodes:]
    return AttentionMetadata(
        slot_block_ids=torch.tensor(slot_blocks, device=device),
        slot_offsets=torch.tensor(slot_offsets, device=device),
        num_decodes=num_decodes,
        decode_block_tables=paged.block_tables[:num_decodes],
        decode_seq_lens=paged.seq_lens[:num_decodes],
        prefill_query_start_loc=torch.tensor(
            [0, *torch.tensor(prefill_q, dtype=torch.int64).cumsum(0).tolist()],
            dtype=torch.int32,
            device=device,
        ),
        prefill_seq_lens=paged.seq_lens[num_decodes:],
        prefill_block_tables=paged.block_tables[num_decodes:],
        prefill_query_lens_cpu=prefill_q,
        prefill_seq_lens_cpu=seq_lens[num_decodes:],
        max_decode_seq_len=max(seq_lens[:num_decodes], default=0),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_backend_matches_torch_backend_on_mixed_batch(device: str, dtype: torch.dtype) -> None:
    seq_lens = [30, 6, 50, 21]
    query_lens = [1, 1, 50, 5]
    paged = Paged(7, device, dtype, block_size=16, num_kv_heads=2, head_dim=64, seq_lens=seq_lens)
    meta = _mixed_batch(paged, 2, query_lens, seq_lens)
    qkv = paged.randn(sum(query_lens), 8 + 2 + 2, 64)  # fused projection: strided views
    query, key, value = qkv[:, :8], qkv[:, 8:10], qkv[:, 10:]
    ref_cache = paged.cache.clone()
    TorchAttentionBackend().write_kv(ref_cache[:, LAYER], key, value, meta)
    ref = TorchAttentionBackend().attend(query, ref_cache[:, LAYER], meta, 0.125)
    backend = TritonAttentionBackend()
    backend.write_kv(paged.kv_layer, key, value, meta)
    out = backend.attend(query, paged.kv_layer, meta, 0.125)
    assert torch.equal(paged.cache, ref_cache)
    assert rel_err(out, ref) < TOLERANCE[dtype]
    decode_only = _mixed_batch(paged, 2, query_lens[:2], seq_lens[:2])
    out = backend.attend(query[:2], paged.kv_layer, decode_only, 0.125)
    assert rel_err(out, ref[:2]) < TOLERANCE[dtype]


def test_head_dim_not_a_power_of_two_is_refused() -> None:
    paged = Paged(0, "cpu", torch.float32, block_size=8, num_kv_heads=1, head_dim=80, seq_lens=[5])
    query = paged.randn(1, 2, 80)
    with pytest.raises(ValueError, match="power of two"):
        triton_paged_decode_attention(
            query, paged.kv_layer, paged.block_tables, paged.seq_lens, 0.1
        )


def test_backend_selection() -> None:
    from pdserve.engine import cpu_kernels

    cpu = torch.device("cpu")
    on_cpu = "cpu" if cpu_kernels.available() else "torch"  # the C++ kernels where they build
    assert get_attention_backend(None, cpu).name == on_cpu
    assert get_attention_backend("auto", cpu).name == on_cpu
    assert get_attention_backend("torch", cpu).name == "torch"
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend("xformers", cpu)
    with pytest.raises(ValueError, match="CUDA"):
        get_attention_backend("flash_attn", cpu)
    if INTERPRETED:
        assert get_attention_backend("triton", cpu).name == "triton"
    if HAS_CUDA and not INTERPRETED:
        assert get_attention_backend(None, torch.device("cuda")).name == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_flash_attn_backend_matches_torch_backend() -> None:
    pytest.importorskip("vllm_flash_attn")
    seq_lens, query_lens = [30, 70, 21], [1, 40, 21]
    paged = Paged(
        3, "cuda", torch.bfloat16, block_size=16, num_kv_heads=2, head_dim=128, seq_lens=seq_lens
    )
    meta = _mixed_batch(paged, 1, query_lens, seq_lens)
    query = paged.randn(sum(query_lens), 8, 128)
    key, value = paged.randn(sum(query_lens), 2, 128), paged.randn(sum(query_lens), 2, 128)
    backend = get_attention_backend("flash_attn", torch.device("cuda"))
    backend.write_kv(paged.kv_layer, key, value, meta)
    out = backend.attend(query, paged.kv_layer, meta, 128**-0.5)
    ref = TorchAttentionBackend().attend(query, paged.kv_layer, meta, 128**-0.5)
    assert rel_err(out, ref) < 1e-2


# -- fused decoder stages ------------------------------------------------------------------


def _randn(gen: torch.Generator, device: str, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@FP32_BF16
def test_fused_add_rms_norm_matches_torch(device: str, dtype: torch.dtype) -> None:
    from pdserve.engine.model import triton_ops
    from pdserve.engine.model.llama import rms_norm

    gen = torch.Generator().manual_seed(11)
    # 96 columns: not a power of two, so the row's tail is masked.
    x, residual = _randn(gen, device, dtype, 5, 96), _randn(gen, device, dtype, 5, 96)
    weight = 1 + 0.1 * _randn(gen, device, dtype, 96)
    out, summed = triton_ops.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(summed, residual + x)  # rounded to the dtype as torch rounds
    assert out.dtype == dtype
    assert rel_err(out, rms_norm(residual + x, weight, 1e-5)) < TOLERANCE[dtype]
    out, same = triton_ops.add_rms_norm(x, None, weight, 1e-5)
    assert same is x
    assert rel_err(out, rms_norm(x, weight, 1e-5)) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@FP32_BF16
def test_fused_rotate_matches_apply_rope(device: str, dtype: torch.dtype) -> None:
    from pdserve.engine.config import RopeConfig
    from pdserve.engine.model import triton_ops
    from pdserve.engine.model.llama import apply_rope, rope_tables

    gen = torch.Generator().manual_seed(12)
    # q and k heads as a strided view of a fused projection (5 heads: a masked head block).
    qkv = _randn(gen, device, dtype, 7, 7, 64)
    qk = qkv[:, :5]
    table = rope_tables(RopeConfig(theta=500000.0), 64, 40).to(device=device, dtype=dtype)
    positions = torch.tensor([0, 3, 5, 9, 17, 30, 39], device=device)
    cos, sin = table[positions].unsqueeze(1).chunk(2, dim=-1)
    out = triton_ops.rotate(qk, cos, sin)
    ref = apply_rope(qk, cos, sin)
    assert out.shape == ref.shape and out.is_contiguous()
    if dtype == torch.float32:
        assert rel_err(out, ref) < 1e-6  # fp32 may contract a product into an FMA
    else:  # every product and sum rounded where torch rounds
        assert torch.equal(out, ref)


@pytest.mark.parametrize("device", DEVICES)
@FP32_BF16
def test_fused_silu_mul_matches_torch(device: str, dtype: torch.dtype) -> None:
    from pdserve.engine.model import triton_ops

    gen = torch.Generator().manual_seed(13)
    gate_up = 3 * _randn(gen, device, dtype, 3, 2 * 1100)  # two blocks, the second masked
    gate, up = gate_up.chunk(2, dim=-1)
    out = triton_ops.silu_mul(gate_up)
    assert out.shape == (3, 1100)
    assert rel_err(out, torch.nn.functional.silu(gate) * up) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_model_with_fused_stages_matches_plain_torch(
    device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole decoder (residual stream carried across layers) with the fused kernels,
    against the same model on plain torch ops; bf16, prefill then one decode step."""
    from pdserve.engine.config import KVCacheSpec
    from pdserve.engine.model import llama, triton_ops
    from pdserve.engine.model.builtin import builtin_checkpoint
    from pdserve.engine.model.loader import load_model
    from pdserve.engine.runner import ModelRunner
    from pdserve.engine.sampling import SamplingParams
    from pdserve.engine.scheduler import ScheduledBatch
    from pdserve.engine.sequence import Sequence

    model = load_model(builtin_checkpoint("tiny"), "bfloat16", device)
    c = model.config
    spec = KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 8, "bfloat16")
    backend = get_attention_backend("torch", torch.device(device))
    if device == "cpu":  # the CPU path is plain torch; run the kernels in the interpreter
        monkeypatch.setattr(llama, "_fused", lambda x: triton_ops)
    else:
        assert llama._fused(model.embed_tokens) is triton_ops

    def run() -> list[torch.Tensor]:
        runner = ModelRunner(model, spec, 8, torch.device(device), backend, cuda_graphs=False)
        seq = Sequence("r", list(range(3, 22)), SamplingParams(), 0.0, 0)
        seq.block_ids = [5, 1, 6]
        logits = [runner.execute(ScheduledBatch(prefills=[(seq, seq.num_tokens)])).logits]
        seq.num_computed_tokens = seq.num_tokens
        seq.token_ids.append(7)
        logits.append(runner.execute(ScheduledBatch(decodes=[seq])).logits)
        return logits

    with_fused = run()
    monkeypatch.setattr(llama, "_fused", lambda x: None)
    plain = run()
    for have, want in zip(with_fused, plain, strict=True):
        assert rel_err(have, want) < 2e-2
