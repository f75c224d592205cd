"""Sampling parameters (validated, immutable) and per-token logprobs.

Pure Python (no torch): the router validates requests with these; ``pdserve.engine.sampler``
applies them to logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.sampling_limits import FIELDS, GREEDY_BELOW, MAX_LOGPROBS, check

__all__ = ["MAX_LOGPROBS", "SamplingParams", "TokenLogprobs"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop. Invalid values raise ``ValueError`` naming the
    field (bounds: ``pdserve.engine.sampling_limits.FIELDS``).

    max_tokens: output tokens at most; None = up to the model's length.
    temperature: 0 = greedy. top_k: 0 or -1 = off. top_p: 1 = off. min_p: 0 = off.
    seed: per-request reproducible sampling. stop: strings that end the output (excluded
    from the text). stop_token_ids: token ids that end it (kept in ``token_ids``).
    ignore_eos: keep going past the end-of-sequence token. logprobs: if set, return the
    sampled token's logprob and the ``logprobs`` most likely alternatives per step.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        for name in FIELDS:
            object.__setattr__(self, name, check(name, getattr(self, name)))

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or so close to it that dividing by it could overflow)."""
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Logprob of the sampled token and the top alternatives, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]
