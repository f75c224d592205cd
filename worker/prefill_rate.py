"""A prefill worker's measured rate of computing prompt tokens, as it reports it to routers.

The rate is tokens over seconds summed across the last ``window`` prefills only: a cold
worker's first request (allocations, lazy imports: several times slower than the next ones)
weighs on the reported rate for ``window`` requests and then not at all, where a running total
would carry it for the worker's lifetime. Summing over the window (rather than averaging
per-request rates) weighs each prefill by its duration, so that a short prompt's fixed costs
do not swing the rate.

Pure Python: the prefill worker and the planner's simulated worker both use it.
"""

from __future__ import annotations

from collections import deque

DEFAULT_WINDOW = 16


class PrefillRate:
    """Tokens per second over the last ``window`` recorded prefills (0.0 before the first).

    Not thread-safe: one owner records and reads (the worker's driver thread, or the
    simulation)."""

    __slots__ = ("_samples", "_tokens", "_seconds")

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)
        self._tokens = 0
        self._seconds = 0.0

    def record(self, tokens: int, seconds: float) -> None:
        """One prefill computed ``tokens`` prompt tokens in ``seconds`` (from entering the
        engine to its first token). Prefills that computed nothing (all cached) carry no
        rate and are not recorded."""
        if tokens <= 0 or seconds <= 0:
            return
        self._samples.append((tokens, seconds))
        # Re-summed (a window is small): no drift from adding and removing floats.
        self._tokens = sum(t for t, _ in self._samples)
        self._seconds = sum(s for _, s in self._samples)

    @property
    def tokens_per_s(self) -> float:
        return self._tokens / self._seconds if self._seconds > 0 else 0.0

    def __len__(self) -> int:
        return len(self._samples)
