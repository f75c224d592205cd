"""The requests of a serving benchmark and when to send them.

Prompts: ShareGPT first turns (text; the server counts their tokens), synthetic random token
ids of given lengths, or the lengths of a trace (the Azure LLM inference CSV, or Mooncake
JSONL whose ``hash_ids`` become shared token runs, so that requests sharing a prefix in the
trace share it here). Token-id prompts make input lengths exact on every server under test.

Arrivals: all at once (rate ``inf``), a gamma process of the given rate (``burstiness`` 1 is
Poisson; below 1 burstier, above 1 more regular; the shape the common serving benchmarks
use), or the trace's own timestamps times ``time_scale`` (0.5 replays twice as fast).
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from pdserve.bench.trace import data_path, read_mooncake, resolve_trace

FIRST_TOKEN_ID = 3
"""Random prompt ids start here: 0..2 are the built-in checkpoints' BOS, EOS and PAD."""
SHAREGPT = "sharegpt_v3_first_turns_1000.json"
AZURE_CODE = "azure_llm_inference_2023_code.csv"


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One request to send: its prompt, expected lengths, and send time since the start."""

    prompt: str | list[int]
    prompt_len: int
    """Tokens (exact for id prompts; 0 = the server will tell, for text)."""
    output_len: int
    """Output tokens asked for (sent with ``ignore_eos``)."""
    arrival_s: float = 0.0


@dataclass(frozen=True, slots=True)
class TraceRow:
    timestamp_s: float
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()


def read_azure_trace(path: str | Path | None = None, limit: int | None = None) -> list[TraceRow]:
    """Rows of an Azure LLM inference trace CSV with timestamps relative to the first."""
    path = data_path(AZURE_CODE) if path is None else Path(path)
    rows: list[TraceRow] = []
    start: datetime | None = None
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, rec in enumerate(csv.DictReader(f), 2):
            if limit is not None and len(rows) >= limit:
                break
            try:
                ts = datetime.fromisoformat(rec["TIMESTAMP"].strip()[:26])
                start = start or ts
                rows.append(TraceRow((ts - start).total_seconds(), int(rec["ContextTokens"]),
                                     int(rec["GeneratedTokens"])))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: not an Azure trace row ({e})") from e
    return rows


def read_trace(name_or_path: str, fmt: str, limit: int | None = None) -> list[TraceRow]:
    """``fmt`` 'azure' (CSV; 'azure' alone names the shared code trace) or 'mooncake'
    (JSONL; 'conversation' / 'synthetic' name the shared ones)."""
    if fmt == "azure":
        return read_azure_trace(None if name_or_path == "azure" else name_or_path, limit)
    if fmt == "mooncake":
        return [TraceRow(r.timestamp_s, r.input_length, r.output_length, r.hash_ids)
                for r in read_mooncake(resolve_trace(name_or_path), limit)]
    raise ValueError(f"unknown trace format {fmt!r}; use azure or mooncake")


def scale_len(n: int, scale: float, lo: int, hi: int | None) -> int:
    """``n * scale`` rounded, clipped to ``[lo, hi]``."""
    out = max(lo, round(n * scale))
    return min(out, hi) if hi is not None else out


def trace_prompts(rows: list[TraceRow], *, vocab_size: int, length_scale: float = 1.0,
                  max_input_len: int | None = None, max_output_len: int | None = None,
                  block_tokens: int = 512, seed: int = 0) -> list[WorkItem]:
    """Token-id prompts with a trace's input lengths times ``length_scale`` and its output
    lengths (both clipped to the maxima), arrivals at its timestamps.

    Rows with ``hash_ids`` (Mooncake) build prompts from one fixed random run of
    ``block_tokens * length_scale`` tokens per id, so shared leading ids share a prefix."""
    rng = random.Random(seed)
    block = max(1, round(block_tokens * length_scale))
    runs: dict[int, list[int]] = {}
    items = []
    for row in rows:
        n_in = scale_len(row.input_len, length_scale, 1, max_input_len)
        n_out = scale_len(row.output_len, 1.0, 1, max_output_len)
        if row.hash_ids:
            ids: list[int] = []
            for h in row.hash_ids:
                if h not in runs:
                    r = random.Random(h * 7919 + seed)
                    runs[h] = [r.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(block)]
                ids += runs[h]
            ids = ids[:n_in] + [rng.randrange(FIRST_TOKEN_ID, vocab_size)
                                for _ in range(n_in - len(ids))]
        else:
            ids = [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(n_in)]
        items.append(WorkItem(ids, n_in, n_out, row.timestamp_s))
    return items


def synthetic_prompts(n: int, input_len: int, output_len: int, *, vocab_size: int,
                      range_ratio: float = 0.0, seed: int = 0) -> list[WorkItem]:
    """Random-id prompts; lengths uniform in ``len * [1 - range_ratio, 1 + range_ratio]``."""
    rng = random.Random(seed)

    def length(base: int) -> int:
        lo, hi = math.floor(base * (1 - range_ratio)), math.ceil(base * (1 + range_ratio))
        return max(1, rng.randint(lo, hi))

    items = []
    for _ in range(n):
        n_in = length(input_len)
        ids = [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(n_in)]
        items.append(WorkItem(ids, n_in, length(output_len)))
    return items


def sharegpt_prompts(n: int, output_len: int, *, path: str | Path | None = None,
                     seed: int = 0) -> list[WorkItem]:
    """``n`` first-turn ShareGPT prompts (text), sampled without replacement (with, past the
    file's size), each asking for ``output_len`` tokens."""
    path = data_path(SHAREGPT) if path is None else Path(path)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    texts = [c["conversations"][0]["value"] for c in data
             if c.get("conversations") and c["conversations"][0].get("value")]
    rng = random.Random(seed)
    picked = rng.sample(texts, n) if n <= len(texts) else [rng.choice(texts) for _ in range(n)]
    return [WorkItem(t, 0, output_len) for t in picked]


def with_arrivals(items: list[WorkItem], rate: float, burstiness: float = 1.0,
                  seed: int = 0) -> list[WorkItem]:
    """Send times for ``items``: all at 0 for an infinite rate, else gamma-distributed gaps
    of mean ``1 / rate`` and shape ``burstiness``, the first request at 0."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"request rate and burstiness must be positive, got {rate}, "
                         f"{burstiness}")
    if math.isinf(rate):
        return [_at(it, 0.0) for it in items]
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness),
                                             size=len(items))
    times = np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if items else []
    return [_at(it, float(t)) for it, t in zip(items, times, strict=True)]


def replay(items: list[WorkItem], time_scale: float = 1.0) -> list[WorkItem]:
    """Keep each item's trace timestamp as its send time, scaled, relative to the first."""
    if time_scale <= 0:
        raise ValueError(f"time scale must be positive, got {time_scale}")
    t0 = min((it.arrival_s for it in items), default=0.0)
    return [_at(it, (it.arrival_s - t0) * time_scale) for it in items]


def _at(item: WorkItem, t: float) -> WorkItem:
    return WorkItem(item.prompt, item.prompt_len, item.output_len, t)
