"""Paged attention as Triton kernels: the CUDA path, matching ``torch_backend`` op for op.

Each public op takes the same arguments as its torch reference and promises the same result
up to rounding (fp32 accumulation): ``triton_write_kv_slots`` <-> ``write_kv_slots``,
``triton_paged_decode_attention`` <-> ``paged_decode_attention`` and
``triton_paged_prefill_attention`` <-> ``paged_prefill_attention``. Kernels read ``kv_layer``
(the strided view ``cache[:, layer]``) through its strides and never copy it.

Supported: fp32, bf16 and fp16; ``head_dim`` a power of two from 16 to 256; anything else
raises ``ValueError``. The kernels need CUDA tensors, unless ``TRITON_INTERPRET=1`` was set
before triton was first imported: then they run in Triton's interpreter on CPU tensors (slow;
for tests; see ``INTERPRETED``). Importing this module without ``triton`` installed raises
``ImportError``; the engine imports it only when it selects Triton.
"""

from __future__ import annotations

import functools
import math

import torch

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "the Triton attention backend needs the 'triton' package (pip install triton); "
        "select the 'torch' attention backend instead"
    ) from exc

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DECODE_SPLIT_TOKENS = 64
"""Decode contexts longer than this are split over several programs (split-K), as far as
the batch leaves SMs idle: a short split keeps one program's chain of dependent loads
(block table, then K and V) short, which is what bounds decode at small batches."""
MAX_DECODE_SPLITS = 32


# Kernel arguments are grouped by tensor (pointer, then its strides), one group a line.
# fmt: off
@triton.jit
def _mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in fp32. UPCAST multiplies fp32 copies of the operands: Triton's
    interpreter computes a bf16 ``tl.dot`` on raw bit patterns."""
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, kv_ptr, block_ids_ptr, offsets_ptr,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_cb, stride_ckv, stride_ct, stride_ch, stride_cd,
    num_kv_heads,
    BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HEAD_DIM)
    mask = (heads < num_kv_heads)[:, None]
    block = tl.load(block_ids_ptr + tok).to(tl.int64)
    offset = tl.load(offsets_ptr + tok).to(tl.int64)
    dst = kv_ptr + block * stride_cb + offset * stride_ct
    dst += heads[:, None] * stride_ch + dims[None, :] * stride_cd
    k = tl.load(key_ptr + tok * stride_kt + heads[:, None] * stride_kh + dims[None, :] * stride_kd,
                mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + heads[:, None] * stride_vh
                + dims[None, :] * stride_vd, mask=mask)
    tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_ckv, v.to(kv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_kernel(
    q_ptr, kv_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    qk_scale,
    stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
    stride_cb, stride_ckv, stride_ct, stride_ch, stride_cd,
    stride_bt, num_heads,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One (sequence, kv head, split): the GQA group's query heads as the rows of one tile.
    Each sequence cuts its own context into ``NUM_SPLITS`` equal splits (whole ``BLOCK_N``
    tiles), so a launch sized for a longer context still spreads a short one over them."""
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + rows
    row_mask = rows < GROUP
    seq_len = tl.load(seq_lens_ptr + seq)
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=row_mask[:, None], other=0.0).to(kv_ptr.dtype.element_ty)
    m = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seq_len)
    cache = kv_ptr + kv_head * stride_ch + dims[None, :] * stride_cd
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < hi
        block = tl.load(block_tables_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=valid,
                        other=0).to(tl.int64)
        tok = cache + block[:, None] * stride_cb + (pos % BLOCK_SIZE)[:, None] * stride_ct
        k = tl.load(tok, mask=valid[:, None], other=0.0)
        v = tl.load(tok + stride_ckv, mask=valid[:, None], other=0.0)
        s = _mma(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # Normalise by the weights as rounded for the P @ V product, not the exact ones.
        p = tl.exp2(s - m_new[:, None]).to(v.dtype)
        alpha = tl.exp2(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p.to(tl.float32), 1)
        acc = acc * alpha[:, None] + _mma(p, v, PRECISION, UPCAST)
        m = m_new
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dims[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
    else:
        # Partials are contiguous: acc [B, Hq, S, D], (m, l) [B, Hq, S, 2].
        part = (seq * num_heads + heads) * NUM_SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc,
                 mask=row_mask[:, None])
        tl.store(part_ml_ptr + part * 2, m, mask=row_mask)
        tl.store(part_ml_ptr + part * 2 + 1, l_sum, mask=row_mask)


@triton.jit
def _decode_reduce_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, stride_ot, stride_oh, stride_od, num_heads,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Merges one (sequence, query head)'s split partials by their running maxima."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, HEAD_DIM)
    smask = splits < NUM_SPLITS
    part = (seq * num_heads + head) * NUM_SPLITS + splits
    m = tl.load(part_ml_ptr + part * 2, mask=smask, other=-1.0e30)
    l_sum = tl.load(part_ml_ptr + part * 2 + 1, mask=smask, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=smask[:, None],
                  other=0.0)
    weight = tl.exp2(m - tl.max(m, 0))
    total = tl.sum(weight * l_sum, 0)
    out = tl.sum(weight[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + dims * stride_od,
             out.to(out_ptr.dtype.element_ty))


@triton.jit
def _prefill_tile_step(
    q, m, l_sum, acc, start, hi, q_pos, cache, block_table, qk_scale,
    stride_cb, stride_ckv, stride_ct,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, MASKED: tl.constexpr,
):
    """Online-softmax update of one query tile with keys ``start .. start + BLOCK_N``;
    MASKED applies the causal and ``hi`` bounds (the tiles wholly below the query tile
    need neither)."""
    pos = start + tl.arange(0, BLOCK_N)
    if MASKED:
        valid = pos < hi
        block = tl.load(block_table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    else:
        block = tl.load(block_table + pos // BLOCK_SIZE).to(tl.int64)
    tok = cache + block[:, None] * stride_cb + (pos % BLOCK_SIZE)[:, None] * stride_ct
    if MASKED:
        k = tl.load(tok, mask=valid[:, None], other=0.0)
        v = tl.load(tok + stride_ckv, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(tok)
        v = tl.load(tok + stride_ckv)
    s = _mma(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
    if MASKED:
        s = tl.where(valid[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    # Normalise by the weights as rounded for the P @ V product, not the exact ones.
    p = tl.exp2(s - m_new[:, None]).to(v.dtype)
    alpha = tl.exp2(m - m_new)
    l_sum = l_sum * alpha + tl.sum(p.to(tl.float32), 1)
    acc = acc * alpha[:, None] + _mma(p, v, PRECISION, UPCAST)
    return m_new, l_sum, acc


@triton.jit
def _prefill_kernel(
    q_ptr, kv_ptr, query_start_ptr, seq_lens_ptr, block_tables_ptr, out_ptr,
    qk_scale,
    stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
    stride_cb, stride_ckv, stride_ct, stride_ch, stride_cd, stride_bt,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One (query tile, query head, sequence): the tile's rows sit at absolute positions
    ``seq_len - query_len + row`` and attend causally over the context up to themselves.
    Key tiles below the tile's first position run unmasked; only the rest (the diagonal)
    pay for the causal mask."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2).to(tl.int64)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_mask = rows < q_len
    tokens = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + dims[None, :] * stride_qd,
                mask=row_mask[:, None], other=0.0).to(kv_ptr.dtype.element_ty)
    q_pos = context + rows
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    hi = tl.minimum(seq_len, context + (tile + 1) * BLOCK_M)
    unmasked = (context + tile * BLOCK_M) // BLOCK_N * BLOCK_N
    cache = kv_ptr + (head // GROUP) * stride_ch + dims[None, :] * stride_cd
    block_table = block_tables_ptr + seq * stride_bt
    for start in range(0, unmasked, BLOCK_N):
        m, l_sum, acc = _prefill_tile_step(
            q, m, l_sum, acc, start, hi, q_pos, cache, block_table, qk_scale, stride_cb,
            stride_ckv, stride_ct, BLOCK_N, BLOCK_SIZE, PRECISION, UPCAST, False)
    for start in range(unmasked, hi, BLOCK_N):
        m, l_sum, acc = _prefill_tile_step(
            q, m, l_sum, acc, start, hi, q_pos, cache, block_table, qk_scale, stride_cb,
            stride_ckv, stride_ct, BLOCK_N, BLOCK_SIZE, PRECISION, UPCAST, True)
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_ot + head * stride_oh + dims[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


# fmt: on


def _check(query: torch.Tensor | None, kv_layer: torch.Tensor) -> None:
    if kv_layer.dim() != 5 or kv_layer.shape[1] != 2:
        raise ValueError(
            f"kv_layer must be [num_blocks, 2, block_size, num_kv_heads, head_dim], "
            f"got shape {tuple(kv_layer.shape)}"
        )
    head_dim = kv_layer.shape[-1]
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(
            f"the Triton attention backend needs head_dim a power of two in [16, 256], "
            f"got {head_dim}; use the 'torch' backend for this model"
        )
    if kv_layer.dtype not in _DTYPES:
        raise ValueError(f"unsupported KV cache dtype {kv_layer.dtype}; use fp32, bf16 or fp16")
    _check_device(kv_layer)
    if query is not None:
        if query.shape[-1] != head_dim or query.shape[1] % kv_layer.shape[3]:
            raise ValueError(
                f"query {tuple(query.shape)} does not fit kv_layer {tuple(kv_layer.shape)}: "
                "head_dim must match and num_heads be a multiple of num_kv_heads"
            )
        if query.dtype not in _DTYPES:
            raise ValueError(f"unsupported query dtype {query.dtype}; use fp32, bf16 or fp16")


INTERPRETED = not isinstance(_decode_kernel, triton.runtime.JITFunction)
"""True when ``TRITON_INTERPRET=1`` was set before triton was imported: the kernels then run
in Triton's interpreter, on CPU tensors (slowly; for tests); otherwise they need CUDA tensors."""


def _check_device(tensor: torch.Tensor) -> None:
    if tensor.device.type == "cpu" and not INTERPRETED:
        raise ValueError(
            "Triton kernels need CUDA tensors; to run them on CPU (tests only) set "
            "TRITON_INTERPRET=1 before triton is first imported"
        )


def _output(query: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if out.shape != query.shape or out.dtype != query.dtype or out.device != query.device:
        raise ValueError(
            f"out must match query ({tuple(query.shape)}, {query.dtype}, {query.device}), "
            f"got {tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    return out


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _precision(dtype: torch.dtype) -> str:
    # fp32 caches keep full fp32 products (no TF32) to match the reference closely.
    return "ieee" if dtype == torch.float32 else "tf32"


PREFILL_TILES_HEAD_DIM_128 = (64, 64, 4, 2)
"""(BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel at head_dim 128."""


def prefill_tiles(head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel for ``head_dim``."""
    if head_dim <= 64:
        return 64, 64, 4, 3
    if head_dim <= 128:
        return PREFILL_TILES_HEAD_DIM_128
    return 32, 32, 4, 2


def triton_write_kv_slots(
    kv_layer: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_block_ids: torch.Tensor,
    slot_offsets: torch.Tensor,
) -> None:
    """kv_layer[b, 0, o] = key[i]; kv_layer[b, 1, o] = value[i] for each token i; no other
    element of the cache is written."""
    _check(None, kv_layer)
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    _, _, _, num_kv_heads, head_dim = kv_layer.shape
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        kv_layer,
        slot_block_ids,
        slot_offsets,
        *key.stride(),
        *value.stride(),
        *kv_layer.stride(),
        num_kv_heads,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        num_warps=4,
    )


def triton_paged_decode_attention(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
    *,
    split_tokens: int = DECODE_SPLIT_TOKENS,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence: ``query`` [B, Hq, D] over each sequence's first
    ``seq_lens[b]`` cached tokens -> [B, Hq, D] in ``query``'s dtype (written into ``out``
    when given, and returned).

    Contexts longer than ``split_tokens`` are cut into at most ``MAX_DECODE_SPLITS`` splits
    that run in parallel; a second kernel merges their partial softmaxes. ``max_seq_len``
    only sizes the split count: each sequence divides its own context among the splits."""
    _check(query, kv_layer)
    batch, num_heads, head_dim = query.shape
    out = _output(query, out)
    if batch == 0:
        return out
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    num_kv_heads, block_size = kv_layer.shape[3], kv_layer.shape[2]
    group = num_heads // num_kv_heads
    block_n = 64 if head_dim <= 64 else 32
    num_splits = min(max(1, math.ceil(max_seq_len / max(split_tokens, 1))), MAX_DECODE_SPLITS)
    if query.device.type == "cuda":
        # Split only as far as needed to give every SM a few programs.
        wanted = 4 * _num_sms(query.device.index or 0) // (batch * num_kv_heads)
        num_splits = max(1, min(num_splits, wanted))
    if num_splits > 1:
        part_acc = torch.empty(
            (batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device
        )
        part_ml = torch.empty(
            (batch, num_heads, num_splits, 2), dtype=torch.float32, device=query.device
        )
    else:
        part_acc = part_ml = out  # unused by the single-pass kernel
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        query,
        kv_layer,
        block_tables,
        seq_lens,
        out,
        part_acc,
        part_ml,
        scale * _LOG2E,
        *query.stride(),
        *out.stride(),
        *kv_layer.stride(),
        block_tables.stride(0),
        num_heads,
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        NUM_SPLITS=num_splits,
        PRECISION=_precision(kv_layer.dtype),
        UPCAST=INTERPRETED,
        num_warps=4,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            part_acc,
            part_ml,
            out,
            *out.stride(),
            num_heads,
            NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim,
            num_warps=4,
        )
    return out


def triton_paged_prefill_attention(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    query_lens_cpu: list[int] | None = None,
    seq_lens_cpu: list[int] | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunks of new tokens over cached context: sequence ``i``'s queries
    ``query[query_start_loc[i]:query_start_loc[i+1]]`` are the LAST tokens of its
    ``seq_lens[i]``-token context, attending causally -> same shape and dtype as ``query``
    (written into ``out`` when given, and returned).

    ``seq_lens_cpu`` is accepted for parity with the reference; only the query lengths are
    needed on the host (to size the launch grid)."""
    _check(query, kv_layer)
    num_tokens, num_heads, head_dim = query.shape
    out = _output(query, out)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    if query_lens_cpu is None:
        query_lens_cpu = (query_start_loc[1:] - query_start_loc[:-1]).tolist()
    block_m, block_n, num_warps, num_stages = prefill_tiles(head_dim)
    num_tiles = triton.cdiv(max(query_lens_cpu), block_m)
    if num_tiles == 0:
        return out
    _prefill_kernel[(num_tiles, num_heads, num_seqs)](
        query,
        kv_layer,
        query_start_loc,
        seq_lens,
        block_tables,
        out,
        scale * _LOG2E,
        *query.stride(),
        *out.stride(),
        *kv_layer.stride(),
        block_tables.stride(0),
        GROUP=num_heads // kv_layer.shape[3],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=kv_layer.shape[2],
        PRECISION=_precision(kv_layer.dtype),
        UPCAST=INTERPRETED,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


class TritonAttentionBackend(AttentionBackend):
    """Paged attention with the Triton kernels above; stateless, dispatches like the torch
    backend (the batch's decodes first, then its prefill chunks)."""

    name = "triton"

    def write_kv(
        self,
        kv_layer: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        triton_write_kv_slots(kv_layer, key, value, meta.slot_block_ids, meta.slot_offsets)

    def decode(
        self,
        query: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        triton_paged_decode_attention(
            query,
            kv_layer,
            meta.decode_block_tables,
            meta.decode_seq_lens,
            scale,
            meta.max_decode_seq_len or None,
            out=out,
        )

    def prefill(
        self,
        query: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        triton_paged_prefill_attention(
            query,
            kv_layer,
            meta.prefill_query_start_loc,
            meta.prefill_seq_lens,
            meta.prefill_block_tables,
            scale,
            meta.prefill_query_lens_cpu,
            meta.prefill_seq_lens_cpu,
            out=out,
        )
