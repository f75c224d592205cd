"""What a serving benchmark reports, with the definitions the common serving benchmarks use
(vLLM's ``benchmark_serving``, SGLang's ``bench_serving``), so that numbers compare:

- TTFT: request sent -> first chunk carrying output.
- TPOT, per request: ``(E2E - TTFT) / (output tokens - 1)``; requests with one output token
  have none.
- ITL: every gap between consecutive output chunks, pooled over requests.
- E2E: request sent -> last chunk.
- Each as mean, median, p90, p99 (linear interpolation between order statistics), in ms.
- Throughput over the run's duration (first send -> last completion): completed requests,
  output tokens, and input + output tokens per second.
- Goodput: completed requests per second that met EVERY given SLO (``ttft``, ``tpot``,
  ``e2el`` in ms); a request without a TPOT meets a TPOT SLO.

Pure (numpy only): the timeline goes in, the numbers come out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass(slots=True)
class RequestResult:
    """One request's timeline, in seconds since its send (``chunk_times``: arrival of each
    chunk that carried output, in order)."""

    prompt_len: int
    output_len: int = 0
    """Output tokens as counted by the server (its usage), else by the client."""
    send_time: float = 0.0
    """When it was sent, in seconds since the run started."""
    chunk_times: list[float] = field(default_factory=list)
    ok: bool = True
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] if self.chunk_times else float("nan")

    @property
    def e2e(self) -> float:
        return self.chunk_times[-1] if self.chunk_times else float("nan")

    @property
    def tpot(self) -> float | None:
        if self.output_len <= 1 or not self.chunk_times:
            return None
        return (self.e2e - self.ttft) / (self.output_len - 1)

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 0.5, "tpot": 0.05}`` (seconds)."""
    slos: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition(":")
        if name not in SLO_METRICS or not value:
            raise ValueError(f"bad SLO {item!r}; use NAME:MS with NAME one of "
                             f"{', '.join(SLO_METRICS)}")
        ms = float(value)
        if ms <= 0:
            raise ValueError(f"SLO {item!r} must be positive")
        slos[name] = ms / 1000.0
    return slos


def meets(result: RequestResult, slos: Mapping[str, float]) -> bool:
    """True if a completed request met every SLO (seconds)."""
    if not result.ok:
        return False
    values = {"ttft": result.ttft, "tpot": result.tpot, "e2el": result.e2e}
    for name, limit in slos.items():
        value = values[name]
        if value is not None and not value <= limit:
            return False
    return True


def distribution(values_s: Sequence[float]) -> dict[str, float]:
    """mean, median, p90, p99 (and std) of seconds, reported in ms; nan for none."""
    if not values_s:
        nan = float("nan")
        return {"mean_ms": nan, "median_ms": nan, "p90_ms": nan, "p99_ms": nan, "std_ms": nan}
    ms = np.asarray(values_s, dtype=float) * 1000.0
    p50, p90, p99 = (float(x) for x in np.percentile(ms, PERCENTILES))
    return {"mean_ms": float(ms.mean()), "median_ms": p50, "p90_ms": p90, "p99_ms": p99,
            "std_ms": float(ms.std())}


def summarize(results: Sequence[RequestResult], duration_s: float,
              slos: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The report of one run: counts, throughputs, goodput and the four distributions."""
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    done = [r for r in results if r.ok]
    tpots = [t for r in done if (t := r.tpot) is not None]
    itls = [g for r in done for g in r.itls]
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_len for r in done)
    report: dict[str, Any] = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration_s,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "ttft": distribution([r.ttft for r in done]),
        "tpot": distribution(tpots),
        "itl": distribution(itls),
        "e2el": distribution([r.e2e for r in done]),
    }
    if slos:
        good = sum(1 for r in done if meets(r, slos))
        report["goodput"] = good / duration_s
        report["goodput_requests"] = good
        report["slos_ms"] = {k: v * 1000.0 for k, v in slos.items()}
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        report["errors"] = errors[:10]
    return report
