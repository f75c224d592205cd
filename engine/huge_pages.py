"""Large CPU tensors backed by transparent huge pages.

A decode step reads every sequence's KV blocks, scattered over a cache of gigabytes: with
4 KiB pages nearly every block costs a TLB miss and a page walk, which the attention
kernel's prefetches wait on. The same cache in 2 MiB pages reads 6-10% faster from memory
(SmolLM2's shapes, batch 64, context 512: ``python -m pdserve.bench.attention_kernel
--huge-pages on|off``).

Where the kernel allows it (``/sys/kernel/mm/transparent_hugepage/enabled`` is
``always`` or ``madvise``), the memory is advised with ``MADV_HUGEPAGE`` before its first
touch; elsewhere (another OS, THP off, a refused call) it is plain memory, with the same
contents.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import sys

import torch

logger = logging.getLogger(__name__)

MADV_HUGEPAGE = 14
HUGE_PAGE = 2 * 2**20


def _madvise(addr: int, length: int) -> bool:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), MADV_HUGEPAGE) != 0:
        logger.debug("madvise(MADV_HUGEPAGE) refused: errno %d", ctypes.get_errno())
        return False
    return True


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Asks for huge pages behind the whole pages of ``tensor``'s storage (true when the
    kernel took the advice). Only pages not yet touched are affected: call it before the
    tensor is written."""
    if tensor.device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    nbytes = tensor.untyped_storage().nbytes()
    if nbytes < HUGE_PAGE:
        return False
    start = tensor.untyped_storage().data_ptr()
    page = mmap.PAGESIZE
    first = -(-start // page) * page
    last = (start + nbytes) // page * page
    return last > first and _madvise(first, last - first)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
          huge: bool = True) -> torch.Tensor:
    """``torch.zeros``, in huge pages where that applies (see the module docstring) unless
    ``huge`` is false."""
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if huge:
        advise_huge_pages(tensor)
    return tensor.zero_()
