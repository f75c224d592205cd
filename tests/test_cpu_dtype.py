"""Half precision on a CPU that cannot run it fast: the engine says so when it starts, and
the flag check it relies on agrees with what torch's matmuls measure on this machine."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from pdserve.engine import Engine, EngineConfig, cpu_kernels


def _matmul_seconds(dtype: torch.dtype, n: int = 512) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def test_the_flag_check_matches_measured_bfloat16_matmuls() -> None:
    slowdown = _matmul_seconds(torch.bfloat16) / _matmul_seconds(torch.float32)
    # Emulated: 10-100x slower (about 13x at this size on a 2-core AVX2 machine, 400x at
    # 2048); native or oneDNN's AVX-512 paths: within a few times of float32.
    if cpu_kernels.half_matmuls_emulated():
        assert slowdown > 8, slowdown
    else:
        assert slowdown < 8, slowdown


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_engine_warns_once_about_emulated_half_precision(
        dtype: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pdserve"):
        Engine(EngineConfig(model="tiny", dtype=dtype, device="cpu"))
    warned = [r for r in caplog.records if "without AVX-512" in r.getMessage()]
    expected = dtype == "bfloat16" and cpu_kernels.half_matmuls_emulated()
    assert len(warned) == (1 if expected else 0), [r.getMessage() for r in warned]
    if expected:
        assert "--dtype float32" in warned[0].getMessage()
