"""What the engine reports per request, and the stop rules that decide when it is done.

``StopChecker`` turns sampled tokens into text deltas (through the incremental detokenizer)
and decides finishing: EOS, stop token ids, stop strings (excluded from the text unless
``include_stop_str_in_output``, and never streamed even in part: text that could still grow
into a stop string is held back; not matched before ``min_tokens`` output tokens), the token
limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.sampling import TokenLogprobs
from pdserve.engine.sequence import FinishReason, Sequence


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    """A request's progress after a step. ``token_ids``/``text`` are cumulative outputs;
    ``new_token_ids``/``delta_text`` what this step added. ``block_ids`` and
    ``num_computed_tokens`` serve the prefill role (which KV blocks are filled so far)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    new_token_ids: list[int]
    text: str
    delta_text: str
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None
    num_cached_tokens: int
    num_computed_tokens: int
    block_ids: list[int]
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    metrics: RequestMetrics | None = None
    error: str | None = None
    """Set (with ``finish_reason`` "error") when the request failed on its own; the engine
    and every other request went on."""
    parent_id: str | None = None
    """For a choice forked from a request with ``n`` > 1: that request's id (``index`` is
    the choice's, 1 .. n - 1; the request itself is choice 0)."""
    index: int = 0
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    """On the finished output, with ``prompt_logprobs`` asked for: prompt token ``i + 1``'s
    logprobs at ``i``."""


class StopChecker:
    """Per-request text state. ``detokenizer`` may be None (token ids only, no stop
    strings)."""

    def __init__(self, seq: Sequence, detokenizer: object | None, eos_ids: tuple[int, ...]):
        self.seq = seq
        self.detok = detokenizer
        self.eos_ids = () if seq.params.ignore_eos else eos_ids
        self.text = ""  # output text so far (stop string excluded)
        self.emitted = 0  # characters of ``text`` already reported
        self._holdback = max((len(s) for s in seq.params.stop), default=1) - 1

    def append(self, token_id: int) -> bool:
        """Record a sampled token (already appended to the sequence); True if it finished
        the request (the sequence's finish_reason is then set)."""
        seq = self.seq
        params = seq.params
        if self.detok is not None:
            self.text += self.detok.push([token_id])
        if token_id in self.eos_ids or token_id in params.stop_token_ids:
            seq.finish_reason = FinishReason.STOP
            seq.stop_reason = None if token_id in self.eos_ids else token_id
        elif (params.stop and seq.num_output_tokens >= params.min_tokens
              and self._find_stop()):
            seq.finish_reason = FinishReason.STOP
        elif seq.num_tokens >= seq.max_len:
            seq.finish_reason = FinishReason.LENGTH
        stopped_on_string = isinstance(seq.stop_reason, str)
        if seq.finish_reason is not None and self.detok is not None and not stopped_on_string:
            self.text += self.detok.flush()
        return seq.finish_reason is not None

    def finish(self, reason: FinishReason) -> None:
        """End the output for a reason found outside these rules (a structured-output
        constraint that is complete), flushing the text held back."""
        self.seq.finish_reason = reason
        if self.detok is not None:
            self.text += self.detok.flush()

    def _find_stop(self) -> bool:
        window_start = max(0, self.emitted - self._holdback)
        best: tuple[int, str] | None = None
        for stop in self.seq.params.stop:
            idx = self.text.find(stop, window_start)
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return False
        end = best[0] + (len(best[1]) if self.seq.params.include_stop_str_in_output else 0)
        self.text = self.text[:end]
        self.seq.stop_reason = best[1]
        return True

    def take_delta(self, finished: bool) -> str:
        """Text not reported yet; while running, the tail that may start a stop string is
        held back."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self._holdback)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
