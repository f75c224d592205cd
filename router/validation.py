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

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from pdserve.engine.sampling import SamplingParams
from pdserve.engine.sampling_limits import INT32_MAX, MAX_BAD_WORDS, Field
from pdserve.engine.structured.spec import StructuredSpec
from pdserve.engine.tokenizer import NoChatTemplateError, Tokenizer
from pdserve.router.errors import clip, param_of
from pdserve.router.flow import RequestError
from pdserve.router.text import ChatOptions, TextInputError, TextPool

__all__ = ["ChatOptions", "Prepared", "RequestLimits", "SamplingArgs", "Validator"]


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    bad_words: tuple[str, ...] = ()
    """Words never generated; each is tokenized as written and with a leading space."""
    allowed_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    """Keep only the prompt's last this many tokens (-1: as many as the model's length
    leaves room for with ``max_tokens``)."""
    add_special_tokens: bool | None = None
    """Whether tokenizing a text prompt adds the tokenizer's special tokens (BOS). None:
    yes for a plain prompt; no for a chat, whose template places them."""
    n: int = 1
    priority: int = 0
    """Lower runs first under ``--scheduling-policy priority`` (vLLM's convention)."""
    structured: StructuredSpec | None = None
    """The output's constraint (checked by ``prepare``: a spec the backend cannot
    compile is refused)."""
    structured_field: str = "structured"
    """The request field that carried ``structured`` (the ``param`` of its errors)."""


BAD_WORD_FIELD = Field(str, max_items=MAX_BAD_WORDS, max_chars=256, nonempty=True)


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Bounds of a request beyond its sampling fields."""

    max_prompt_bytes: int | None = None
    """UTF-8 bytes of a text prompt (or of a chat's contents); None: derived from the model
    (see the module docstring)."""
    max_request_id_chars: int = 256
    max_messages: int = 1024
    """Messages of one chat request."""
    trust_request_chat_template: bool = False
    """Whether a request may bring its own ``chat_template`` (Jinja, rendered in a sandbox
    but able to spend CPU): off by default, as in vLLM."""

    def __post_init__(self) -> None:
        if self.max_prompt_bytes is not None and self.max_prompt_bytes < 1:
            raise ValueError(f"max_prompt_bytes must be >= 1, got {self.max_prompt_bytes}")


class Prepared(NamedTuple):
    """A valid request: its prompt ids, sampling parameters and token budget."""

    prompt: list[int]
    params: SamplingParams
    max_len: int
    """Prompt plus max_tokens; never past the model's length."""
    priority: int = 0


def _bad(message: str, param: str | None = None) -> RequestError:
    return RequestError("invalid_argument", message, param if param else param_of(message))




_checked: dict[tuple[str, str], str] = {}  # spec key -> "" (fine) or why not; bounded
_CHECKED_ENTRIES = 1024


async def check_structured(spec: StructuredSpec, field: str = "structured") -> None:
    """Refuse a constraint the backend cannot build (parsed off the event loop, once per
    distinct constraint); the error's ``param`` is ``field``, the request field that
    carried the constraint."""
    reason = _checked.get(spec.key)
    if reason is None:
        from pdserve.engine.structured.grammar import check

        try:
            await asyncio.to_thread(check, spec)
            reason = ""
        except ValueError as exc:
            reason = str(exc)
        if len(_checked) >= _CHECKED_ENTRIES:
            _checked.clear()
        _checked[spec.key] = reason
    if reason:
        raise _bad(reason, field)


def utf8_size(field: str, text: str) -> int:
    """Bytes of ``text`` in UTF-8; ``RequestError`` naming ``field`` if it is not valid
    Unicode (a lone surrogate, which JSON can carry)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise _bad(f"'{field}' is not valid Unicode text (lone surrogate at character "
                   f"{exc.start})", field.split("[")[0].split(".")[0]) from None


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

    @property
    def max_model_len(self) -> int:
        return self._max_model_len()

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of a text (the ``Tokenize`` call): bounded like a prompt, off the loop."""
        size = self.check_text("text", text)
        ids = await self.text.encode(text, limit=size + 16, size=size,
                                     add_special_tokens=add_special_tokens)
        assert isinstance(ids, list)
        return ids

    async def tokenize_chat(self, messages: Sequence[dict[str, Any]], chat: ChatOptions,
                            add_special_tokens: bool = False) -> list[int]:
        """Ids of a conversation rendered as a chat request's would be (no length bound
        beyond the prompt's bytes)."""
        return await self._chat_ids(messages, None, chat, add_special_tokens)

    async def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of token ids (the ``Detokenize`` call): ids must be the model's, at most
        the model's length of them; decoded off the loop."""
        max_len = self._max_model_len()
        if len(ids) > max_len:
            raise _bad(f"'tokens' has {len(ids)} ids; at most {max_len} (the model's length)",
                       "tokens")
        self._check_ids("tokens", ids)
        return await self.text.decode(list(ids), skip_special_tokens)

    async def prepare(self, model: str, prompt: str | Sequence[int] | None,
                      args: SamplingArgs,
                      messages: Sequence[dict[str, Any]] | None = None,
                      chat: ChatOptions | None = None,
                      tools: list[dict[str, Any]] | None = None) -> Prepared:
        """Tokenize ``prompt`` (text) or ``messages`` (chat, rendered as ``chat`` says, with
        ``tools`` given to the template), or check ``prompt`` (ids), then build the sampling
        params. ``n`` > 1 is refused with structured output or tools: each forked choice
        would need its own grammar matcher and tool-call parser."""
        if args.n != 1 and (args.structured is not None or tools):
            what = "'tools'" if tools else "structured output"
            raise _bad(f"'n' > 1 cannot be combined with {what}; send n separate requests",
                       "n")
        self.check_model(model)
        max_len = self._max_model_len()
        truncate = args.truncate_prompt_tokens
        if truncate is not None and (isinstance(truncate, bool) or not isinstance(truncate, int)
                                     or not (truncate == -1 or 1 <= truncate <= INT32_MAX)):
            raise _bad(f"'truncate_prompt_tokens' must be -1 or an integer >= 1, got "
                       f"{truncate!r}", "truncate_prompt_tokens")
        keep: int | None = None
        if truncate == -1:
            keep = max_len - (args.max_tokens or 1)
        elif truncate is not None:
            keep = truncate
        # Truncated prompts may be longer than the model before they are cut.
        limit = max_len if keep is None else None
        if messages is not None:
            ids = await self._chat_ids(messages, limit, chat or ChatOptions(),
                                       bool(args.add_special_tokens), tools)
        elif isinstance(prompt, str):
            add_special = True if args.add_special_tokens is None else args.add_special_tokens
            ids = await self._text_ids(prompt, limit, add_special) if prompt else []
        elif prompt is None:
            ids = []
        else:
            if keep is None and len(prompt) >= max_len:
                raise self._too_long(len(prompt), max_len)
            ids = [int(t) for t in prompt]
        if keep is not None and keep > 0:
            ids = ids[-keep:]
        if not ids:
            raise _bad("prompt is empty", "messages" if messages is not None else "prompt")
        self._check_ids("prompt", ids)
        if len(ids) >= max_len:
            raise self._too_long(len(ids), max_len)
        max_tokens = args.max_tokens if args.max_tokens is not None else max_len - len(ids)
        bad_words = await self._bad_words(args.bad_words)
        try:
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if args.temperature is None else args.temperature,
                top_p=1.0 if args.top_p is None else args.top_p,
                top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop,
                stop_token_ids=args.stop_token_ids, ignore_eos=args.ignore_eos,
                logprobs=args.logprobs, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty,
                repetition_penalty=args.repetition_penalty, logit_bias=args.logit_bias,
                min_tokens=args.min_tokens, bad_words_ids=bad_words,
                allowed_token_ids=args.allowed_token_ids,
                include_stop_str_in_output=args.include_stop_str_in_output,
                skip_special_tokens=args.skip_special_tokens,
                prompt_logprobs=args.prompt_logprobs, n=args.n, structured=args.structured,
            )
        except ValueError as exc:
            raise _bad(str(exc), param_of(str(exc))) from None
        if args.structured is not None:
            await check_structured(args.structured, args.structured_field)
        if not -(2**31) <= args.priority < 2**31:
            raise _bad(f"'priority' must be a 32-bit integer, got {args.priority}", "priority")
        for i, stop in enumerate(params.stop):
            utf8_size(f"stop[{i}]", stop)
        self._check_ids("stop_token_ids", params.stop_token_ids)
        self._check_ids("logit_bias", [t for t, _ in params.logit_bias])
        self._check_ids("allowed_token_ids", params.allowed_token_ids)
        if params.min_tokens > max_tokens:
            raise _bad(f"'min_tokens' ({params.min_tokens}) must not exceed 'max_tokens' "
                       f"({max_tokens})", "min_tokens")
        if len(ids) + max_tokens > max_len:
            raise _bad(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                       f"model's length of {max_len} tokens", "max_tokens")
        return Prepared(ids, params, len(ids) + max_tokens, args.priority)

    async def _bad_words(self, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        """Token id sequences of ``bad_words``: each word as written (leading spaces
        stripped) and, where it tokenizes differently, with one leading space (the same word
        in the middle of a text)."""
        if not words:
            return ()
        try:
            words = BAD_WORD_FIELD.check("bad_words", words)
        except ValueError as exc:
            raise _bad(str(exc), "bad_words") from None
        out: list[tuple[int, ...]] = []
        for word in words:
            for text in (word.lstrip(), " " + word.lstrip()):
                size = utf8_size("bad_words", text)
                ids = await self.text.encode(text, limit=size + 16, size=size,
                                             add_special_tokens=False)
                assert isinstance(ids, list)
                if ids and tuple(ids) not in out:
                    out.append(tuple(ids))
        self._check_ids("bad_words", [t for seq in out for t in seq])
        return tuple(out)

    async def _text_ids(self, text: str, limit: int | None, add_special: bool) -> list[int]:
        size = self.check_text("prompt", text)
        got = await self.text.encode(text, limit=limit or INT32_MAX, size=size,
                                     add_special_tokens=add_special)
        if isinstance(got, int):
            raise self._too_long(got, self._max_model_len())
        return got

    async def _chat_ids(self, messages: Sequence[dict[str, Any]], limit: int | None,
                        chat: ChatOptions, add_special: bool,
                        tools: list[dict[str, Any]] | None = None) -> list[int]:
        if len(messages) > self.limits.max_messages:
            raise _bad(f"'messages' has {len(messages)} items; at most "
                       f"{self.limits.max_messages}", "messages")
        size = 0
        for i, m in enumerate(messages):
            size += utf8_size(f"messages[{i}].role", m["role"])
            size += utf8_size(f"messages[{i}].content", m["content"])
        if tools or any(len(m) > 2 for m in messages):  # tool calls, results and schemas
            size += utf8_size("tools", json.dumps([tools, messages], ensure_ascii=False))
        if size > self.max_prompt_bytes:
            raise _bad(f"'messages' have {size} bytes of text; at most "
                       f"{self.max_prompt_bytes}", "messages")
        if chat.chat_template is not None:
            if not self.limits.trust_request_chat_template:
                raise _bad("a per-request 'chat_template' is not accepted by this server "
                           "(start it with --trust-request-chat-template to allow it)",
                           "chat_template")
            size += utf8_size("chat_template", chat.chat_template)
        if chat.continue_final_message and chat.add_generation_prompt:
            raise _bad("'continue_final_message' and 'add_generation_prompt' cannot both be "
                       "true (continue the last message, or open a new assistant turn)",
                       "continue_final_message")
        if chat.continue_final_message and messages[-1]["role"] != "assistant":
            raise _bad("'continue_final_message' needs the last message to be the "
                       "assistant's", "continue_final_message")
        try:
            got = await self.text.chat(messages, limit=limit or INT32_MAX, size=size,
                                       options=chat, add_special_tokens=add_special,
                                       tools=tools)
        except NoChatTemplateError as exc:  # a 400 that says how to give one
            raise _bad(str(exc), "messages") from None
        except TextInputError as exc:  # e.g. a template whose roles must alternate
            raise _bad("'messages' cannot be rendered with the chat template: "
                       f"{clip(str(exc), 200)}", "messages") from None
        if isinstance(got, int):
            raise self._too_long(got, self._max_model_len())
        return got

    def _check_ids(self, field: str, ids: Sequence[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise _bad(f"'{field}' has token ids out of range [0, {self.vocab_size}) (the "
                       f"model's vocabulary): {bad[:5]}")

    @staticmethod
    def _too_long(n: int, max_len: int) -> RequestError:
        return _bad(f"prompt has {n} tokens; the model's length is {max_len}, which leaves "
                    "no room for output (or set 'truncate_prompt_tokens')", "prompt")
