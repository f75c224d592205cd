"""What the router logs about its traffic: one access line per request, a stats line every
few seconds (as vLLM prints its throughput and cache lines).

Pure formatting over plain numbers (no router state), so the lines can be read and tested in
one place. The router calls ``access_line`` when a request leaves it and ``StatsLog.line``
from a timer; both log on ``pdserve.access`` / ``pdserve.stats`` at INFO, so either can be
filtered or silenced by logger name (``--disable-log-requests``, ``--disable-log-stats``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

access_logger = logging.getLogger("pdserve.access")
stats_logger = logging.getLogger("pdserve.stats")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def access_line(request_id: str, model: str, status: str, prompt_tokens: int,
                output_tokens: int, cached_tokens: int, ttft_s: float | None, e2e_s: float,
                prefill_worker: str, decode_worker: str) -> str:
    """``request <id> model=<name> status=<outcome> prompt=<n> output=<n> cached=<n>
    ttft=<s> e2e=<s> prefill=<worker> decode=<worker>`` (``-`` for what never happened)."""
    return (f"request {request_id} model={model} status={status} prompt={prompt_tokens} "
            f"output={output_tokens} cached={cached_tokens} ttft={_seconds(ttft_s)} "
            f"e2e={_seconds(e2e_s)} prefill={prefill_worker or '-'} "
            f"decode={decode_worker or '-'}")


@dataclass(frozen=True, slots=True)
class WorkerLoadSample:
    """One worker's figures for the stats line (cumulative counters as reported)."""

    role: str
    running: int
    waiting: int
    used_blocks: int
    total_blocks: int
    prefix_queried: int
    prefix_hits: int


@dataclass(frozen=True, slots=True)
class StatsSample:
    """The router's cumulative counters and current load at ``time`` (monotonic seconds)."""

    time: float
    prompt_tokens: float
    generation_tokens: float
    requests_running: int
    requests_waiting: int
    workers: tuple[WorkerLoadSample, ...]


class StatsLog:
    """Turns successive samples into stats lines: rates over the interval since the last
    line, current load per role. An idle service logs one line, then stays quiet until
    traffic returns. Owned by one task (not thread-safe)."""

    def __init__(self) -> None:
        self._last: StatsSample | None = None
        self._idle_logged = False

    def line(self, sample: StatsSample) -> str | None:
        """The line for ``sample`` (None: nothing to say); the first call only records."""
        last, self._last = self._last, sample
        if last is None:
            return None
        dt = max(sample.time - last.time, 1e-9)
        prompt = (sample.prompt_tokens - last.prompt_tokens) / dt
        generation = (sample.generation_tokens - last.generation_tokens) / dt
        idle = (prompt == 0 and generation == 0 and sample.requests_running == 0
                and sample.requests_waiting == 0)
        if idle and self._idle_logged:
            return None
        self._idle_logged = idle
        roles = ", ".join(_role(role, sample.workers, last.workers)
                          for role in ("prefill", "decode"))
        return (f"throughput: prompt {prompt:.1f} tokens/s, generation {generation:.1f} "
                f"tokens/s; requests: {sample.requests_running} running, "
                f"{sample.requests_waiting} waiting for decode capacity; {roles}")


def _role(role: str, now: Iterable[WorkerLoadSample], before: Iterable[WorkerLoadSample]) -> str:
    cur = [w for w in now if w.role == role]
    prev = [w for w in before if w.role == role]
    total = sum(w.total_blocks for w in cur)
    usage = 100.0 * sum(w.used_blocks for w in cur) / total if total else 0.0
    queried = sum(w.prefix_queried for w in cur) - sum(w.prefix_queried for w in prev)
    hits = sum(w.prefix_hits for w in cur) - sum(w.prefix_hits for w in prev)
    hit_rate = f"{100.0 * hits / queried:.1f}%" if queried > 0 else "-"
    return (f"{role} ({len(cur)}): {sum(w.running for w in cur)} running, "
            f"{sum(w.waiting for w in cur)} waiting, KV {usage:.1f}%, prefix hits {hit_rate}")
