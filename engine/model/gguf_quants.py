"""Dequantize GGUF tensor bytes into float tensors, in torch (on the target device).

Block layouts are ggml's (``ggml-common.h``): F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
(32-element blocks) and the k-quants Q4_K, Q5_K, Q6_K (256-element super-blocks), computed
in float32 in ggml's order of operations, then cast. Other types that the ``gguf`` package
can dequantize (Q2_K, Q3_K, the IQ types, ...) go through its numpy reference on the CPU;
anything else raises ``CheckpointError`` naming the type. tests/test_gguf.py checks every
type above against ``gguf.quants.dequantize``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pdserve.engine.model.checkpoint import CheckpointError
from pdserve.engine.model.gguf import block_layout, type_name

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q4_K, Q5_K, Q6_K, BF16 = 12, 13, 14, 30


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Bytes ``[start, start + 2)`` of each block as float16 -> float32 ``[n, 1]``."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``[n, 16]`` packed bytes -> ``[n, 32]``: low nibbles first, then high (ggml's order)."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """``[n, 4]`` bytes holding 32 fifth bits -> ``[n, 32]`` values 0 or 16."""
    bits = qh.contiguous().view(torch.int32)  # [n, 1], little-endian as ggml reads it
    shifts = torch.arange(32, device=qh.device, dtype=torch.int32)
    return ((bits >> shifts) & 1).to(torch.uint8) << 4


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * (_nibbles(b[:, 2:18]).to(torch.int8) - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * _nibbles(b[:, 4:20]).float() + _half(b, 2)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = (_nibbles(b[:, 6:22]) | _high_bits(b[:, 2:6])).to(torch.int8) - 16
    return _half(b, 0) * q.float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:24]) | _high_bits(b[:, 4:8])
    return _half(b, 0) * q.float() + _half(b, 2)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * b[:, 2:34].contiguous().view(torch.int8).float()


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in a k-quant's 12 bytes (``get_scale_min_k4``)."""
    scales = torch.cat((s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)), dim=1)
    mins = torch.cat((s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)), dim=1)
    return scales.float(), mins.float()


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, mins = _k_scales(b[:, 4:16])
    q = b[:, 16:144].reshape(n, 4, 1, 32)
    q = torch.cat((q & 0x0F, q >> 4), dim=2).reshape(n, 8, 32).float()
    y = (_half(b, 0) * scales)[:, :, None] * q - (_half(b, 2) * mins)[:, :, None]
    return y.reshape(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, mins = _k_scales(b[:, 4:16])
    qh = b[:, 16:48]
    ql = b[:, 48:176].reshape(n, 4, 1, 32)
    q = torch.cat((ql & 0x0F, ql >> 4), dim=2).reshape(n, 8, 32)
    shifts = torch.arange(8, device=b.device, dtype=torch.uint8)[None, :, None]
    q = (q | (((qh[:, None, :] >> shifts) & 1) << 4)).float()
    y = (_half(b, 0) * scales)[:, :, None] * q - (_half(b, 2) * mins)[:, :, None]
    return y.reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 64)
    qh = b[:, 128:192].reshape(n, 2, 32)
    lo, hi = ql[:, :, :32], ql[:, :, 32:]
    q = torch.stack((
        (lo & 0x0F) | ((qh & 3) << 4),
        (hi & 0x0F) | (((qh >> 2) & 3) << 4),
        (lo >> 4) | (((qh >> 4) & 3) << 4),
        (hi >> 4) | (((qh >> 6) & 3) << 4),
    ), dim=2).reshape(n, 256)
    q = (q.to(torch.int8) - 32).float()
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    return (_half(b, 208) * scales).repeat_interleave(16, dim=1) * q


_BLOCKS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    Q4_0: _q4_0, Q4_1: _q4_1, Q5_0: _q5_0, Q5_1: _q5_1, Q8_0: _q8_0,
    Q4_K: _q4_k, Q5_K: _q5_k, Q6_K: _q6_k,
}
TORCH_TYPES = frozenset({F32, F16, BF16, *_BLOCKS})
"""Type ids dequantized here in torch (the rest fall back to the gguf package)."""


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...],
               dtype: torch.dtype) -> torch.Tensor:
    """``raw`` (the tensor's bytes, uint8, on any device) -> a ``shape`` tensor of ``dtype``
    on the same device."""
    count = 1
    for d in shape:
        count *= d
    if ggml_type == F32:
        out = raw.view(torch.float32)
    elif ggml_type == F16:
        out = raw.view(torch.float16)
    elif ggml_type == BF16:
        out = raw.view(torch.bfloat16)
    elif ggml_type in _BLOCKS:
        _, block_bytes = block_layout(ggml_type)
        out = _BLOCKS[ggml_type](raw.reshape(-1, block_bytes))
    else:
        out = _reference(raw, ggml_type)
    if out.numel() != count:
        raise CheckpointError(f"a {type_name(ggml_type)} tensor of {raw.numel()} bytes holds "
                              f"{out.numel()} values, its shape {list(shape)} needs {count}")
    return out.reshape(shape).to(dtype)


def _reference(raw: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """The gguf package's numpy dequantizer, for the types not written in torch here."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as np_dequantize

    try:
        values = np_dequantize(raw.cpu().numpy(), GGMLQuantizationType(ggml_type))
    except (NotImplementedError, ValueError, KeyError):
        raise CheckpointError(f"quantization type {type_name(ggml_type)} is not supported; "
                              "supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, "
                              "Q5_K, Q6_K, and what the installed gguf package dequantizes"
                              ) from None
    return torch.from_numpy(values.astype("float32", copy=False)).to(raw.device)
