"""The GPU benchmark's arithmetic, exactly, for the Llama-3-8B shape; its clean refusal to
run without CUDA; and its measuring code on a tiny shape on CPU (the figures need a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from pdserve.bench.gpu import (
    LLAMA3_8B,
    DecodeRow,
    PeerRow,
    decode_bytes,
    kv_bytes_per_token,
    kv_cache_blocks,
    main,
    measure_decode,
    measure_prefill,
    param_counts,
    prefill_flops,
    random_model,
    report,
    roofline_fraction,
)

REPO = Path(__file__).resolve().parents[1]


def test_llama3_8b_parameter_counts_are_exact() -> None:
    p = param_counts(LLAMA3_8B)
    assert p.embedding == p.lm_head == 128256 * 4096 == 525_336_576
    # qkv 4096x6144 + o 4096x4096 + gate_up 2x14336x4096 + down 14336x4096, 32 layers
    assert p.layer_matmuls == 32 * 218_103_808 == 6_979_321_856
    assert p.norms == 32 * 2 * 4096 + 4096
    assert p.total == 8_030_261_248  # Meta-Llama-3-8B's published count


def test_decode_bytes_are_weights_plus_every_context() -> None:
    assert kv_bytes_per_token(LLAMA3_8B) == 32 * 2 * 8 * 128 * 2 == 131_072
    weights = (6_979_321_856 + 525_336_576 + 266_240) * 2  # all but the embedding table
    assert decode_bytes(LLAMA3_8B, 1, 1024) == weights + 4096 * 2 + 1024 * 131_072
    assert decode_bytes(LLAMA3_8B, 1, 1024) == 15_144_075_264
    assert decode_bytes(LLAMA3_8B, 64, 1024) == 23_600_308_224
    assert decode_bytes(LLAMA3_8B, 256, 8192) == 289_889_853_440


def test_prefill_flops_split_into_matmuls_and_causal_attention() -> None:
    matmul, attention = prefill_flops(LLAMA3_8B, 512)
    assert matmul == 2 * 6_979_321_856 * 512 + 2 * 525_336_576 == 7_147_876_253_696
    assert attention == 2 * 32 * 32 * 128 * 512 * 513 == 68_853_694_464
    assert prefill_flops(LLAMA3_8B, 8192) == (114_350_259_961_856, 17_594_333_528_064)


def test_roofline_fraction_and_cache_sizing() -> None:
    assert roofline_fraction(10**9, 2e12, 1e-3) == pytest.approx(0.5)
    assert kv_cache_blocks(64, 1024) == 4096
    assert kv_cache_blocks(1, 1025) == 65


def test_without_cuda_the_script_says_so_and_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([]) == 2
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "pdserve.bench.gpu", "--no-hf"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_decode_and_prefill_measurements_run_on_a_tiny_shape() -> None:
    """The measuring code end to end on CPU (Triton interpreted, no graphs): a smoke test of
    the wiring; the numbers mean nothing here."""
    pytest.importorskip("triton")
    from pdserve.engine.attention.triton_backend import INTERPRETED

    if not INTERPRETED:
        pytest.skip("needs triton's CPU interpreter")
    tiny = replace(
        LLAMA3_8B,
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    model = random_model(tiny, "cpu")
    row = measure_decode(model, tiny, 3, 40, bandwidth=1e9, iters=1, eager=True)
    assert row.skipped is None and row.bytes_per_step == decode_bytes(tiny, 3, 40)
    assert row.step_ms_graphs and row.step_ms_eager and row.roofline_fraction
    assert row.tokens_per_s == pytest.approx(3 / (row.step_ms_graphs / 1e3))
    prefill = measure_prefill(model, tiny, 20, matmul_peak=1e12, iters=1)
    assert prefill.mfu > 0 and 0 < prefill.attention_share < 1
    skipped = DecodeRow(256, 8192, 256.0, decode_bytes(tiny, 256, 8192), skipped="too big")
    result = {
        "device": "cpu",
        "model": "tiny",
        "params": param_counts(tiny).total,
        "copy_bandwidth_GBps": 1.0,
        "matmul_TFLOPs": 1.0,
        "decode": [asdict(row), asdict(skipped)],
        "prefill": [asdict(prefill)],
        "hf": [asdict(PeerRow(3, 40, 8, 10.0))],
        "targets": {"decode b3 ctx40 pdserve/hf": 1.5},
    }
    text = report(result)
    assert "of roofline" in text and "too big" in text and "pdserve/hf: 1.50" in text
    json.dumps(result)
