"""Helpers shared by the benchmarks: trace readers, progress lines, markdown tables."""

from __future__ import annotations

import csv
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.bench.trace import data_path

AZURE_CODE_TRACE = "azure_llm_inference_2023_code.csv"
"""The Azure LLM inference trace (2023, code completion) shipped in ``bench/data``."""


@dataclass(frozen=True, slots=True)
class AzureRow:
    """One row of an Azure LLM inference trace (token counts only)."""

    context_tokens: int
    generated_tokens: int


def read_azure(path: str | Path | None = None, limit: int | None = None) -> list[AzureRow]:
    """The first ``limit`` rows (all if None) of an Azure trace CSV, in file (arrival) order.

    ``path`` None reads the shipped code-completion trace."""
    path = data_path(AZURE_CODE_TRACE) if path is None else Path(path)
    rows: list[AzureRow] = []
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, rec in enumerate(csv.DictReader(f), 2):
            if limit is not None and len(rows) >= limit:
                break
            try:
                rows.append(AzureRow(int(rec["ContextTokens"]), int(rec["GeneratedTokens"])))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: not an Azure trace row ({e})") from e
    return rows


class Progress:
    """Writes one timestamped line a phase on stderr, so stdout stays for the results."""

    def __init__(self, prefix: str, enabled: bool = True) -> None:
        self.prefix = prefix
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            print(f"[{self.prefix} {elapsed:7.1f}s] {message}", file=sys.stderr, flush=True)


def mean_median(values: Sequence[float]) -> tuple[float, float]:
    """Mean and median; (nan, nan) for no values."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.median(values)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are printed with 3 significant digits or more."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            if v != v:  # nan
                return "-"
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def start_server(cmd: Sequence[str], log: Progress, timeout_s: float = 600.0) -> Any:
    """Start ``pdserve serve`` (``cmd``) in its own session, its output going to a log file
    (a pipe nobody drains would block the server once full); returns the ``Popen`` once it
    prints that it serves."""
    import subprocess
    import tempfile

    out = tempfile.NamedTemporaryFile("w+", prefix="pdserve-serve-", suffix=".log",
                                      delete=False)
    log(f"server log: {out.name}")
    server = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(out.name) as f:
            if any(line.startswith("pdserve: serving") for line in f):
                return server
        if server.poll() is not None:
            raise SystemExit(f"pdserve serve exited with {server.returncode}; see {out.name}")
        time.sleep(0.5)
    server.kill()
    raise SystemExit(f"pdserve serve did not start in {timeout_s:.0f} s; see {out.name}")
