"""The asyncio pdserve client (grpc.aio): create and use it inside one running event loop."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio

from ._common import (
    DEFAULT_TARGET,
    HEALTH_CHECK_METHOD,
    HEALTH_SERVING,
    ChannelConfig,
    Deadline,
    build_chat_request,
    build_generate_request,
    build_sampling,
    health_request_serializer,
    health_response_deserializer,
    is_retryable,
    make_channel_config,
    retry_delay,
)
from ._proto import generation_pb2 as pb
from ._proto import generation_pb2_grpc as pb_grpc
from .errors import from_rpc_error
from .types import (
    ChatChunk,
    ChatCompletion,
    ChatCompletionBuilder,
    Chunk,
    Completion,
    CompletionBuilder,
    ModelInfo,
    Stats,
)

T = TypeVar("T")


class AsyncStream:
    """An async iterator over one generation's ``Chunk``s (a chat's: ``ChatChunk``s).

    ``await aclose()``, leaving an ``async with`` block, or dropping the stream cancels the RPC
    so the server frees the request (``break`` alone does not close an async iterator: prefer
    ``async with``). Retried on UNAVAILABLE only before the first chunk, so a retry never
    duplicates tokens. Errors raise ``PdserveError``.
    """

    def __init__(
        self,
        start: Callable[[float | None], Any],
        config: ChannelConfig,
        deadline: Deadline,
        convert: Callable[[Any], Any] = Chunk.from_proto,
    ) -> None:
        self._convert = convert
        self._start = start
        self._config = config
        self._deadline = deadline
        self._call: Any = None
        self._attempt = 0
        self._received = False
        self._closed = False

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Any:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._call is None:
                if self._deadline.expired():
                    self._closed = True
                    raise self._deadline.expired_error()
                self._call = self._start(self._deadline.remaining())
            try:
                msg = await self._call.read()
            except grpc.RpcError as err:
                self._call = None
                delay = None
                if not self._received and is_retryable(err):
                    delay = retry_delay(self._config, self._attempt, self._deadline)
                if delay is None:
                    self._closed = True
                    raise from_rpc_error(err) from None
                self._attempt += 1
                await asyncio.sleep(delay)
                continue
            if msg is grpc.aio.EOF:
                self._closed = True
                self._call = None
                raise StopAsyncIteration
            self._received = True
            return self._convert(msg)

    def cancel(self) -> None:
        """Cancel the RPC if it is still running; later iteration stops. Idempotent."""
        self._closed = True
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    async def aclose(self) -> None:
        """Cancel the RPC if it is still running (async spelling of ``cancel``)."""
        self.cancel()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        try:
            self.cancel()
        except Exception:
            pass


class AsyncClient:
    """An asyncio client for the pdserve router; options as for ``Client``.

    Construct it inside the event loop that uses it; ``await close()`` (or leaving an
    ``async with`` block) ends every call in flight.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | os.PathLike[str] | None = None,
        timeout: float | None = None,
        retries: int = 3,
        backoff: float = 0.2,
    ) -> None:
        self._config = make_channel_config(
            target, api_key, tls, root_certificates, timeout, retries, backoff
        )
        if self._config.credentials is not None:
            self._channel = grpc.aio.secure_channel(target, self._config.credentials)
        else:
            self._channel = grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._health = self._channel.unary_unary(
            HEALTH_CHECK_METHOD,
            request_serializer=health_request_serializer,
            response_deserializer=health_response_deserializer,
        )

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled. Idempotent."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _deadline(self, timeout: float | None) -> Deadline:
        return Deadline(self._config.timeout if timeout is None else timeout)

    async def _unary(
        self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None
    ) -> T:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            if deadline.expired():
                raise deadline.expired_error()
            try:
                return await method(
                    request, timeout=deadline.remaining(), metadata=self._config.metadata
                )
            except grpc.RpcError as err:
                delay = retry_delay(self._config, attempt, deadline) if is_retryable(err) else None
                if delay is None:
                    raise from_rpc_error(err) from None
                attempt += 1
                await asyncio.sleep(delay)

    def stream(
        self,
        prompt: str | Sequence[int],
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
        request_id: str = "",
        priority: int = 0,
        model: str = "",
        sampling: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> AsyncStream:
        """Start a generation and return its chunks as they are produced (``async for``).

        Arguments as for ``Client.stream``; the RPC starts on the first ``__anext__``.
        """
        request = build_generate_request(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            logprobs=logprobs,
            request_id=request_id,
            priority=priority,
            model=model,
            sampling=sampling,
        )
        metadata = self._config.metadata

        def start(remaining: float | None) -> Any:
            return self._stub.Generate(request, timeout=remaining, metadata=metadata)

        return AsyncStream(start, self._config, self._deadline(timeout))

    async def generate(
        self,
        prompt: str | Sequence[int],
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
        request_id: str = "",
        priority: int = 0,
        model: str = "",
        sampling: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Completion:
        """Run a generation to the end and return it whole; arguments as for ``stream()``."""
        builder = CompletionBuilder()
        async with self.stream(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            logprobs=logprobs,
            request_id=request_id,
            priority=priority,
            model=model,
            sampling=sampling,
            timeout=timeout,
        ) as chunks:
            async for chunk in chunks:
                builder.add(chunk)
        return builder.build()

    def chat_stream(
        self,
        messages: Sequence[Any],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        logprobs: int | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        request_id: str = "",
        priority: int = 0,
        model: str = "",
        sampling: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> AsyncStream:
        """Start a chat completion and return its ``ChatChunk``s as they are produced
        (``async for``); arguments as for ``Client.chat_stream``."""
        request = build_chat_request(
            messages,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            chat_template_kwargs=chat_template_kwargs,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            sampling=build_sampling(max_tokens=max_tokens, temperature=temperature,
                                    top_p=top_p, seed=seed, stop=stop, logprobs=logprobs,
                                    sampling=sampling),
            request_id=request_id,
            priority=priority,
            model=model,
        )
        metadata = self._config.metadata

        def start(remaining: float | None) -> Any:
            return self._stub.Chat(request, timeout=remaining, metadata=metadata)

        return AsyncStream(start, self._config, self._deadline(timeout),
                           ChatChunk.from_proto)

    async def chat(
        self,
        messages: Sequence[Any],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        logprobs: int | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        request_id: str = "",
        priority: int = 0,
        model: str = "",
        sampling: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> ChatCompletion:
        """Run a chat completion to the end; as ``Client.chat``."""
        if sampling and sampling.get("n", 1) != 1:
            raise ValueError("chat() returns one choice; use chat_stream() with n > 1")
        builder = ChatCompletionBuilder()
        async with self.chat_stream(
            messages,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            logprobs=logprobs,
            chat_template_kwargs=chat_template_kwargs,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            request_id=request_id,
            priority=priority,
            model=model,
            sampling=sampling,
            timeout=timeout,
        ) as chunks:
            async for chunk in chunks:
                builder.add(chunk)
        return builder.build()

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models the service serves."""
        resp = await self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [ModelInfo.from_proto(m) for m in resp.models]

    async def tokenize(
        self, text: str, *, model: str = "", timeout: float | None = None
    ) -> list[int]:
        """Token ids of ``text`` under the model's tokenizer (``model=""``: the default)."""
        request = pb.TokenizeRequest(text=text, model=model)
        return list((await self._unary(self._stub.Tokenize, request, timeout)).token_ids)

    async def detokenize(self, token_ids: Sequence[int], *, model: str = "",
                         skip_special_tokens: bool = True,
                         timeout: float | None = None) -> str:
        """The text of ``token_ids`` under the model's tokenizer."""
        request = pb.DetokenizeRequest(token_ids=list(token_ids), model=model,
                                       skip_special_tokens=skip_special_tokens)
        return str((await self._unary(self._stub.Detokenize, request, timeout)).text)

    async def version(self, *, timeout: float | None = None) -> str:
        """The server's version."""
        resp = await self._unary(self._stub.GetVersion, pb.GetVersionRequest(), timeout)
        return str(resp.version)

    async def stats(self, *, timeout: float | None = None) -> Stats:
        """Router, balancer and worker statistics."""
        resp = await self._unary(self._stub.GetStats, pb.GetStatsRequest(), timeout)
        return Stats.from_proto(resp)

    async def health(self, *, timeout: float | None = None) -> bool:
        """True if the standard health service reports the server SERVING; see ``Client``."""
        deadline = self._deadline(timeout)
        try:
            status = await self._health(
                "", timeout=deadline.remaining(), metadata=self._config.metadata
            )
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return False
            raise from_rpc_error(err) from None
        return status == HEALTH_SERVING
