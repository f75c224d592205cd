"""The synchronous pdserve client: one gRPC channel, thread-safe, closed by ``close()``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc

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


class Stream:
    """An iterator over one generation's ``Chunk``s (a chat's: ``ChatChunk``s).

    Closing it (``close()``, leaving a ``with`` block, or dropping it after ``break``) cancels
    the RPC so the server frees the request. The call is retried on UNAVAILABLE only until the
    first chunk arrives, so a retry never duplicates tokens. Errors raise ``PdserveError``.
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

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Any:
        while True:
            if self._closed:
                raise StopIteration
            if self._call is None:
                if self._deadline.expired():
                    self._closed = True
                    raise self._deadline.expired_error()
                self._call = self._start(self._deadline.remaining())
            try:
                msg = next(self._call)
            except StopIteration:
                self._closed = True
                self._call = None
                raise
            except grpc.RpcError as err:
                self._call = None
                delay = None
                if not self._received and is_retryable(err):
                    delay = retry_delay(self._config, self._attempt, self._deadline)
                if delay is None:
                    self._closed = True
                    raise from_rpc_error(err) from None
                self._attempt += 1
                time.sleep(delay)
                continue
            self._received = True
            return self._convert(msg)

    def cancel(self) -> None:
        """Cancel the RPC if it is still running; later iteration stops. Idempotent."""
        self._closed = True
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    close = cancel

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        # Dropping an unfinished stream (``break`` out of a for loop) must free the request.
        try:
            self.cancel()
        except Exception:
            pass


class Client:
    """A blocking client for the pdserve router.

    ``timeout`` is the default deadline in seconds for each call (retries and, for streams,
    every token included); ``None`` means no deadline. Calls failing with UNAVAILABLE are
    retried up to ``retries`` times with exponential backoff starting at ``backoff`` seconds.
    ``api_key`` is sent as ``authorization: Bearer <key>``. ``root_certificates`` (PEM bytes or a
    file path) implies TLS; ``tls=True`` alone trusts the system roots. One client may be shared
    by threads; ``close()`` (or leaving a ``with`` block) ends every call in flight.
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
            self._channel = grpc.secure_channel(target, self._config.credentials)
        else:
            self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._health = self._channel.unary_unary(
            HEALTH_CHECK_METHOD,
            request_serializer=health_request_serializer,
            response_deserializer=health_response_deserializer,
        )

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled. Idempotent."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _deadline(self, timeout: float | None) -> Deadline:
        return Deadline(self._config.timeout if timeout is None else timeout)

    def _unary(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            if deadline.expired():
                raise deadline.expired_error()
            try:
                return method(request, timeout=deadline.remaining(), metadata=self._config.metadata)
            except grpc.RpcError as err:
                delay = retry_delay(self._config, attempt, deadline) if is_retryable(err) else None
                if delay is None:
                    raise from_rpc_error(err) from None
                attempt += 1
                time.sleep(delay)

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
    ) -> Stream:
        """Start a generation and return its chunks as they are produced.

        ``prompt`` is text or token ids; unset sampling options take the server's defaults
        (see ``SamplingParams`` in the .proto); ``sampling`` sets any other of its fields by
        name (``{"n": 4, "presence_penalty": 0.5}``): with ``n`` > 1, ``Chunk.index`` names
        each chunk's choice. The RPC starts on the first ``next()``.
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

        return Stream(start, self._config, self._deadline(timeout))

    def generate(
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
        with self.stream(
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
            for chunk in chunks:
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
    ) -> Stream:
        """Start a chat completion and return its ``ChatChunk``s as they are produced.

        ``messages`` are OpenAI-shaped dicts (``{"role": "user", "content": "..."}``; an
        assistant's ``tool_calls`` and a tool result's ``tool_call_id`` as OpenAI has them) or
        ``ChatMessage`` answers of earlier calls. ``tools`` are OpenAI's function tools
        (``{"type": "function", "function": {"name", "description", "parameters"}}``,
        ``parameters`` a JSON schema as a dict or JSON text); ``tool_choice`` is ``"none"``,
        ``"auto"`` (the default with tools; needs the server's ``--tool-call-parser``),
        ``"required"`` or ``{"type": "function", "function": {"name": ...}}``. Each chunk
        carries the content and ``ToolCallDelta``s added; the last one (per choice) the whole
        ``message``. ``sampling`` sets any other ``SamplingParams`` field by name (e.g.
        ``{"structured": {"json_schema": "..."}}``); other options as for ``stream()``.
        """
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

        return Stream(start, self._config, self._deadline(timeout), ChatChunk.from_proto)

    def chat(
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
        """Run a chat completion to the end: the assistant's ``message`` (content and
        ``tool_calls``), ``finish_reason`` (``"tool_calls"`` when it called tools) and usage.
        Arguments as for ``chat_stream()``; one choice (``n`` > 1: use ``chat_stream()``)."""
        if sampling and sampling.get("n", 1) != 1:
            raise ValueError("chat() returns one choice; use chat_stream() with n > 1")
        builder = ChatCompletionBuilder()
        with self.chat_stream(
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
            for chunk in chunks:
                builder.add(chunk)
        return builder.build()

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models the service serves."""
        resp = self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [ModelInfo.from_proto(m) for m in resp.models]

    def tokenize(self, text: str, *, model: str = "", timeout: float | None = None) -> list[int]:
        """Token ids of ``text`` under the model's tokenizer (``model=""``: the default)."""
        request = pb.TokenizeRequest(text=text, model=model)
        return list(self._unary(self._stub.Tokenize, request, timeout).token_ids)

    def detokenize(self, token_ids: Sequence[int], *, model: str = "",
                   skip_special_tokens: bool = True, timeout: float | None = None) -> str:
        """The text of ``token_ids`` under the model's tokenizer."""
        request = pb.DetokenizeRequest(token_ids=list(token_ids), model=model,
                                       skip_special_tokens=skip_special_tokens)
        return str(self._unary(self._stub.Detokenize, request, timeout).text)

    def version(self, *, timeout: float | None = None) -> str:
        """The server's version."""
        return str(self._unary(self._stub.GetVersion, pb.GetVersionRequest(), timeout).version)

    def stats(self, *, timeout: float | None = None) -> Stats:
        """Router, balancer and worker statistics."""
        return Stats.from_proto(self._unary(self._stub.GetStats, pb.GetStatsRequest(), timeout))

    def health(self, *, timeout: float | None = None) -> bool:
        """True if the standard health service reports the server (service ``""``) SERVING.

        False when it reports anything else or cannot be reached; other failures (for example
        UNAUTHENTICATED) raise ``PdserveError``. Not retried.
        """
        deadline = self._deadline(timeout)
        try:
            status = self._health("", timeout=deadline.remaining(), metadata=self._config.metadata)
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return False
            raise from_rpc_error(err) from None
        return status == HEALTH_SERVING
