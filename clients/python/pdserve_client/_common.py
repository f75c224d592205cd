"""What the sync and asyncio clients share: channel settings, request building, retry timing.

Pure functions and small frozen values; no I/O except reading a certificate file once at
client construction.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format, wrappers_pb2

from ._proto import generation_pb2 as pb
from .errors import error_for

DEFAULT_TARGET = "127.0.0.1:50051"

# The standard health service (grpc.health.v1). Its messages have the same wire format as
# protobuf wrappers: HealthCheckRequest{string service = 1} is a StringValue and
# HealthCheckResponse{ServingStatus status = 1} is an Int32Value, so the client needs only
# protobuf, not grpcio-health-checking.
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
HEALTH_SERVING = 1


def health_request_serializer(service: str) -> bytes:
    return wrappers_pb2.StringValue(value=service).SerializeToString()


def health_response_deserializer(data: bytes) -> int:
    return wrappers_pb2.Int32Value.FromString(data).value


@dataclass(frozen=True)
class ChannelConfig:
    """How to reach and authenticate to a pdserve router (validated at construction)."""

    target: str
    metadata: tuple[tuple[str, str], ...]
    credentials: grpc.ChannelCredentials | None
    timeout: float | None
    retries: int
    backoff: float


def make_channel_config(
    target: str,
    api_key: str | None,
    tls: bool,
    root_certificates: bytes | str | os.PathLike[str] | None,
    timeout: float | None,
    retries: int,
    backoff: float,
) -> ChannelConfig:
    """Validate the client options. ``root_certificates`` (PEM bytes or a file path) implies TLS;
    ``tls=True`` without it trusts the system roots."""
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if backoff < 0:
        raise ValueError(f"backoff must be >= 0, got {backoff}")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
    credentials = None
    if tls or root_certificates is not None:
        roots = root_certificates
        if roots is not None and not isinstance(roots, bytes):
            with open(roots, "rb") as f:
                roots = f.read()
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
    metadata: tuple[tuple[str, str], ...] = ()
    if api_key:
        metadata = (("authorization", f"Bearer {api_key}"),)
    return ChannelConfig(target, metadata, credentials, timeout, retries, backoff)


class Deadline:
    """The absolute end of one call, retries included; ``None`` timeout = no deadline."""

    def __init__(self, timeout: float | None) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left (never negative), or ``None`` without a deadline."""
        if self._end is None:
            return None
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0.0

    def expired_error(self) -> Exception:
        return error_for(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call")


def retry_delay(config: ChannelConfig, attempt: int, deadline: Deadline) -> float | None:
    """Seconds to wait before retry number ``attempt`` (0-based), or ``None`` to give up.

    Gives up when ``config.retries`` retries are spent or the wait would outlast the deadline.
    The wait is ``backoff * 2**attempt`` scaled by a random factor in [0.5, 1] so that many
    clients do not retry in lockstep.
    """
    if attempt >= config.retries:
        return None
    delay = config.backoff * (2**attempt) * random.uniform(0.5, 1.0)
    left = deadline.remaining()
    if left is not None and delay >= left:
        return None
    return delay


def is_retryable(err: grpc.RpcError) -> bool:
    return getattr(err, "code", lambda: None)() == grpc.StatusCode.UNAVAILABLE


def build_sampling(
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    logprobs: int | None = None,
    sampling: Mapping[str, Any] | None = None,
) -> pb.SamplingParams:
    """The wire ``SamplingParams``; ``sampling`` sets further fields by their .proto names
    (a message field such as ``structured`` from a dict: ``{"json_schema": "..."}``);
    ``ValueError`` for a name the message does not have."""
    params = pb.SamplingParams(
        top_k=top_k,
        min_p=min_p,
        stop=[stop] if isinstance(stop, str) else list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
    )
    if max_tokens is not None:
        params.max_tokens = max_tokens
    if temperature is not None:
        params.temperature = temperature
    if top_p is not None:
        params.top_p = top_p
    if seed is not None:
        params.seed = seed
    if logprobs is not None:
        params.logprobs = logprobs
    fields = pb.SamplingParams.DESCRIPTOR.fields_by_name
    for name, value in (sampling or {}).items():
        if name not in fields:
            raise ValueError(f"SamplingParams has no field {name!r}")
        field = getattr(params, name)
        if isinstance(value, Mapping) and fields[name].message_type is not None and not (
                fields[name].message_type.GetOptions().map_entry):
            json_format.ParseDict(value, field)
        elif isinstance(value, Mapping):
            field.update(value)
        elif isinstance(value, (list, tuple)):
            field.extend(value)
        else:
            setattr(params, name, value)
    return params


def _json_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _chat_message(message: Any) -> pb.ChatMessage:
    if hasattr(message, "to_dict"):  # a ChatMessage answer, appended as is
        message = message.to_dict()
    if not isinstance(message, Mapping):
        raise TypeError(f"a chat message must be a dict (OpenAI's shape), got {type(message)}")
    calls = [pb.ToolCall(id=c.get("id", ""), function=pb.FunctionCall(
                 name=c["function"]["name"],
                 arguments=_json_text(c["function"].get("arguments", "{}"))))
             for c in message.get("tool_calls") or ()]
    content = message.get("content")
    if isinstance(content, list):  # OpenAI's text parts
        content = "".join(part["text"] for part in content)
    return pb.ChatMessage(role=message["role"], content=content or "",
                          name=message.get("name") or "",
                          tool_call_id=message.get("tool_call_id") or "", tool_calls=calls)


def _tool(tool: Mapping[str, Any]) -> pb.Tool:
    fn = tool.get("function", tool)  # OpenAI's {"type": "function", "function": {...}}
    params = fn.get("parameters")
    return pb.Tool(function=pb.FunctionDefinition(
        name=fn["name"], description=fn.get("description") or "",
        parameters="" if params is None else _json_text(params)))


def build_chat_request(
    messages: Sequence[Any],
    *,
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: str | Mapping[str, Any] | None,
    parallel_tool_calls: bool | None,
    chat_template_kwargs: Mapping[str, Any] | None,
    add_generation_prompt: bool | None,
    continue_final_message: bool,
    sampling: pb.SamplingParams,
    request_id: str,
    priority: int,
    model: str,
) -> pb.ChatRequest:
    """The wire ``ChatRequest`` from OpenAI-shaped messages, tools and tool choice (see
    ``Client.chat``). A tool's ``parameters`` may be a dict or JSON text."""
    request = pb.ChatRequest(
        request_id=request_id, messages=[_chat_message(m) for m in messages],
        sampling=sampling, priority=priority, model=model,
        tools=[_tool(t) for t in tools or ()],
        continue_final_message=continue_final_message)
    if isinstance(tool_choice, str):
        request.tool_choice.mode = tool_choice
    elif tool_choice is not None:
        name = tool_choice.get("function", tool_choice).get("name")
        request.tool_choice.function.name = name
    if parallel_tool_calls is not None:
        request.parallel_tool_calls = parallel_tool_calls
    if chat_template_kwargs:
        request.chat_template_kwargs = json.dumps(dict(chat_template_kwargs))
    if add_generation_prompt is not None:
        request.add_generation_prompt = add_generation_prompt
    return request


def build_generate_request(
    prompt: str | Sequence[int],
    *,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int,
    min_p: float,
    seed: int | None,
    stop: str | Sequence[str],
    stop_token_ids: Sequence[int],
    ignore_eos: bool,
    logprobs: int | None,
    request_id: str,
    priority: int,
    model: str,
    sampling: Mapping[str, Any] | None = None,
) -> pb.GenerateRequest:
    """The wire request; ``prompt`` is text or token ids. Raises ``TypeError`` for other types.
    ``sampling``: further ``SamplingParams`` fields by their .proto names (``n``,
    ``presence_penalty``, ``logit_bias``, ``bad_words``, ...); ``ValueError`` for a name the
    message does not have.

    Values are range-checked by the server (INVALID_ARGUMENT), not here, so that the client and
    the server never disagree about what is valid.
    """
    params = build_sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, min_p=min_p, seed=seed, stop=stop,
                            stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
                            logprobs=logprobs, sampling=sampling)
    request = pb.GenerateRequest(
        request_id=request_id, sampling=params, priority=priority, model=model
    )
    if isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, Sequence) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        request.token_ids.ids.extend(prompt)
        # An empty id list must still select the token_ids branch of the oneof.
        request.token_ids.SetInParent()
    else:
        raise TypeError(f"prompt must be a str or a list of int token ids, got {type(prompt)}")
    return request
