"""The decoder's linear layers on the CPU with their weights packed once for oneDNN.

``F.linear`` on a bfloat16 CPU tensor calls oneDNN, which first reorders the plain
``[out, in]`` weight into its blocked layout (for AMX or AVX-512 BF16 tiles), on every call:
a decode step at small batch reads and writes each weight twice before it multiplies. Packing
the weights once at load time (``torch.ops.mkldnn._reorder_linear_weight``, as inductor's
weight freezing does) removes that. Measured on one core of a Xeon with AMX, SmolLM2-135M's
shapes, bfloat16: the fused gate/up projection 258 -> 176 us at 1 row and 476 -> 271 us at
64, the 49,152-row vocabulary projection 7.3 -> 2.9 ms; the results are bit-identical to
``F.linear``'s at every row count (the packing takes no batch-size hint, so one packed weight
serves decode and prefill alike).

Only bfloat16 is packed, and only where oneDNN has native bfloat16 kernels
(``torch.ops.mkldnn._is_mkldnn_bf16_supported``): float32 goes through MKL, whose packed
path gives different roundings at one row, and on a CPU without AVX-512 bfloat16 is emulated
either way. A packed weight is an opaque oneDNN tensor: ``linear`` dispatches on it, and
nothing else reads these weights after loading.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

PACKED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
"""Each decoder layer's weights that are packed (biases stay plain)."""


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``pack_model`` packs a model of ``dtype`` on ``device``."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    try:
        return bool(ops._is_mkldnn_bf16_supported()) and hasattr(ops, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[out, in]`` as one packed oneDNN tensor."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a plain or a packed ``weight`` (``x`` 2-D)."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def pack_model(model: nn.Module) -> bool:
    """Pack ``model``'s layer weights and its output projection in place when
    ``packing_supported``; returns whether it did. A tied output projection gets a packed
    copy (``packed_head``) beside the embedding, which stays plain for the lookup."""
    if not packing_supported(model.dtype, model.device):
        return False
    for layer in model.layers:
        for name in PACKED:
            setattr(layer, name, nn.Parameter(pack(getattr(layer, name)), requires_grad=False))
    if model.lm_head is not None:
        model.lm_head = nn.Parameter(pack(model.lm_head), requires_grad=False)
    else:
        model.packed_head = pack(model.embed_tokens)
    logger.info("linear weights packed for oneDNN (%s)", model.dtype)
    return True
