"""The OpenAI wire format: request bodies in, response bodies and stream chunks out.

Pure functions over JSON-shaped dicts (no aiohttp, no router state), so that what the HTTP
front accepts and answers can be read in one place. Parsing raises
``RequestError("invalid_argument", ...)`` naming the offending field. Supported: one
choice (``n`` 1), ``max_tokens`` (chat also ``max_completion_tokens``), ``temperature``,
``top_p``, ``seed``, ``stop``, ``logprobs`` (completions: an int; chat: a bool plus
``top_logprobs``), ``stream`` and ``stream_options.include_usage``; and, as vLLM does,
the extensions ``top_k``, ``min_p``, ``ignore_eos``, ``stop_token_ids`` and
``return_token_ids`` (choices then carry the output ``token_ids``). Options that would
change the output but are not implemented (penalties, ``n`` > 1, ``echo``, tools) are
refused rather than ignored. Type errors name the field and quote at most a few dozen
characters of the value; numeric bounds are those of ``pdserve.engine.sampling_limits``,
checked when the router builds the sampling parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pdserve.engine.sampling import TokenLogprobs
from pdserve.engine.sampling_limits import show
from pdserve.router.flow import RequestError
from pdserve.router.validation import SamplingArgs

ERROR_STATUS = {
    "invalid_argument": (400, "invalid_request_error"),
    "unauthenticated": (401, "authentication_error"),
    "not_found": (404, "not_found_error"),
    "model_not_found": (404, "invalid_request_error"),  # OpenAI's own shape for this case
    "too_large": (413, "invalid_request_error"),
    "resource_exhausted": (429, "rate_limit_exceeded"),
    "internal": (500, "internal_error"),
    "unavailable": (503, "service_unavailable"),
}
"""Router error code -> (HTTP status, OpenAI error ``type``)."""

TokenText = Callable[[int], str]
"""Renders one token id as text (for logprobs)."""


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A valid request body: the prompt (text, ids, or chat messages) and its options."""

    model: str
    prompt: str | list[int] | None
    messages: list[dict[str, str]] | None
    args: SamplingArgs
    stream: bool
    include_usage: bool
    return_token_ids: bool
    chat_logprobs: bool


def error_body(code: str, message: str, param: str | None = None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of an error in OpenAI's shape."""
    status, kind = ERROR_STATUS.get(code, (500, "internal_error"))
    return status, {"error": {"message": message, "type": kind, "param": param,
                              "code": code}}


def _bad(message: str) -> RequestError:
    return RequestError("invalid_argument", message)


def _get(body: dict[str, Any], name: str, types: tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise _bad(f"'{name}' must be {' or '.join(t.__name__ for t in types)}, got "
                   f"{show(value)}")
    return value


def _refuse_unsupported(body: dict[str, Any]) -> None:
    n = _get(body, "n", (int,), 1)
    if n != 1:
        raise _bad(f"'n' must be 1 (one choice per request), got {show(n)}")
    best_of = _get(body, "best_of", (int,), 1)
    if best_of != 1:
        raise _bad(f"'best_of' must be 1, got {show(best_of)}")
    for name in ("presence_penalty", "frequency_penalty"):
        if _get(body, name, (int, float), 0) != 0:
            raise _bad(f"'{name}' is not supported; leave it 0")
    if _get(body, "echo", (bool,), False):
        raise _bad("'echo' is not supported")
    if _get(body, "logit_bias", (dict,), {}):
        raise _bad("'logit_bias' is not supported")
    for name in ("tools", "functions", "response_format", "suffix"):
        if body.get(name) not in (None, [], {}):
            raise _bad(f"'{name}' is not supported")


def _sampling(body: dict[str, Any], max_tokens: int | None, logprobs: int | None) -> SamplingArgs:
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise _bad(f"'stop' must be a string or a list of strings, got {show(stop)}")
    stop_ids = _get(body, "stop_token_ids", (list,), [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise _bad(f"'stop_token_ids' must be a list of integers, got {show(stop_ids)}")
    temperature = _get(body, "temperature", (int, float))
    top_p = _get(body, "top_p", (int, float))
    return SamplingArgs(
        max_tokens=max_tokens,
        temperature=None if temperature is None else float(temperature),
        top_p=None if top_p is None else float(top_p),
        top_k=_get(body, "top_k", (int,), 0),
        min_p=float(_get(body, "min_p", (int, float), 0.0)),
        seed=_get(body, "seed", (int,)),
        stop=stops, stop_token_ids=tuple(stop_ids),
        ignore_eos=_get(body, "ignore_eos", (bool,), False),
        logprobs=logprobs,
    )


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _get(body, "stream", (bool,), False)
    options = _get(body, "stream_options", (dict,), {})
    if options and not stream:
        raise _bad("'stream_options' is only allowed with 'stream': true")
    return stream, bool(_get(options, "include_usage", (bool,), False))


def parse_completion(body: Any) -> ParsedRequest:
    """A ``/v1/completions`` body; ``max_tokens`` defaults to 16, as in OpenAI's API."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    _refuse_unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise _bad("'prompt' must be a string or a list of token ids (one prompt per "
                       "request)")
    elif not isinstance(prompt, str):
        raise _bad("'prompt' must be a string or a list of token ids")
    logprobs = _get(body, "logprobs", (int,))
    stream, include_usage = _stream_options(body)
    return ParsedRequest(
        model=_get(body, "model", (str,), ""), prompt=prompt, messages=None,
        args=_sampling(body, _get(body, "max_tokens", (int,), 16), logprobs),
        stream=stream, include_usage=include_usage,
        return_token_ids=_get(body, "return_token_ids", (bool,), False), chat_logprobs=False)


def _message_text(message: Any, index: int) -> dict[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise _bad(f"'messages[{index}]' must be an object with a 'role'")
    content = message.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                raise _bad(f"'messages[{index}].content': only text parts are supported")
            parts.append(part["text"])
        text = "".join(parts)
    else:
        raise _bad(f"'messages[{index}].content' must be a string or a list of text parts")
    return {"role": message["role"], "content": text}


def parse_chat(body: Any) -> ParsedRequest:
    """A ``/v1/chat/completions`` body; no ``max_tokens`` means up to the model's length."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    _refuse_unsupported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list")
    parsed = [_message_text(m, i) for i, m in enumerate(messages)]
    max_tokens = _get(body, "max_completion_tokens", (int,))
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", (int,))
    want = _get(body, "logprobs", (bool,), False)
    top = _get(body, "top_logprobs", (int,))
    if top is not None and not want:
        raise _bad("'top_logprobs' needs 'logprobs': true")
    stream, include_usage = _stream_options(body)
    return ParsedRequest(
        model=_get(body, "model", (str,), ""), prompt=None, messages=parsed,
        args=_sampling(body, max_tokens, (top or 0) if want else None),
        stream=stream, include_usage=include_usage,
        return_token_ids=_get(body, "return_token_ids", (bool,), False), chat_logprobs=want)


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
