"""Shared pytest set-up.

Triton decides between compiled kernels and its CPU interpreter when ``triton.language`` is
first imported (and when each kernel is decorated), reading ``TRITON_INTERPRET``. This file
runs before any test module is imported, so without CUDA the Triton kernels are built for the
interpreter whatever the test order. An explicit ``TRITON_INTERPRET`` is left as it is.
"""

from __future__ import annotations

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
