"""What a simulated run reports: TTFT / TPOT percentiles and goodput at an SLO, with the
definitions of ``pdserve bench serve`` (``pdserve.bench.serve_metrics``): TPOT per request is
(E2E - TTFT) / (output tokens - 1); goodput is completed requests that met every SLO, per
second of the run (first arrival to last completion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pdserve.planner.sim import SimResult


@dataclass(frozen=True, slots=True)
class SLO:
    """Latency targets in seconds (None: no target)."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    @classmethod
    def parse(cls, text: str) -> SLO:
        """``"ttft:500,tpot:50"`` (milliseconds) -> SLO(0.5, 0.05)."""
        values: dict[str, float] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            name, _, ms = item.partition(":")
            if name not in ("ttft", "tpot") or not ms:
                raise ValueError(f"bad SLO {item!r}; use ttft:MS,tpot:MS")
            try:
                value = float(ms)
            except ValueError:
                raise ValueError(f"bad SLO {item!r}: {ms!r} is not a number") from None
            if not value > 0:
                raise ValueError(f"SLO {item!r} must be positive")
            values[name] = value / 1000.0
        if not values:
            raise ValueError("empty SLO; use ttft:MS,tpot:MS")
        return cls(values.get("ttft"), values.get("tpot"))


@dataclass(frozen=True, slots=True)
class Summary:
    label: str
    requests: int
    completed: int
    ttft_ms: tuple[float, float, float]
    """Median, p90, p99."""
    tpot_ms: tuple[float, float, float]
    goodput: float
    """Requests/s meeting the SLO."""
    slo_attainment: float
    """Share of all requests meeting the SLO."""
    throughput: float
    cached_fraction: float


def _pct(values: np.ndarray) -> tuple[float, float, float]:
    values = values[~np.isnan(values)]
    if not values.size:
        return (math.nan, math.nan, math.nan)
    p50, p90, p99 = np.percentile(values, (50, 90, 99)) * 1000.0
    return float(p50), float(p90), float(p99)


def meets(result: SimResult, slo: SLO) -> np.ndarray:
    """Per request: completed and within every target (no TPOT target for 1-token outputs)."""
    good = result.ok.copy()
    if slo.ttft_s is not None:
        good &= result.ttft_s <= slo.ttft_s
    if slo.tpot_s is not None:
        good &= np.isnan(result.tpot_s) | (result.tpot_s <= slo.tpot_s)
    return good


def summarize(result: SimResult, slo: SLO) -> Summary:
    good = meets(result, slo)
    n = len(result.ok)
    return Summary(
        label=result.spec.label, requests=n, completed=int(result.ok.sum()),
        ttft_ms=_pct(result.ttft_s), tpot_ms=_pct(result.tpot_s),
        goodput=float(good.sum()) / result.duration_s,
        slo_attainment=float(good.sum()) / n if n else 0.0,
        throughput=float(result.ok.sum()) / result.duration_s,
        cached_fraction=result.cached_tokens / max(result.prompt_tokens, 1),
    )
