"""The requests a simulation replays: arrival, prompt and output lengths, and the prompt's
block hashes (so that the live prefix index sees which requests share a prefix).

Sources: a trace (Azure LLM inference CSV: lengths only; Mooncake JSONL: lengths and
prefix-chained ``hash_ids``), the token-id prompts of ``pdserve bench serve`` (exact block
hashes, as the router computes them), or a synthetic Poisson stream drawing lengths from a
trace (the planner's scale runs). Mooncake ``hash_ids`` name 512-token blocks; the
simulation then indexes prefixes at that granularity (``Workload.hash_block_tokens``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pdserve.bench.serve_workload import TraceRow, read_trace
from pdserve.bench.trace import MOONCAKE_BLOCK_TOKENS, BlockHasher
from pdserve.engine.hashing import hash_blocks


@dataclass(frozen=True, slots=True)
class Workload:
    """Requests sorted by arrival, as parallel arrays (one row per request)."""

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    block_hashes: tuple[tuple[int, ...], ...]
    """Per request; empty tuples when the source says nothing of shared prefixes."""
    hash_block_tokens: int
    """Tokens per block hash."""
    name: str = ""

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if not (len(self.prompt_tokens) == len(self.output_tokens) == len(self.block_hashes)
                == n):
            raise ValueError("workload arrays differ in length")
        if n and (np.any(self.prompt_tokens < 1) or np.any(self.output_tokens < 1)):
            raise ValueError("every request needs >= 1 prompt and >= 1 output token")
        if n and np.any(np.diff(self.arrival_s) < 0):
            raise ValueError("arrivals must be sorted")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) else 0.0

    @property
    def has_prefixes(self) -> bool:
        return any(self.block_hashes)

    def scaled(self, rate_scale: float) -> Workload:
        """The same requests arriving ``rate_scale`` times as fast."""
        if rate_scale <= 0:
            raise ValueError(f"rate scale must be positive, got {rate_scale}")
        return Workload(self.arrival_s / rate_scale, self.prompt_tokens, self.output_tokens,
                        self.block_hashes, self.hash_block_tokens, self.name)


def from_rows(rows: Sequence[TraceRow], *, name: str = "", length_scale: float = 1.0,
              max_prompt: int | None = None, max_output: int | None = None) -> Workload:
    """A workload of trace rows (``pdserve.bench.serve_workload.read_trace``), arrivals
    relative to the first; lengths times ``length_scale``, clipped to the maxima."""
    if not rows:
        raise ValueError("empty trace")
    hasher = BlockHasher()
    t0 = rows[0].timestamp_s
    arrival = np.array([r.timestamp_s - t0 for r in rows], dtype=float)
    prompt = np.maximum(1, np.rint(np.array([r.input_len for r in rows]) * length_scale))
    output = np.maximum(1, np.array([r.output_len for r in rows]))
    if max_prompt is not None:
        prompt = np.minimum(prompt, max_prompt)
    if max_output is not None:
        output = np.minimum(output, max_output)
    block = max(1, round(MOONCAKE_BLOCK_TOKENS * length_scale))
    hashes = []
    for r, n in zip(rows, prompt, strict=True):
        ids = r.hash_ids[: int(n) // block]  # full blocks of the (scaled, clipped) prompt
        hashes.append(hasher.block_hashes(ids) if ids else ())
    order = np.argsort(arrival, kind="stable")
    return Workload(arrival[order], prompt[order].astype(np.int64), output[order].astype(np.int64),
                    tuple(hashes[i] for i in order), block, name)


def load_trace(name_or_path: str, fmt: str | None = None, *, limit: int | None = None,
               **kwargs: float | int | None) -> Workload:
    """A trace file: ``fmt`` 'azure' (CSV) or 'mooncake' (JSONL), guessed from the suffix
    when None; 'azure', 'conversation' and 'synthetic' name the shipped traces."""
    if fmt is None:
        lower = name_or_path.lower()
        fmt = "azure" if lower == "azure" or lower.endswith(".csv") else "mooncake"
    rows = read_trace(name_or_path, fmt, limit)
    return from_rows(rows, name=name_or_path, **kwargs)  # type: ignore[arg-type]


def from_prompts(arrival_s: Sequence[float], prompts: Sequence[Sequence[int]],
                 output_tokens: Sequence[int], block_size: int, name: str = "") -> Workload:
    """Token-id prompts (``pdserve bench serve``'s), hashed as the router hashes them."""
    hashes = tuple(tuple(hash_blocks(list(p), block_size)) for p in prompts)
    arr = np.asarray(arrival_s, dtype=float)
    order = np.argsort(arr, kind="stable")
    return Workload(arr[order], np.array([len(prompts[i]) for i in order], dtype=np.int64),
                    np.asarray(output_tokens, dtype=np.int64)[order],
                    tuple(hashes[i] for i in order), block_size, name)


def poisson(lengths_from: Workload, rate: float, duration_s: float, seed: int = 0) -> Workload:
    """``rate`` requests/s for ``duration_s`` (Poisson arrivals), lengths drawn from
    ``lengths_from`` (no shared prefixes)."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate and duration must be positive, got {rate}, {duration_s}")
    rng = np.random.default_rng(seed)
    n = int(rng.poisson(rate * duration_s))
    arrival = np.sort(rng.uniform(0.0, duration_s, size=n))
    pick = rng.integers(0, len(lengths_from), size=n)
    return Workload(arrival, lengths_from.prompt_tokens[pick], lengths_from.output_tokens[pick],
                    ((),) * n, lengths_from.hash_block_tokens,
                    f"poisson {rate:g}/s x {duration_s:g} s ({lengths_from.name} lengths)")
