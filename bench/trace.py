"""Reader of Mooncake-format request traces (one JSON object a line).

Each row is ``{"timestamp": ms, "input_length": tokens, "output_length": tokens,
"hash_ids": [...]}``; ``hash_ids`` are prefix-chained ids of 512-token blocks: two requests
sharing a leading run of ids share that KV prefix. ``block_hashes`` maps a run of ids to
engine-style chained block hashes (``pdserve.engine.hashing``), so code keyed by real block hashes
(the router's prefix index) runs unchanged on a trace.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pdserve.engine.hashing import ROOT_PARENT, hash_block

MOONCAKE_BLOCK_TOKENS = 512
"""Tokens per Mooncake ``hash_id``."""

TRACES = {
    "conversation": "mooncake_conversation_trace_head3000.jsonl",
    "synthetic": "mooncake_synthetic_trace.jsonl",
}
"""Short names of the shipped Mooncake traces."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One trace row; ``timestamp_s`` is seconds since the trace start."""

    timestamp_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


DATA_DIR = Path(__file__).resolve().parent / "data"
"""The traces shipped with the benchmarks (``bench/data``; sources in its README)."""

RESULTS_DIR = Path("bench") / "results"
"""Where benchmarks write their JSON and plots by default (relative to the working
directory)."""


def data_path(name: str) -> Path:
    """The shipped data file ``NAME``."""
    return DATA_DIR / name


def resolve_trace(name_or_path: str) -> Path:
    """A short name of ``TRACES`` or a path; FileNotFoundError naming both if neither."""
    if name_or_path in TRACES:
        return data_path(TRACES[name_or_path])
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(
            f"trace {name_or_path!r} not found; give a path or one of {', '.join(TRACES)}"
        )
    return path


def read_mooncake(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """The first ``limit`` rows (all if None), sorted by timestamp (stable)."""
    rows: list[TraceRequest] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rows.append(
                    TraceRequest(
                        timestamp_s=float(obj["timestamp"]) / 1000.0,
                        input_length=int(obj["input_length"]),
                        output_length=int(obj["output_length"]),
                        hash_ids=tuple(int(h) for h in obj["hash_ids"]),
                    )
                )
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: not a Mooncake trace row ({e})") from e
    rows.sort(key=lambda r: r.timestamp_s)
    return rows


class BlockHasher:
    """Maps runs of trace hash ids to chained engine block hashes, memoized.

    Block ``i`` of a request hashes as ``hash_block(hash of block i-1, [hash_ids[i]])``, so
    equal leading runs of ids give equal leading hashes, as real token blocks would.
    """

    def __init__(self) -> None:
        self._memo: dict[tuple[int, int], int] = {}

    def block_hashes(self, hash_ids: Sequence[int]) -> tuple[int, ...]:
        out: list[int] = []
        parent = ROOT_PARENT
        for hid in hash_ids:
            key = (parent, hid)
            h = self._memo.get(key)
            if h is None:
                h = self._memo[key] = hash_block(parent, [hid])
            out.append(h)
            parent = h
        return tuple(out)
