"""pdserve client SDK: generate text from a pdserve router over gRPC (sync and asyncio).

Needs only ``grpcio`` and ``protobuf``. Example::

    from pdserve_client import Client, InvalidArgument

    with Client("127.0.0.1:50051", api_key="secret", timeout=60) as client:
        print(client.generate("The capital of France is", max_tokens=16).text)
        for chunk in client.stream("Once upon a time", max_tokens=64, temperature=0.8):
            print(chunk.text, end="", flush=True)      # break here cancels the request
        try:
            client.generate("", max_tokens=-1)
        except InvalidArgument as err:
            print("rejected:", err.message)
        answer = client.chat([{"role": "user", "content": "Weather in Paris?"}],
                             tools=[{"type": "function", "function": {
                                 "name": "get_weather", "parameters": {"type": "object"}}}],
                             tool_choice="required")
        for call in answer.message.tool_calls:         # ToolCall(id, name, arguments)
            print(call.name, call.arguments)           # arguments: JSON text

``chat()`` / ``chat_stream()`` take OpenAI-shaped messages and tools and return the
assistant's ``ChatMessage`` (``content``, ``tool_calls``) / ``ChatChunk``s with content and
``ToolCallDelta`` fragments. ``AsyncClient`` has the same methods as coroutines; its
``stream()`` is used with ``async with client.stream(...) as chunks: async for chunk in
chunks: ...``.
"""

from __future__ import annotations

from ._version import __version__
from .aio import AsyncClient, AsyncStream
from .client import Client, Stream
from .errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PdserveError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .types import (
    ChatChunk,
    ChatCompletion,
    ChatMessage,
    Chunk,
    Completion,
    ModelInfo,
    Stats,
    Timing,
    TokenLogprob,
    TokenLogprobs,
    ToolCall,
    ToolCallDelta,
    Usage,
    WorkerStats,
)

__all__ = [
    "__version__",
    "AsyncClient",
    "AsyncStream",
    "Cancelled",
    "ChatChunk",
    "ChatCompletion",
    "ChatMessage",
    "Chunk",
    "Client",
    "Completion",
    "DeadlineExceeded",
    "InvalidArgument",
    "NotFound",
    "ModelInfo",
    "PdserveError",
    "ResourceExhausted",
    "Stats",
    "Stream",
    "Timing",
    "TokenLogprob",
    "TokenLogprobs",
    "ToolCall",
    "ToolCallDelta",
    "Unauthenticated",
    "Unavailable",
    "Usage",
    "WorkerStats",
]
