"""The OpenAI wire format: request bodies in, response bodies and stream chunks out.

Pure functions over JSON-shaped dicts (no aiohttp, no router state), so that what the HTTP
front accepts and answers can be read in one place. Which body fields exist, and which are
implemented, accepted no-ops or refused, is ``pdserve.router.request_fields``' catalogue,
checked first: nothing is silently ignored. Parsing raises
``RequestError("invalid_argument", ..., param)`` naming the offending field (``param`` is
OpenAI's error body field). Type errors quote at most a few dozen characters of the value;
numeric bounds are those of ``pdserve.engine.sampling_limits``, checked when the router
builds the sampling parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pdserve.engine.sampling import TokenLogprobs
from pdserve.engine.sampling_limits import show
from pdserve.router.chat import chat_messages, chat_options, chat_parts, with_tool_constraint
from pdserve.router.flow import RequestError
from pdserve.router.openai_structured import structured_field, structured_output
from pdserve.router.openai_tools import ToolRequest
from pdserve.router.request_fields import CHAT, COMPLETIONS, check_fields
from pdserve.router.validation import ChatOptions, SamplingArgs, Validator

ERROR_STATUS = {
    "invalid_argument": (400, "invalid_request_error"),
    "unauthenticated": (401, "authentication_error"),
    "not_found": (404, "not_found_error"),
    "model_not_found": (404, "invalid_request_error"),  # OpenAI's own shape for this case
    "too_large": (413, "invalid_request_error"),
    "resource_exhausted": (429, "rate_limit_exceeded"),
    "internal": (500, "internal_error"),
    "unavailable": (503, "service_unavailable"),
    "deadline_exceeded": (504, "timeout"),
}
"""Router error code -> (HTTP status, OpenAI error ``type``)."""

MAX_BATCH_PROMPTS = 64
"""Prompts of one ``/v1/completions`` request (each is its own request internally)."""

TokenText = Callable[[int], str]
"""Renders one token id as text (for logprobs)."""


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A valid request body: the prompts (text or ids; chat: the messages) and options."""

    model: str
    prompts: tuple[str | list[int], ...]
    """Completions: one choice per prompt (a batch); chat: empty."""
    messages: list[dict[str, str]] | None
    args: SamplingArgs
    stream: bool
    include_usage: bool
    return_token_ids: bool
    chat_logprobs: bool
    chat: ChatOptions | None = None
    echo: bool = False
    return_tokens_as_token_ids: bool = False
    request_id: str | None = None
    tools: ToolRequest | None = None

    @property
    def prompt(self) -> str | list[int] | None:
        """The first prompt (None for chat)."""
        return self.prompts[0] if self.prompts else None


def error_body(code: str, message: str, param: str | None = None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of an error in OpenAI's shape."""
    status, kind = ERROR_STATUS.get(code, (500, "internal_error"))
    return status, {"error": {"message": message, "type": kind, "param": param,
                              "code": code}}


def _bad(message: str, param: str | None) -> RequestError:
    return RequestError("invalid_argument", message, param)


def _get(body: dict[str, Any], name: str, types: tuple[type, ...], default: Any = None,
         *, param: str | None = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise _bad(f"'{param or name}' must be {' or '.join(t.__name__ for t in types)}, got "
                   f"{show(value)}", (param or name).split(".")[0])
    return value


def _int_list(body: dict[str, Any], name: str) -> tuple[int, ...]:
    values = _get(body, name, (list,), [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in values):
        raise _bad(f"'{name}' must be a list of integers, got {show(values)}", name)
    return tuple(values)


def _logit_bias(body: dict[str, Any]) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: token ids (as JSON object keys, so strings) -> bias."""
    raw = _get(body, "logit_bias", (dict,), {})
    out = []
    for key, bias in raw.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise _bad(f"'logit_bias' keys must be token ids, got {show(key)}",
                       "logit_bias") from None
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise _bad(f"'logit_bias' values must be numbers, got {show(bias)}", "logit_bias")
        out.append((token, float(bias)))
    return tuple(out)


def _number(body: dict[str, Any], name: str, default: float) -> float:
    return float(_get(body, name, (int, float), default))


def _sampling(body: dict[str, Any], max_tokens: int | None, logprobs: int | None) -> SamplingArgs:
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise _bad(f"'stop' must be a string or a list of strings, got {show(stop)}", "stop")
    bad_words = _get(body, "bad_words", (list,), [])
    if not all(isinstance(w, str) for w in bad_words):
        raise _bad(f"'bad_words' must be a list of strings, got {show(bad_words)}",
                   "bad_words")
    temperature = _get(body, "temperature", (int, float))
    top_p = _get(body, "top_p", (int, float))
    return SamplingArgs(
        max_tokens=max_tokens,
        temperature=None if temperature is None else float(temperature),
        top_p=None if top_p is None else float(top_p),
        top_k=_get(body, "top_k", (int,), 0),
        min_p=_number(body, "min_p", 0.0),
        seed=_get(body, "seed", (int,)),
        stop=stops, stop_token_ids=_int_list(body, "stop_token_ids"),
        ignore_eos=_get(body, "ignore_eos", (bool,), False),
        logprobs=logprobs,
        presence_penalty=_number(body, "presence_penalty", 0.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
        logit_bias=_logit_bias(body),
        min_tokens=_get(body, "min_tokens", (int,), 0),
        bad_words=tuple(bad_words),
        allowed_token_ids=_int_list(body, "allowed_token_ids"),
        include_stop_str_in_output=_get(body, "include_stop_str_in_output", (bool,), False),
        skip_special_tokens=_get(body, "skip_special_tokens", (bool,), True),
        prompt_logprobs=_get(body, "prompt_logprobs", (int,)),
        truncate_prompt_tokens=_get(body, "truncate_prompt_tokens", (int,)),
        add_special_tokens=_get(body, "add_special_tokens", (bool,)),
        n=_get(body, "n", (int,), 1),
        structured=structured_output(body), structured_field=structured_field(body),
        priority=_get(body, "priority", (int,), 0),
    )


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _get(body, "stream", (bool,), False)
    options = _get(body, "stream_options", (dict,), {})
    if options and not stream:
        raise _bad("'stream_options' is only allowed with 'stream': true", "stream_options")
    for key in options:
        if key != "include_usage":
            raise _bad(f"'stream_options.{show(key)}' is not supported (only "
                       "'include_usage')", "stream_options")
    return stream, bool(_get(options, "include_usage", (bool,), False,
                             param="stream_options.include_usage"))


def _common(body: Any, endpoint: str) -> None:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    check_fields(body, endpoint)
    n = _get(body, "n", (int,), 1)
    best_of = _get(body, "best_of", (int,))
    if best_of is not None and best_of != n:
        raise _bad(f"'best_of' ({best_of}) other than 'n' ({n}) is not implemented "
                   "(generate several, return the best); use 'n' and rank the choices "
                   "yourself", "best_of")


def _prompts(body: dict[str, Any]) -> tuple[str | list[int], ...]:
    """``prompt``: a text, token ids, or a batch of either (one choice per prompt)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return (prompt,)
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return (prompt,)
    if isinstance(prompt, list) and prompt:
        if len(prompt) > MAX_BATCH_PROMPTS:
            raise _bad(f"'prompt' has {len(prompt)} prompts; at most {MAX_BATCH_PROMPTS} per "
                       "request", "prompt")
        for i, p in enumerate(prompt):
            ok = isinstance(p, str) or (isinstance(p, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in p))
            if not ok:
                raise _bad(f"'prompt[{i}]' must be a string or a list of token ids, got "
                           f"{show(p)}", "prompt")
        return tuple(prompt)
    raise _bad("'prompt' must be a string, a list of token ids, or a non-empty list of "
               "either (a batch)", "prompt")


def parse_completion(body: Any) -> ParsedRequest:
    """A ``/v1/completions`` body; ``max_tokens`` defaults to 16, as in OpenAI's API."""
    _common(body, COMPLETIONS)
    prompts = _prompts(body)
    logprobs = _get(body, "logprobs", (int,))
    stream, include_usage = _stream_options(body)
    args = _sampling(body, _get(body, "max_tokens", (int,), 16), logprobs)
    echo = _get(body, "echo", (bool,), False)
    if echo and logprobs is not None and args.prompt_logprobs is None:
        args = replace(args, prompt_logprobs=logprobs)  # the echoed prompt's logprobs
    return ParsedRequest(
        model=_get(body, "model", (str,), ""), prompts=prompts, messages=None, args=args,
        stream=stream, include_usage=include_usage,
        return_token_ids=_get(body, "return_token_ids", (bool,), False), chat_logprobs=False,
        echo=echo,
        return_tokens_as_token_ids=_get(body, "return_tokens_as_token_ids", (bool,), False),
        request_id=_get(body, "request_id", (str,)))


def parse_chat(body: Any) -> ParsedRequest:
    """A ``/v1/chat/completions`` body; no ``max_tokens`` means up to the model's length."""
    _common(body, CHAT)
    chat = chat_parts(body)
    max_tokens = _get(body, "max_completion_tokens", (int,))
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", (int,))
    want = _get(body, "logprobs", (bool,), False)
    top = _get(body, "top_logprobs", (int,))
    if top is not None and not want:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    stream, include_usage = _stream_options(body)
    args = with_tool_constraint(_sampling(body, max_tokens, (top or 0) if want else None),
                                chat.tools)
    return ParsedRequest(
        model=_get(body, "model", (str,), ""), prompts=(), messages=chat.messages, args=args,
        stream=stream, include_usage=include_usage,
        return_token_ids=_get(body, "return_token_ids", (bool,), False), chat_logprobs=want,
        chat=chat.options, echo=_get(body, "echo", (bool,), False),
        return_tokens_as_token_ids=_get(body, "return_tokens_as_token_ids", (bool,), False),
        request_id=_get(body, "request_id", (str,)), tools=chat.tools)


def _only(body: dict[str, Any], allowed: set[str], route: str) -> None:
    for key in body:
        if key not in allowed:
            raise _bad(f"unknown field {show(key)} for {route}",
                       key if isinstance(key, str) else None)


async def tokenize(body: Any, validator: Validator) -> tuple[list[int], bool]:
    """vLLM's ``/tokenize`` body -> (token ids, whether to return their strings)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    _only(body, {"model", "prompt", "messages", "add_special_tokens", "return_token_strs",
                 "add_generation_prompt", "continue_final_message", "chat_template",
                 "chat_template_kwargs"}, "/tokenize")
    model = _get(body, "model", (str,), "")
    validator.check_model(model)
    strs = _get(body, "return_token_strs", (bool,), False)
    add_special = _get(body, "add_special_tokens", (bool,))
    if "messages" in body:
        if "prompt" in body:
            raise _bad("give 'prompt' or 'messages', not both", "prompt")
        ids = await validator.tokenize_chat(chat_messages(body), chat_options(body),
                                            bool(add_special))
        return ids, strs
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise _bad("'prompt' must be a string (or give 'messages')", "prompt")
    return await validator.tokenize(prompt, True if add_special is None else add_special), strs


def parse_detokenize(body: Any) -> tuple[str, list[int]]:
    """vLLM's ``/detokenize`` body -> (model, token ids)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    _only(body, {"model", "tokens"}, "/detokenize")
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise _bad("'tokens' must be a list of token ids", "tokens")
    return _get(body, "model", (str,), ""), tokens

# ---------------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_logprobs(lps: Sequence[TokenLogprobs], token_text: TokenText,
                        offset: int = 0) -> dict[str, Any]:
    """Legacy completions ``logprobs``: tokens, their logprobs, top alternatives, offsets."""
    tokens, offsets = [], []
    for lp in lps:
        tokens.append(token_text(lp.token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{token_text(t): p for t, p in lp.top} for lp in lps],
            "text_offset": offsets}


def prompt_logprobs(lps: Sequence[TokenLogprobs], token_text: TokenText) -> list[Any]:
    """vLLM's ``prompt_logprobs``: None for the first prompt token, then per token a map
    ``{token id: {"logprob", "rank", "decoded_token"}}`` of it and its top alternatives."""
    out: list[Any] = [None]
    for lp in lps:
        entry = {str(lp.token_id): {"logprob": lp.logprob, "rank": lp.rank,
                                    "decoded_token": token_text(lp.token_id)}}
        for rank, (t, p) in enumerate(lp.top, 1):
            entry.setdefault(str(t), {"logprob": p, "rank": rank,
                                      "decoded_token": token_text(t)})
        out.append(entry)
    return out


def echo_logprobs(prompt_ids: Sequence[int], lps: Sequence[TokenLogprobs],
                  token_text: TokenText) -> dict[str, Any]:
    """Legacy completions ``logprobs`` of an echoed prompt (the first token has none)."""
    tokens = [token_text(t) for t in prompt_ids]
    offsets, offset = [], 0
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens,
            "token_logprobs": [None] + [lp.logprob for lp in lps],
            "top_logprobs": [None] + [{token_text(t): p for t, p in lp.top} for lp in lps],
            "text_offset": offsets}


def chat_logprobs(lps: Sequence[TokenLogprobs], token_text: TokenText) -> dict[str, Any]:
    """Chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}, ...]}``."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob),
                         "top_logprobs": [entry(t, p) for t, p in lp.top]} for lp in lps]}


def completion_choice(text: str, finish_reason: str | None, logprobs: dict[str, Any] | None,
                      token_ids: list[int] | None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": logprobs,
                              "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def chat_choice(content: str | None, finish_reason: str | None,
                logprobs: dict[str, Any] | None, token_ids: list[int] | None, *,
                delta: bool, role: bool = False) -> dict[str, Any]:
    """A chat choice: the whole ``message``, or (``delta``) a stream chunk's ``delta``."""
    body: dict[str, Any] = {}
    if role or not delta:
        body["role"] = "assistant"
    if content is not None:
        body["content"] = content
    choice: dict[str, Any] = {"index": 0, "delta" if delta else "message": body,
                              "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def envelope(rid: str, obj: str, created: int, model: str, choices: list[dict[str, Any]],
             usage_body: dict[str, Any] | None = None, *, with_usage: bool = False,
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A response or stream chunk around ``choices`` (``usage`` present if ``with_usage``
    or given)."""
    out: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model,
                           "choices": choices}
    if usage_body is not None or with_usage:
        out["usage"] = usage_body
    if extra:
        out.update(extra)
    return out
