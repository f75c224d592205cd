"""Typed, immutable results of pdserve calls, converted from the wire messages.

Nothing here holds a reference to a protobuf message: results can be kept, compared and
passed between threads freely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc

from ._proto import generation_pb2 as pb
from .errors import PdserveError


@dataclass(frozen=True)
class Usage:
    """Token counts of one request; ``cached_tokens`` prompt tokens came from a prefix cache."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @classmethod
    def from_proto(cls, msg: pb.Usage) -> Usage:
        return cls(msg.prompt_tokens, msg.completion_tokens, msg.cached_tokens)


@dataclass(frozen=True)
class Timing:
    """Per-request timing in seconds, measured by the router (see the .proto for each phase)."""

    queue_s: float
    prefill_s: float
    transfer_s: float
    first_token_s: float
    total_s: float

    @classmethod
    def from_proto(cls, msg: pb.Timing) -> Timing:
        return cls(msg.queue_s, msg.prefill_s, msg.transfer_s, msg.first_token_s, msg.total_s)


@dataclass(frozen=True)
class TokenLogprob:
    """One candidate token and its log probability."""

    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's log probability and the ``top`` alternatives at that position."""

    token_id: int
    logprob: float
    top: tuple[TokenLogprob, ...] = ()

    @classmethod
    def from_proto(cls, msg: pb.TokenLogprobs) -> TokenLogprobs:
        top = tuple(TokenLogprob(t.token_id, t.logprob) for t in msg.top)
        return cls(msg.token_id, msg.logprob, top)


@dataclass(frozen=True)
class Chunk:
    """One streamed message: the tokens and text added since the previous chunk.

    ``finish_reason`` (``"stop"``, ``"length"`` or ``"abort"``), ``usage`` and ``timing`` are
    set on the last chunk only and are ``None`` before it. ``logprobs`` is empty unless the
    request asked for logprobs.
    """

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprobs, ...]
    finish_reason: str | None
    usage: Usage | None
    timing: Timing | None
    stop_reason: str | None = None
    index: int = 0
    """The choice this chunk belongs to (requests with ``n`` > 1)."""

    @classmethod
    def from_proto(cls, msg: pb.GenerateResponse) -> Chunk:
        return cls(
            request_id=msg.request_id,
            token_ids=tuple(msg.token_ids),
            text=msg.text,
            logprobs=tuple(TokenLogprobs.from_proto(lp) for lp in msg.logprobs),
            finish_reason=msg.finish_reason or None,
            usage=Usage.from_proto(msg.usage) if msg.HasField("usage") else None,
            timing=Timing.from_proto(msg.timing) if msg.HasField("timing") else None,
            stop_reason=msg.stop_reason or None,
            index=msg.index,
        )


@dataclass(frozen=True)
class Completion:
    """A whole generation: every chunk's tokens and text joined, plus the final metadata.

    ``stop_reason`` is the stop string or stop token id that ended the output, if any.
    """

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str
    usage: Usage | None
    timing: Timing | None
    logprobs: tuple[TokenLogprobs, ...] = ()
    stop_reason: str | None = None


class CompletionBuilder:
    """Accumulates a stream's chunks into a ``Completion`` (one per stream, not thread-safe)."""

    def __init__(self) -> None:
        self._request_id = ""
        self._token_ids: list[int] = []
        self._text: list[str] = []
        self._logprobs: list[TokenLogprobs] = []
        self._last: Chunk | None = None

    def add(self, chunk: Chunk) -> None:
        self._request_id = chunk.request_id or self._request_id
        self._token_ids.extend(chunk.token_ids)
        self._text.append(chunk.text)
        self._logprobs.extend(chunk.logprobs)
        self._last = chunk

    def build(self) -> Completion:
        """The completion; raises ``PdserveError`` if the stream ended without a final chunk."""
        last = self._last
        if last is None or last.finish_reason is None:
            raise PdserveError(
                grpc.StatusCode.UNKNOWN,
                f"stream for request {self._request_id or '?'} ended without a finish_reason",
            )
        return Completion(
            request_id=self._request_id,
            token_ids=tuple(self._token_ids),
            text="".join(self._text),
            finish_reason=last.finish_reason,
            usage=last.usage,
            timing=last.timing,
            logprobs=tuple(self._logprobs),
            stop_reason=last.stop_reason,
        )


@dataclass(frozen=True)
class ToolCall:
    """A function call the assistant made: ``arguments`` is JSON text (the model's own)."""

    id: str
    name: str
    arguments: str

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's shape: ``{"id", "type": "function", "function": {"name", "arguments"}}``."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ChatMessage:
    """An assistant's answer: its text (``None`` when it only calls tools) and tool calls.

    ``to_dict()`` gives OpenAI's message shape, so the answer can be appended to the
    conversation for the next turn (``chat()`` also takes a ``ChatMessage`` as is).
    """

    role: str
    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()

    @classmethod
    def from_proto(cls, msg: pb.ChatMessage) -> ChatMessage:
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments)
                      for c in msg.tool_calls)
        return cls(msg.role, msg.content or None, calls)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        return out


@dataclass(frozen=True)
class ToolCallDelta:
    """A streamed fragment of tool call ``index``: its first carries ``id`` and ``name``
    (``arguments`` ""), the next ones fragments of ``arguments`` (``id``/``name`` None).
    Joined per ``index``, the fragments are ``ChatMessage.tool_calls``."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True)
class ChatChunk:
    """One streamed chat message: the content and tool-call fragments added since the
    previous one, and the tokens they came from.

    On a choice's last chunk, ``finish_reason`` (``"stop"``, ``"length"``, ``"abort"``, or
    ``"tool_calls"`` when the model called tools), ``usage``, ``timing`` and ``message`` (the
    whole assistant message) are set; ``None`` before.
    """

    request_id: str
    index: int
    content: str
    tool_calls: tuple[ToolCallDelta, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...]
    finish_reason: str | None
    usage: Usage | None
    timing: Timing | None
    message: ChatMessage | None
    stop_reason: str | None = None
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()
    """With ``prompt_logprobs`` asked for, on the first chunk: those of prompt tokens 1, 2,
    ... (the first token has none)."""

    @classmethod
    def from_proto(cls, msg: pb.ChatResponse) -> ChatChunk:
        return cls(
            request_id=msg.request_id,
            index=msg.index,
            content=msg.content,
            tool_calls=tuple(ToolCallDelta(d.index, d.id or None, d.function.name or None,
                                           d.function.arguments) for d in msg.tool_calls),
            token_ids=tuple(msg.token_ids),
            logprobs=tuple(TokenLogprobs.from_proto(lp) for lp in msg.logprobs),
            finish_reason=msg.finish_reason or None,
            usage=Usage.from_proto(msg.usage) if msg.HasField("usage") else None,
            timing=Timing.from_proto(msg.timing) if msg.HasField("timing") else None,
            message=ChatMessage.from_proto(msg.message) if msg.HasField("message") else None,
            stop_reason=msg.stop_reason or None,
            prompt_logprobs=tuple(TokenLogprobs.from_proto(lp) for lp in msg.prompt_logprobs),
        )


@dataclass(frozen=True)
class ChatCompletion:
    """A whole chat completion: the assistant's ``message`` and the final metadata."""

    request_id: str
    message: ChatMessage
    finish_reason: str
    usage: Usage | None
    timing: Timing | None
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprobs, ...] = ()
    stop_reason: str | None = None


class ChatCompletionBuilder:
    """Accumulates one chat stream's chunks (one choice) into a ``ChatCompletion``."""

    def __init__(self) -> None:
        self._request_id = ""
        self._token_ids: list[int] = []
        self._logprobs: list[TokenLogprobs] = []
        self._last: ChatChunk | None = None

    def add(self, chunk: ChatChunk) -> None:
        self._request_id = chunk.request_id or self._request_id
        self._token_ids.extend(chunk.token_ids)
        self._logprobs.extend(chunk.logprobs)
        self._last = chunk

    def build(self) -> ChatCompletion:
        """The completion; raises ``PdserveError`` if the stream ended without a final chunk."""
        last = self._last
        if last is None or last.finish_reason is None or last.message is None:
            raise PdserveError(
                grpc.StatusCode.UNKNOWN,
                f"chat stream for request {self._request_id or '?'} ended without its message",
            )
        return ChatCompletion(
            request_id=self._request_id,
            message=last.message,
            finish_reason=last.finish_reason,
            usage=last.usage,
            timing=last.timing,
            token_ids=tuple(self._token_ids),
            logprobs=tuple(self._logprobs),
            stop_reason=last.stop_reason,
        )


@dataclass(frozen=True)
class ModelInfo:
    """A model the service serves; ``id`` is the name to pass as ``model``."""

    id: str
    max_model_len: int
    vocab_size: int
    dtype: str

    @classmethod
    def from_proto(cls, msg: pb.ModelInfo) -> ModelInfo:
        return cls(msg.id, msg.max_model_len, msg.vocab_size, msg.dtype)


@dataclass(frozen=True)
class WorkerStats:
    """One prefill or decode worker's load, KV block use and prefix-cache counters."""

    worker_id: str
    role: str
    alive: bool
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    prefill_tokens_computed: int

    @classmethod
    def from_proto(cls, msg: pb.WorkerStats) -> WorkerStats:
        return cls(
            worker_id=msg.worker_id,
            role=msg.role,
            alive=msg.alive,
            running=msg.running,
            waiting=msg.waiting,
            kv_blocks_total=msg.kv_blocks_total,
            kv_blocks_used=msg.kv_blocks_used,
            prefix_queried_tokens=msg.prefix_queried_tokens,
            prefix_hit_tokens=msg.prefix_hit_tokens,
            prefill_tokens_computed=msg.prefill_tokens_computed,
        )


@dataclass(frozen=True)
class Stats:
    """Router, balancer and worker statistics; ``metrics`` holds samples by metric name."""

    workers: tuple[WorkerStats, ...]
    requests_total: int
    requests_running: int
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, msg: pb.GetStatsResponse) -> Stats:
        return cls(
            workers=tuple(WorkerStats.from_proto(w) for w in msg.workers),
            requests_total=msg.requests_total,
            requests_running=msg.requests_running,
            metrics=dict(msg.metrics),
        )
