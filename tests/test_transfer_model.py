"""The KV transfer model behind the GPU figures of bench/kvtransfer (pure arithmetic)."""

from __future__ import annotations

import pytest

from pdserve.bench.transfer_model import (
    IB400,
    LLAMA_8B,
    LLAMA_70B,
    NVLINK4,
    estimate,
    exposed_seconds,
    markdown,
    rank_bytes,
    table,
)


def test_kv_bytes_per_token_of_the_llama_shapes() -> None:
    assert LLAMA_8B.kv_bytes_per_token_per_layer == 2 * 8 * 128 * 2 == 4096
    assert LLAMA_8B.kv_bytes_per_token == 32 * 4096 == 128 * 1024
    assert LLAMA_70B.kv_bytes_per_token == 80 * 4096 == 320 * 1024


def test_each_rank_moves_its_share_of_the_heads() -> None:
    assert rank_bytes(LLAMA_8B, 4096, 1) == 4096 * 128 * 1024 == 512 * 2**20
    assert [rank_bytes(LLAMA_70B, 4096, tp) for tp in (1, 2, 4, 8)] == [
        1280 * 2**20, 640 * 2**20, 320 * 2**20, 160 * 2**20]
    with pytest.raises(ValueError, match="does not divide"):
        rank_bytes(LLAMA_8B, 16, 3)


def test_transfer_time_and_share_follow_from_bytes_and_bandwidth() -> None:
    e = estimate(LLAMA_8B, 4096, 1, NVLINK4, chunk_tokens=512)
    assert e.transfer_s == pytest.approx(512 * 2**20 / 450e9)
    assert e.share == pytest.approx(e.transfer_s / e.prefill_s)
    # TP halves both the bytes per rank and the prefill time: the share stays.
    e2 = estimate(LLAMA_8B, 4096, 2, NVLINK4, chunk_tokens=512)
    assert e2.transfer_s == pytest.approx(e.transfer_s / 2)
    assert e2.share == pytest.approx(e.share)
    slow = estimate(LLAMA_70B, 4096, 8, IB400, chunk_tokens=512)
    assert slow.transfer_s == pytest.approx(160 * 2**20 / 48e9)


def test_streaming_exposes_the_last_chunk_or_the_backlog() -> None:
    assert exposed_seconds(8.0, 16.0, 8) == pytest.approx(1.0)  # link keeps up: last chunk
    assert exposed_seconds(16.0, 8.0, 8) == pytest.approx(2.0 + 7 * 1.0)  # link is the bottleneck
    assert exposed_seconds(5.0, 1.0, 1) == pytest.approx(5.0)  # not streamed: all of it
    with pytest.raises(ValueError):
        exposed_seconds(1.0, 1.0, 0)


def test_table_covers_both_models_every_tp_and_link() -> None:
    rows = table(4096, 512)
    assert len(rows) == 2 * 4 * 3
    assert {(r.model, r.tp) for r in rows} == {
        (m, tp) for m in ("Llama-3.1-8B", "Llama-3.1-70B") for tp in (1, 2, 4, 8)}
    text = markdown(rows)
    assert text.count("\n") == len(rows) + 1 and "| Llama-3.1-70B | 8 |" in text
