"""The decoder's linear layers on the CPU with their weights packed once: bfloat16 for oneDNN,
float32 for the engine's own kernel.

``F.linear`` on a bfloat16 CPU tensor calls oneDNN, which first reorders the plain
``[out, in]`` weight into its blocked layout (for AMX or AVX-512 BF16 tiles), on every call:
a decode step at small batch reads and writes each weight twice before it multiplies. Packing
the weights once at load time (``torch.ops.mkldnn._reorder_linear_weight``, as inductor's
weight freezing does) removes that. Measured on one core of a Xeon with AMX, SmolLM2-135M's
shapes, bfloat16: the fused gate/up projection 258 -> 176 us at 1 row and 476 -> 271 us at
64, the 49,152-row vocabulary projection 7.3 -> 2.9 ms; the results are bit-identical to
``F.linear``'s at every row count (the packing takes no batch-size hint, so one packed weight
serves decode and prefill alike).

bfloat16 is packed only where oneDNN has native bfloat16 kernels
(``torch.ops.mkldnn._is_mkldnn_bf16_supported``); on a CPU without AVX-512 it is emulated
either way. A packed bfloat16 weight is an opaque oneDNN tensor.

float32's ``F.linear`` is MKL's sgemm, which also copies the weight into its own layout on
every call. MKL's packed sgemm (``torch.ops.mkl._mkl_linear``) is packed for one row count
only and falls back to the unpacked call at any other. The engine's kernel
(``csrc/linear_f32.cpp``, loaded with the CPU kernels on a CPU with AVX-512) takes a weight
packed once into 48-column panels and requests the next panel while it multiplies one.
SmolLM2-135M's four layer projections over all 30 layers, two threads, weights cycled as in
a forward pass (``python -m pdserve.bench.linear_kernel``): 8 rows 35-37 -> 18-19 ms, 32 rows
48-50 -> 32-33 ms, 64 rows 74 -> 52-54 ms; one row the same as MKL, 544 rows level with it
to 5% slower; the 49,152-row vocabulary projection 3.1 -> 2.3 ms at one row and 18.6 -> 12.8
ms at 64. Each output is one float32 FMA chain over the
input features in order, so a row's result does not depend on the rows beside it (MKL's
does: one row takes a different path). A packed float32 weight is a ``PackedF32``: its
storage holds the panels, its ``out_features`` the width.

``linear`` dispatches on the packed weights; nothing else reads them after loading.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

PACKED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
"""Each decoder layer's weights that are packed (biases stay plain)."""


class PackedF32(nn.Parameter):
    """A float32 ``[out, in]`` weight packed for ``torch.ops.pdserve_cpu.linear_f32``."""

    out_features: int

    def __new__(cls, weight: torch.Tensor) -> PackedF32:
        packed = torch.ops.pdserve_cpu.pack_linear_f32(weight.detach())
        self = super().__new__(cls, packed, requires_grad=False)
        self.out_features = weight.shape[0]
        return self


def _f32_kernel() -> bool:
    from pdserve.engine import cpu_kernels

    return cpu_kernels.available() and cpu_kernels.simd_level() >= 1


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``pack_model`` packs a model of ``dtype`` on ``device``."""
    if device.type != "cpu":
        return False
    if dtype == torch.float32:
        return _f32_kernel()
    if dtype != torch.bfloat16:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    try:
        return bool(ops._is_mkldnn_bf16_supported()) and hasattr(ops, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[out, in]`` packed: a ``PackedF32`` in float32, else one oneDNN tensor."""
    if weight.dtype == torch.float32:
        return PackedF32(weight)
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a plain or a packed ``weight`` (``x`` 2-D)."""
    if isinstance(weight, PackedF32):
        return torch.ops.pdserve_cpu.linear_f32(x, weight, bias, weight.out_features)
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _parameter(packed: torch.Tensor) -> nn.Parameter:
    return packed if isinstance(packed, nn.Parameter) else nn.Parameter(packed, requires_grad=False)


def pack_model(model: nn.Module) -> bool:
    """Pack ``model``'s layer weights and its output projection in place when
    ``packing_supported``; returns whether it did. A tied output projection gets a packed
    copy (``packed_head``) beside the embedding, which stays plain for the lookup."""
    if not packing_supported(model.dtype, model.device):
        return False
    for layer in model.layers:
        for name in PACKED:
            setattr(layer, name, _parameter(pack(getattr(layer, name))))
    if model.lm_head is not None:
        model.lm_head = _parameter(pack(model.lm_head))
    else:
        model.packed_head = pack(model.embed_tokens)
    logger.info("linear weights packed for %s (%s)", "the engine's float32 kernel"
                if model.dtype == torch.float32 else "oneDNN", model.dtype)
    return True
