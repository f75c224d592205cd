"""Sampling parameters (validated, immutable) and per-token logprobs.

Pure Python (no torch): the router validates requests with these; ``pdserve.engine.sampler``
applies them to logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from pdserve.engine.sampling_limits import (
    FIELDS,
    GREEDY_BELOW,
    MAX_BAD_WORD_TOKENS,
    MAX_BAD_WORDS,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ITEMS,
    MAX_LOGPROBS,
    check,
    show,
)
from pdserve.engine.structured.spec import StructuredSpec

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

    Logits processing, as vLLM defines it, in this order: ``allowed_token_ids`` (non-empty:
    every other token is masked), ``bad_words_ids`` (the last token of a banned sequence is
    masked when the tokens before it end the sequence so far, prompt included; a one-token
    sequence is always masked), ``min_tokens`` (EOS and ``stop_token_ids`` masked until that
    many tokens were generated; stop strings are not matched before either),
    ``logit_bias`` (``(token id, bias)`` pairs added to the logits), then the penalties:
    ``repetition_penalty`` (1 = off) divides positive and multiplies negative logits of
    every token seen in the prompt or the output; ``frequency_penalty`` subtracts itself
    times each token's count in the output, ``presence_penalty`` itself once per token
    present in the output. Logprobs stay those of the raw distribution.

    include_stop_str_in_output: keep the stop string that ended the text. skip_special_tokens:
    leave special tokens out of the text. prompt_logprobs: logprobs of the prompt's tokens
    (and that many alternatives). n: independent choices of one prompt (the prompt's KV is
    computed once and shared). prompt_len: where the output begins in the token ids, when the
    engine's prompt also holds output already streamed (a request resumed after a failover);
    None: the prompt's own length.
    structured: the output must match this constraint (JSON schema, regex, choice, EBNF;
    see ``pdserve.engine.structured``); the request finishes when the constraint is complete.
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    allowed_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    n: int = 1
    prompt_len: int | None = None
    structured: StructuredSpec | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        for name in FIELDS:
            object.__setattr__(self, name, check(name, getattr(self, name)))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        object.__setattr__(self, "bad_words_ids", _bad_words(self.bad_words_ids))
        if self.prompt_len is not None and (
                isinstance(self.prompt_len, bool) or not isinstance(self.prompt_len, int)
                or self.prompt_len < 0):
            raise ValueError(f"'prompt_len' must be an integer >= 0, got {show(self.prompt_len)}")

    @property
    def processes_logits(self) -> bool:
        """Whether any logits processing (beyond temperature and filters) applies."""
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0 or self.logit_bias or self.min_tokens
                    or self.bad_words_ids or self.allowed_token_ids)

    def choice(self, index: int) -> SamplingParams:
        """Choice ``index`` of a request with ``n`` > 1 as a request of its own (as the
        decode worker forks it): one choice, seeded with ``seed + index`` (mod 2**64)."""
        seed = None if self.seed is None else (self.seed + index) % 2**64
        return replace(self, n=1, seed=seed)

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or so close to it that dividing by it could overflow)."""
        return self.temperature < GREEDY_BELOW


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    items = value.items() if isinstance(value, dict) else value
    try:
        pairs = [(t, b) for t, b in items]
    except (TypeError, ValueError):
        raise ValueError("'logit_bias' must map token ids to numbers, got "
                         f"{show(value)}") from None
    if len(pairs) > MAX_LOGIT_BIAS_ITEMS:
        raise ValueError(f"'logit_bias' has {len(pairs)} entries; at most "
                         f"{MAX_LOGIT_BIAS_ITEMS}")
    out = []
    for t, b in pairs:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < 2**31:
            raise ValueError(f"'logit_bias' keys must be token ids, got {show(t)}")
        if (isinstance(b, bool) or not isinstance(b, (int, float))
                or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS):
            raise ValueError(f"'logit_bias' values must be numbers in [-100, 100], got "
                             f"{show(b)} for token {t}")
        out.append((t, float(b)))
    return tuple(out)


def _bad_words(value: Any) -> tuple[tuple[int, ...], ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"'bad_words' must be a list of token id sequences, got {show(value)}")
    if len(value) > 2 * MAX_BAD_WORDS:  # each word may come in two spellings
        raise ValueError(f"'bad_words' has {len(value)} sequences; at most {2 * MAX_BAD_WORDS}")
    out = []
    for seq in value:
        if (isinstance(seq, (str, bytes)) or not isinstance(seq, (list, tuple)) or not seq
                or len(seq) > MAX_BAD_WORD_TOKENS
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31
                           for t in seq)):
            raise ValueError(f"'bad_words' entries must be 1 to {MAX_BAD_WORD_TOKENS} token "
                             f"ids, got {show(seq)}")
        out.append(tuple(seq))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Logprob of the sampled (or prompt) token and the top alternatives, most likely
    first; ``rank``: the token's rank in its distribution (1 = most likely), where known."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    rank: int | None = None
