"""The decoder's elementwise stages as one C++ op each on the CPU (``engine/csrc/fused_ops.cpp``):
the CPU twin of ``pdserve.engine.model.triton_ops``, with the same functions, contracts and
roundings. Import it only where ``pdserve.engine.cpu_kernels.available()`` is True."""

from __future__ import annotations

import torch


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (or ``x`` when ``residual`` is None), then ``(rms_norm(s), s)``:
    RMSNorm in float32, cast back before the weight. ``x`` and ``residual`` are ``[N, D]``
    with contiguous rows, ``weight`` ``[D]``."""
    if residual is None:
        return torch.ops.pdserve_cpu.rms_norm(x, weight, eps), x
    out, summed = torch.ops.pdserve_cpu.add_rms_norm(x, residual, weight, eps)
    return out, summed


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` ``[N, heads, D]`` (last dim contiguous) with ``cos``/``sin``
    ``[N, 1, D/2]`` in the rotate_half convention -> a new contiguous ``[N, heads, D]``."""
    return torch.ops.pdserve_cpu.rotate(x, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up`` ``[N, 2 I]`` = ``[gate | up]`` -> ``[N, I]``."""
    return torch.ops.pdserve_cpu.silu_mul(gate_up)
