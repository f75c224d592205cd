"""Validation and tokenization shared by the router's fronts (gRPC and OpenAI HTTP).

Each front turns its wire request into a model name, a prompt (text, token ids, or chat
messages) and ``SamplingArgs``; ``Validator.prepare`` checks them against the served model
and returns what ``Flow.generate`` takes, or raises ``RequestError("invalid_argument",
reason)`` naming the field, in a message of bounded length (``"model_not_found"`` for a
model name that is none of the served names). One set of rules, whatever the
front: sampling bounds come from ``pdserve.engine.sampling_limits.FIELDS``, request bounds
from ``RequestLimits``.

Text is checked before it is tokenized: it must be valid Unicode (no lone surrogates) and at
most ``max_prompt_bytes`` of UTF-8. The default bound is derived from the model: a prompt
longer than ``max_model_len * (longest token in bytes + 1)`` bytes cannot fit, since no
token covers more than that. Tokenizing happens off the event loop (``TextPool``). Token
ids, whether a client sent them or the tokenizer made them, must fall inside the MODEL's
vocabulary (a tokenizer may know more ids than the model has embeddings).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pdserve.engine.sampling import SamplingParams
from pdserve.engine.tokenizer import NoChatTemplateError, Tokenizer
from pdserve.router.errors import clip
from pdserve.router.flow import RequestError
from pdserve.router.text import TextInputError, TextPool


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


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Bounds of a request beyond its sampling fields."""

    max_prompt_bytes: int | None = None
    """UTF-8 bytes of a text prompt (or of a chat's contents); None: derived from the model
    (see the module docstring)."""
    max_request_id_chars: int = 256
    max_messages: int = 1024
    """Messages of one chat request."""

    def __post_init__(self) -> None:
        if self.max_prompt_bytes is not None and self.max_prompt_bytes < 1:
            raise ValueError(f"max_prompt_bytes must be >= 1, got {self.max_prompt_bytes}")


class Prepared(NamedTuple):
    """A valid request: its prompt ids, sampling parameters and token budget."""

    prompt: list[int]
    params: SamplingParams
    max_len: int
    """Prompt plus max_tokens; never past the model's length."""


def _bad(message: str) -> RequestError:
    return RequestError("invalid_argument", message)


def utf8_size(field: str, text: str) -> int:
    """Bytes of ``text`` in UTF-8; ``RequestError`` naming ``field`` if it is not valid
    Unicode (a lone surrogate, which JSON can carry)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise _bad(f"'{field}' is not valid Unicode text (lone surrogate at character "
                   f"{exc.start})") from None


def longest_token_bytes(tokenizer: Tokenizer) -> int:
    """The most UTF-8 bytes one token of ``tokenizer`` stands for (special tokens
    included, as a text prompt may spell them)."""
    return max((len(tokenizer.decode([i], skip_special_tokens=False).encode("utf-8",
                                                                             "replace"))
                for i in range(tokenizer.vocab_size)), default=1)


class Validator:
    """Checks requests against one served model. Holds no per-request state."""

    def __init__(self, model_name: str | Sequence[str], tokenizer: Tokenizer, vocab_size: int,
                 max_model_len: Callable[[], int], text: TextPool,
                 limits: RequestLimits | None = None) -> None:
        names = (model_name,) if isinstance(model_name, str) else tuple(model_name)
        self.model_names = names
        self.model_name = names[0]
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.text = text
        self.limits = limits or RequestLimits()
        self._max_model_len = max_model_len
        self._token_bytes = longest_token_bytes(tokenizer) + 1

    @property
    def max_prompt_bytes(self) -> int:
        if self.limits.max_prompt_bytes is not None:
            return self.limits.max_prompt_bytes
        return self._max_model_len() * self._token_bytes

    def check_model(self, model: str) -> None:
        """An empty name means the served model; any other must be one of its names, else
        ``RequestError("model_not_found")`` (HTTP 404, gRPC NOT_FOUND, as OpenAI and vLLM)."""
        if model and model not in self.model_names:
            served = ", ".join(repr(n) for n in self.model_names)
            raise RequestError("model_not_found", f"the model {clip(model)!r} does not exist; "
                               f"this service serves {served}")

    def check_request_id(self, request_id: str) -> None:
        limit = self.limits.max_request_id_chars
        if len(request_id) > limit:
            raise _bad(f"the request id has {len(request_id)} characters; at most {limit}")

    def check_text(self, field: str, text: str) -> int:
        """UTF-8 size of a text bound for the tokenizer, within ``max_prompt_bytes``."""
        size = utf8_size(field, text)
        if size > self.max_prompt_bytes:
            raise _bad(f"'{field}' has {size} bytes; at most {self.max_prompt_bytes} "
                       f"(the model's length is {self._max_model_len()} tokens)")
        return size

    async def tokenize(self, text: str) -> list[int]:
        """Ids of a text (the ``Tokenize`` call): bounded like a prompt, off the loop."""
        size = self.check_text("text", text)
        ids = await self.text.encode(text, limit=size + 16, size=size)
        assert isinstance(ids, list)
        return ids

    async def prepare(self, model: str, prompt: str | Sequence[int] | None,
                      args: SamplingArgs,
                      messages: Sequence[dict[str, str]] | None = None) -> Prepared:
        """Tokenize ``prompt`` (text) or ``messages`` (chat), or check ``prompt`` (ids),
        then build the sampling params."""
        self.check_model(model)
        max_len = self._max_model_len()
        if messages is not None:
            ids = await self._chat_ids(messages, max_len)
        elif isinstance(prompt, str):
            ids = await self._text_ids(prompt, max_len) if prompt else []
        elif prompt is None:
            ids = []
        else:
            if len(prompt) >= max_len:
                raise self._too_long(len(prompt), max_len)
            ids = [int(t) for t in prompt]
        if not ids:
            raise _bad("prompt is empty")
        self._check_ids("prompt", ids)
        if len(ids) >= max_len:
            raise self._too_long(len(ids), max_len)
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
            raise _bad(str(exc)) from None
        for i, stop in enumerate(params.stop):
            utf8_size(f"stop[{i}]", stop)
        self._check_ids("stop_token_ids", params.stop_token_ids)
        if len(ids) + max_tokens > max_len:
            raise _bad(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                       f"model's length of {max_len} tokens")
        return Prepared(ids, params, len(ids) + max_tokens)

    async def _text_ids(self, text: str, max_len: int) -> list[int]:
        size = self.check_text("prompt", text)
        got = await self.text.encode(text, limit=max_len, size=size)
        if isinstance(got, int):
            raise self._too_long(got, max_len)
        return got

    async def _chat_ids(self, messages: Sequence[dict[str, str]], max_len: int) -> list[int]:
        if len(messages) > self.limits.max_messages:
            raise _bad(f"'messages' has {len(messages)} items; at most "
                       f"{self.limits.max_messages}")
        size = 0
        for i, m in enumerate(messages):
            size += utf8_size(f"messages[{i}].role", m["role"])
            size += utf8_size(f"messages[{i}].content", m["content"])
        if size > self.max_prompt_bytes:
            raise _bad(f"'messages' have {size} bytes of text; at most "
                       f"{self.max_prompt_bytes}")
        try:
            got = await self.text.chat(messages, limit=max_len, size=size)
        except NoChatTemplateError as exc:  # a 400 that says how to give one
            raise _bad(str(exc)) from None
        except TextInputError as exc:  # e.g. a template whose roles must alternate
            raise _bad("'messages' cannot be rendered with the model's chat template: "
                       f"{clip(str(exc), 200)}") from None
        if isinstance(got, int):
            raise self._too_long(got, max_len)
        return got

    def _check_ids(self, field: str, ids: Sequence[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise _bad(f"'{field}' has token ids out of range [0, {self.vocab_size}) (the "
                       f"model's vocabulary): {bad[:5]}")

    @staticmethod
    def _too_long(n: int, max_len: int) -> RequestError:
        return _bad(f"prompt has {n} tokens; the model's length is {max_len}, which leaves "
                    "no room for output")
