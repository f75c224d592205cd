"""Validation and tokenization shared by the router's fronts (gRPC and OpenAI HTTP).

Each front turns its wire request into a model name, a prompt (text or token ids) and
``SamplingArgs``; ``Validator.prepare`` checks them against the served model and returns
what ``Flow.generate`` takes, or raises ``RequestError("invalid_argument", reason)`` with a
message a user can act on. One set of rules, whatever the front.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pdserve.engine.sampling import SamplingParams
from pdserve.engine.tokenizer import Tokenizer
from pdserve.router.flow import RequestError


@dataclass(frozen=True, slots=True)
class SamplingArgs:
    """Sampling options as a client sent them; None = not given (the defaults below)."""

    max_tokens: int | None = None
    """None: up to the model's length."""
    temperature: float | None = None
    """None: 1.0, as in the OpenAI API."""
    top_p: float | None = None
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None


class Prepared(NamedTuple):
    """A valid request: its prompt ids, sampling parameters and token budget."""

    prompt: list[int]
    params: SamplingParams
    max_len: int
    """Prompt plus max_tokens; never past the model's length."""


class Validator:
    """Checks requests against one served model. Thread-safe (holds no per-request state)."""

    def __init__(self, model_name: str | Sequence[str], tokenizer: Tokenizer, vocab_size: int,
                 max_model_len: Callable[[], int]) -> None:
        names = (model_name,) if isinstance(model_name, str) else tuple(model_name)
        self.model_names = names
        self.model_name = names[0]
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._max_model_len = max_model_len

    def check_model(self, model: str) -> None:
        """An empty name means the served model; any other must be one of its names, else
        ``RequestError("model_not_found")`` (HTTP 404, gRPC NOT_FOUND, as OpenAI and vLLM)."""
        if model and model not in self.model_names:
            served = ", ".join(repr(n) for n in self.model_names)
            raise RequestError("model_not_found", f"the model {model!r} does not exist; this "
                               f"service serves {served}")

    def prepare(self, model: str, prompt: str | Sequence[int] | None,
                args: SamplingArgs) -> Prepared:
        """Tokenize ``prompt`` (text) or check it (ids), then build the sampling params."""
        self.check_model(model)
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt) if prompt else []
        elif prompt is None:
            ids = []
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError("invalid_argument",
                                   f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        if not ids:
            raise RequestError("invalid_argument", "prompt is empty")
        max_len = self._max_model_len()
        if len(ids) >= max_len:
            raise RequestError("invalid_argument",
                               f"prompt has {len(ids)} tokens; the model's length is "
                               f"{max_len}, which leaves no room for output")
        max_tokens = args.max_tokens if args.max_tokens is not None else max_len - len(ids)
        try:
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if args.temperature is None else args.temperature,
                top_p=1.0 if args.top_p is None else args.top_p,
                top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop,
                stop_token_ids=args.stop_token_ids, ignore_eos=args.ignore_eos,
                logprobs=args.logprobs,
            )
        except ValueError as exc:
            raise RequestError("invalid_argument", str(exc)) from None
        if len(ids) + max_tokens > max_len:
            raise RequestError("invalid_argument",
                               f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) "
                               f"exceeds the model's length of {max_len} tokens")
        return Prepared(ids, params, len(ids) + max_tokens)
