"""Paged attention backends and the choice between them.

``torch`` is the reference (and the CPU path where no C++ compiler exists); ``cpu`` runs our
C++ kernels, which read the paged cache in place (built on first use, see
``cpu_kernels``); ``triton`` runs our Triton kernels (CUDA); ``flash_attn`` runs vLLM's
FlashAttention build where ``vllm_flash_attn`` imports. Backends other than ``torch`` are
imported only when selected, so a missing optional package never breaks the engine.
"""

from __future__ import annotations

import logging

import torch

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata

logger = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "torch", "cpu", "triton", "flash_attn")

__all__ = ["BACKEND_NAMES", "AttentionBackend", "AttentionMetadata", "get_attention_backend"]


def _triton_backend(device: torch.device) -> AttentionBackend:
    from pdserve.engine.attention import triton_backend

    if device.type != "cuda" and not triton_backend.INTERPRETED:
        raise ValueError(
            f"the 'triton' attention backend needs a CUDA device, got {device}; "
            "use 'torch' (or set TRITON_INTERPRET=1 before importing triton, for tests)"
        )
    return triton_backend.TritonAttentionBackend()


def get_attention_backend(name: str | None, device: torch.device) -> AttentionBackend:
    """The backend called ``name`` for tensors on ``device``.

    ``None`` or ``"auto"``: ``triton`` on CUDA when triton imports; on the CPU ``cpu`` when
    its kernels build here (one logged warning otherwise), else ``torch``. An explicit name
    that cannot run here raises ``ValueError`` (unknown name, wrong device, kernels that do
    not build) or ``ImportError`` (its package is missing), with a message naming the
    alternative.
    """
    choice = (name or "auto").lower()
    device = torch.device(device)
    if choice not in BACKEND_NAMES:
        raise ValueError(
            f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}"
        )
    if choice == "auto":
        if device.type == "cuda":
            try:
                return _triton_backend(device)
            except ImportError as exc:
                logger.warning("Triton unavailable (%s); using the torch attention backend", exc)
            choice = "torch"
        else:
            from pdserve.engine import cpu_kernels

            choice = "cpu" if device.type == "cpu" and cpu_kernels.available() else "torch"
    if choice == "torch":
        from pdserve.engine.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if choice == "cpu":
        from pdserve.engine import cpu_kernels

        if device.type != "cpu":
            raise ValueError(f"the 'cpu' attention backend needs a CPU device, got {device}")
        if not cpu_kernels.available():
            raise ValueError(
                "the 'cpu' attention backend's kernels could not be built on this machine "
                "(see the warning logged above); use 'torch'"
            )
        from pdserve.engine.attention.cpu_backend import CpuAttentionBackend

        return CpuAttentionBackend()
    if choice == "triton":
        return _triton_backend(device)
    if device.type != "cuda":
        raise ValueError(
            f"the 'flash_attn' attention backend needs a CUDA device, got {device}; use 'torch'"
        )
    from pdserve.engine.attention.flash_attn_backend import FlashAttnBackend

    return FlashAttnBackend()
