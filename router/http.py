"""The OpenAI-compatible HTTP front, served by the router process beside gRPC.

``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions``,
``POST /v1/chat/completions`` (streamed as server-sent events when ``stream`` is true),
``GET /health`` and ``GET /metrics`` (Prometheus text). Every generation goes through
``Router.prepare`` and ``Router.run``, the same validation and request path as gRPC; errors
come back in OpenAI's error shape with the matching status (400 bad input, 401 bad key,
404 unknown model, 429 overload, 503 no workers, 504 deadline), and so does anything
unexpected (500, a short message; the traceback stays in the router's log). A body that is not
JSON, nested too deep to parse, or carries text that is not valid Unicode is a 400 naming what
is wrong.
A chat request to a model without a chat template (and no ``--chat-template``) is a 400: no
generic template is guessed.

aiohttp's ``web`` server runs on the router's own asyncio loop (no second thread or
process, no copy of the router's state). With ``handler_cancellation`` a client that
disconnects cancels its handler task; the request generator is closed on every exit path
(``contextlib.aclosing``), so ``Flow`` aborts the request on every worker at once, as a
gRPC cancel does.

With the router's ``tls_cert``/``tls_key`` the port serves HTTPS only. ``/v1/*`` needs
``Authorization: Bearer KEY`` when the router has an API key, and so does ``/metrics``
unless ``metrics_open``; ``/health`` is always open (probes hold no key). A
``metrics_port`` serves ``/metrics`` (and ``/health``) alone, without a key, in plain HTTP,
for a scraper on a private network.
"""

from __future__ import annotations

import functools
import json
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pdserve._version import __version__
from pdserve.engine.sampling import TokenLogprobs
from pdserve.router import openai_types as oai
from pdserve.router.errors import param_of, public_reason
from pdserve.router.flow import Delta, RequestError
from pdserve.router.merge import merged
from pdserve.router.metrics import CONTENT_TYPE
from pdserve.router.openai_tools import (
    ToolStream,
    apply_tool_calls,
    check_tool_parser,
    tool_chunks,
)
from pdserve.router.validation import Prepared

if TYPE_CHECKING:
    from pdserve.router.server import Router

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_BODY_CAP = 256 << 20
"""No body is ever read past this, whatever the prompt bound says."""


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def _error(code: str, message: str, param: str | None = None) -> web.Response:
    if param is None and code == "invalid_argument":
        param = param_of(message)
    return _json(*oai.error_body(code, message, param))


def _sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _ssl_context(cert: bytes, key: bytes) -> ssl.SSLContext:
    """A server context from PEM bytes (``ssl`` loads chains from files only)."""
    import os
    import tempfile

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as tmp:
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert_path, cert), (key_path, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


class HttpFront:
    """The aiohttp application of one ``Router``; ``start`` binds, ``stop`` drains."""

    def __init__(self, router: Router) -> None:
        self.router = router
        config = router.config
        # Bodies are bounded in _body, from the prompt bound in force at the time.
        app = web.Application(middlewares=[self._errors], client_max_size=MAX_BODY_CAP)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model_id:.+}", self._model)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/detokenize", self._detokenize)
        app.router.add_get("/version", self._version)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=config.drain_timeout_s)
        self._metrics_runner: web.AppRunner | None = None
        if config.metrics_port is not None:
            metrics_app = web.Application(middlewares=[self._errors])
            metrics_app.router.add_get("/metrics", self._open_metrics)
            metrics_app.router.add_get("/health", self._health)
            self._metrics_runner = web.AppRunner(metrics_app, access_log=None,
                                                 shutdown_timeout=1.0)
        self._token_text: dict[int, str] = {}
        self.metrics_port: int | None = None

    async def start(self, host: str, port: int) -> int:
        """Serve on ``host:port`` (0: any free port); returns the bound port. Also binds
        the metrics port, if configured (``metrics_port`` tells which)."""
        config = self.router.config
        ctx = None
        if config.tls_cert and config.tls_key:
            ctx = _ssl_context(config.tls_cert, config.tls_key)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ctx)
        await site.start()
        if self._metrics_runner is not None:
            await self._metrics_runner.setup()
            await web.TCPSite(self._metrics_runner, host, config.metrics_port).start()
            self.metrics_port = int(self._metrics_runner.addresses[0][1])
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop accepting, let handlers finish (up to the drain timeout), close."""
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        await self._runner.cleanup()

    # ------------------------------------------------------------------ plumbing

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:  # unknown route, wrong method, body too large
            if exc.status < 400:
                raise
            code = "not_found" if exc.status == 404 else "invalid_argument"
            status, body = oai.error_body(code, f"{request.method} {request.path[:64]}: "
                                                f"{exc.reason}")
            return _json(exc.status, body)
        except RequestError as exc:
            return _error(exc.code, exc.message, exc.param)
        except Exception as exc:  # never a traceback to the client
            logger.exception("%s %s failed", request.method, request.path[:64])
            return _error("internal", f"internal error ({public_reason(exc)})")

    def _authorized(self, request: web.Request) -> bool:
        return self.router.authorized(request.headers.get("Authorization"))

    def _token(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.router.tokenizer.decode(
                [token_id], skip_special_tokens=False)
        return text

    def max_body_bytes(self) -> int:
        """The largest body a valid request can have: a prompt of ``max_prompt_bytes``,
        JSON-escaped (up to 6 bytes per byte), and the rest of the request."""
        return min(MAX_BODY_CAP, max(1 << 20, 6 * self.router.validator.max_prompt_bytes
                                     + (64 << 10)))

    async def _body(self, request: web.Request) -> Any:
        limit = self.max_body_bytes()
        if request.content_length is not None and request.content_length > limit:
            raise RequestError("too_large", f"the request body has {request.content_length} "
                               f"bytes; at most {limit}")
        chunks, size = [], 0
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > limit:
                raise RequestError("too_large", f"the request body is over {limit} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError("invalid_argument", "the request body is not JSON") from None
        except RecursionError:
            raise RequestError("invalid_argument", "the request body is nested too deeply "
                               "to parse") from None

    # ------------------------------------------------------------------ endpoints

    async def _health(self, request: web.Request) -> web.Response:
        if self.router.healthy():
            return _json(200, {"status": "ok"})
        return _error("unavailable", "no live prefill or decode worker")

    async def _metrics(self, request: web.Request) -> web.Response:
        if not (self.router.config.metrics_open or self._authorized(request)):
            return _error("unauthenticated", "missing or wrong API key "
                                             "('Authorization: Bearer KEY'); or serve "
                                             "/metrics with --metrics-open / --metrics-port")
        return await self._open_metrics(request)

    async def _open_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.router.metrics.render(),
                            headers={"Content-Type": CONTENT_TYPE})

    def _card(self, name: str) -> dict[str, Any]:
        r = self.router
        return {"id": name, "object": "model", "created": 0, "owned_by": "pdserve",
                "root": str(r.model_path), "parent": None,
                "max_model_len": r.cluster.max_model_len()}

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error("unauthenticated", "missing or wrong API key "
                                             "('Authorization: Bearer KEY')")
        return _json(200, {"object": "list",
                           "data": [self._card(n) for n in self.router.model_names]})

    async def _model(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error("unauthenticated", "missing or wrong API key "
                                             "('Authorization: Bearer KEY')")
        name = request.match_info["model_id"]
        try:
            self.router.validator.check_model(name)
        except RequestError as exc:
            return _error(exc.code, exc.message)
        return _json(200, self._card(name))

    async def _version(self, request: web.Request) -> web.Response:
        return _json(200, {"version": __version__})

    async def _tokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``/tokenize``: ``{"prompt": text}`` or ``{"messages": [...]}`` (rendered
        with the chat template and its options) -> ``{"count", "max_model_len", "tokens"}``
        (plus ``token_strs`` with ``return_token_strs``)."""
        if not self._authorized(request):
            return _error("unauthenticated", "missing or wrong API key "
                                             "('Authorization: Bearer KEY')")
        body = await self._body(request)
        ids, token_strs = await oai.tokenize(body, self.router.validator)
        out: dict[str, Any] = {"count": len(ids),
                               "max_model_len": self.router.validator.max_model_len,
                               "tokens": ids}
        if token_strs:
            out["token_strs"] = [self._token(t) for t in ids]
        return _json(200, out)

    async def _detokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``/detokenize``: ``{"tokens": [ids]}`` -> ``{"prompt": text}``."""
        if not self._authorized(request):
            return _error("unauthenticated", "missing or wrong API key "
                                             "('Authorization: Bearer KEY')")
        body = await self._body(request)
        model, ids = oai.parse_detokenize(body)
        self.router.validator.check_model(model)
        return _json(200, {"prompt": await self.router.validator.detokenize(ids)})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrival = time.monotonic()
        router = self.router
        if not self._authorized(request):
            router.count_refused("unauthenticated")
            return _error("unauthenticated", "missing or wrong API key "
                                             "('Authorization: Bearer KEY')")
        try:
            body = await self._body(request)
            parsed = oai.parse_chat(body) if chat else oai.parse_completion(body)
            rid = parsed.request_id or request.headers.get("X-Request-Id") or uuid.uuid4().hex
            router.validator.check_request_id(rid)
            check_tool_parser(parsed.tools, router.config.tool_call_parser)
            if chat:
                tools = parsed.tools.template_tools if parsed.tools is not None else None
                prepared = [await router.prepare(parsed.model, None, parsed.args,
                                                 parsed.messages, parsed.chat, tools)]
            else:
                prepared = [await router.prepare(parsed.model, p, parsed.args)
                            for p in parsed.prompts]
            echo = self._echo_texts(parsed, prepared) if parsed.echo else None
        except RequestError as exc:
            router.count_refused(exc.code)
            return _error(exc.code, exc.message, exc.param)
        reply = _Reply(self, parsed, prepared, chat, rid, echo)
        if len(prepared) == 1:
            deltas = router.run(rid, prepared[0], arrival)
        else:  # a batch: each prompt is its own request
            deltas = _merged([router.run(f"{rid}-{i}", p, arrival)
                              for i, p in enumerate(prepared)], parsed.args.n)
        if parsed.stream:
            return await self._stream(request, reply, deltas)
        try:
            async with aclosing(deltas) as stream:
                async for delta in stream:
                    reply.add(delta)
        except RequestError as exc:
            return _error(exc.code, exc.message, exc.param)
        return _json(200, reply.whole())

    def _echo_texts(self, parsed: oai.ParsedRequest, prepared: list[Prepared]) -> list[str]:
        """What ``echo`` puts before each prompt's output: the prompt (completions), or the
        last message's content when it is the assistant's (chat, as vLLM does)."""
        if parsed.messages is not None:
            if parsed.args.logprobs is not None:
                raise RequestError("invalid_argument", "chat 'echo' with 'logprobs' is not "
                                   "implemented (use /v1/completions with 'echo')", "echo")
            last = parsed.messages[-1]
            return [last["content"] if last["role"] == "assistant" else ""]
        return [p if isinstance(p, str) else self.router.tokenizer.decode(
                    q.prompt, skip_special_tokens=parsed.args.skip_special_tokens)
                for p, q in zip(parsed.prompts, prepared, strict=True)]

    async def _stream(self, request: web.Request, reply: _Reply,
                      deltas: AsyncIterator[Delta]) -> web.StreamResponse:
        """Stream ``deltas`` as SSE chunks. The first delta is awaited before the response
        starts, so that an admission error still gets its HTTP status."""
        async with aclosing(deltas) as stream:  # type: ignore[type-var]
            try:
                first = await anext(stream)
            except RequestError as exc:
                return _error(exc.code, exc.message, exc.param)
            except StopAsyncIteration:
                first = None
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-cache",
                                                   "X-Request-Id": reply.rid})
            await response.prepare(request)
            try:
                for opening in reply.first_chunks():
                    await response.write(_sse(opening))
                if first is not None:
                    for chunk in reply.chunks(first):
                        await response.write(_sse(chunk))
                async for delta in stream:
                    for chunk in reply.chunks(delta):
                        await response.write(_sse(chunk))
                if reply.parsed.include_usage:
                    await response.write(_sse(reply.usage_chunk()))
            except RequestError as exc:  # after the headers: report it in the stream
                await response.write(_sse(oai.error_body(exc.code, exc.message, exc.param)[1]))
            except ConnectionResetError:
                logger.info("%s: client went away mid-stream", reply.rid)
                return response
            await response.write(_sse("[DONE]"))
            await response.write_eof()
        return response


async def _merged(streams: list[AsyncIterator[Delta]], n: int) -> AsyncIterator[Delta]:
    """The deltas of several requests (one per prompt of a batch) as they come, each
    re-indexed to its choice (prompt ``i``'s choice ``j`` is ``i * n + j``). The first error
    ends the whole; closing this closes (aborts) every request still running."""
    async with aclosing(merged(streams)) as items:
        async for i, delta in items:
            delta.index += i * n
            yield delta


@dataclass(slots=True)
class _Choice:
    """One choice's output so far."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    offset: int = 0
    opened: bool = False


class _Reply:
    """Accumulates one request's deltas (of every choice) into OpenAI response bodies or
    stream chunks."""

    def __init__(self, front: HttpFront, parsed: oai.ParsedRequest, prepared: list[Prepared],
                 chat: bool, rid: str, echo: list[str] | None) -> None:
        self.front = front
        self.parsed = parsed
        self.chat = chat
        self.rid = rid
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())
        self.model = parsed.model or front.router.model_name  # the name the client used
        self.prompts = [p.prompt for p in prepared]
        self.n = parsed.args.n
        self.want_logprobs = parsed.args.logprobs is not None
        self.choices = [_Choice() for _ in range(len(prepared) * self.n)]
        self.echo = echo
        for i, choice in enumerate(self.choices):
            choice.offset = len(self._echo(i))
        self.prompt_lps: dict[int, list[TokenLogprobs]] = {}
        self.prompt_tokens = sum(len(p) for p in self.prompts)
        self.completion_tokens = 0
        self.cached_tokens: dict[int, int] = {}
        self._done = 0
        # Tool calls are parsed from the one choice's text (n > 1 with tools is refused).
        self.tools: ToolStream | None = None
        if chat and parsed.tools is not None:
            self.tools = ToolStream(parsed.tools, front.router.config.tool_call_parser)

    def _echo(self, index: int) -> str:
        return self.echo[index // self.n] if self.echo else ""

    def add(self, delta: Delta) -> _Choice:
        choice = self.choices[delta.index]
        if delta.prompt_logprobs is not None:
            self.prompt_lps[delta.index // self.n] = delta.prompt_logprobs
        choice.text.append(delta.text)
        choice.token_ids += delta.token_ids
        choice.logprobs += delta.logprobs
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
            self.completion_tokens += delta.completion_tokens
            self.cached_tokens[delta.index // self.n] = delta.cached_tokens
            self._done += 1
        return choice

    @property
    def usage(self) -> dict[str, Any] | None:
        if self._done < len(self.choices):
            return None
        return oai.usage(self.prompt_tokens, self.completion_tokens,
                         sum(self.cached_tokens.values()))

    def _token(self, token_id: int) -> str:
        if self.parsed.return_tokens_as_token_ids:
            return f"token_id:{token_id}"
        return self.front._token(token_id)

    def _logprobs(self, choice: _Choice, lps: list[TokenLogprobs]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        if self.chat:
            return oai.chat_logprobs(lps, self._token)
        out = oai.completion_logprobs(lps, self._token, choice.offset)
        choice.offset += sum(len(t) for t in out["tokens"])
        return out

    def _choice(self, index: int, text: str | None, finish: str | None,
                lps: list[TokenLogprobs], ids: list[int], *, delta: bool,
                role: bool = False, opening: bool = False) -> dict[str, Any]:
        """One choice's body; ``opening``: its first (for completions with ``echo``: the
        echoed prompt, with its logprobs when asked for)."""
        token_ids = ids if self.parsed.return_token_ids else None
        choice = self.choices[index]
        if self.chat:
            body = oai.chat_choice(text, finish, self._logprobs(choice, lps), token_ids,
                                   delta=delta, role=role)
        else:
            logprobs = self._logprobs(choice, lps)
            if opening and self.echo and logprobs is not None:
                prompt = oai.echo_logprobs(self.prompts[index // self.n],
                                           self.prompt_lps.get(index // self.n, []),
                                           self._token)
                logprobs = {k: prompt[k] + logprobs[k] for k in prompt}
            body = oai.completion_choice(text or "", finish, logprobs, token_ids)
            if opening and index // self.n in self.prompt_lps:
                body["prompt_logprobs"] = oai.prompt_logprobs(
                    self.prompt_lps[index // self.n], self._token)
        body["index"] = index
        return body

    def _extra(self) -> dict[str, Any] | None:
        if not self.parsed.return_token_ids:
            return None
        if len(self.prompts) == 1:
            return {"prompt_token_ids": self.prompts[0]}
        return {"prompt_token_ids": self.prompts}

    def whole(self) -> dict[str, Any]:
        """The non-streamed response."""
        choices = [self._choice(i, self._echo(i) + "".join(c.text), c.finish_reason,
                                c.logprobs, c.token_ids, delta=False, opening=True)
                   for i, c in enumerate(self.choices)]
        if self.tools is not None:
            for choice in choices:
                apply_tool_calls(choice, self.tools.req, self.tools.parser)
        extra = self._extra() or {}
        if self.chat and 0 in self.prompt_lps:  # vLLM: the chat response's top level
            extra["prompt_logprobs"] = oai.prompt_logprobs(self.prompt_lps[0], self._token)
        return oai.envelope(self.id, self.object, self.created, self.model, choices,
                            self.usage, with_usage=True, extra=extra)

    def first_chunks(self) -> list[dict[str, Any]]:
        """The chat opening chunks (per choice: the assistant role, and any echoed text);
        for completions, a chunk with the prompts' token ids if asked for. A completion
        choice's echo opens it when its first delta comes (with the prompt's logprobs)."""
        out = []
        if not self.chat:
            if self.parsed.return_token_ids:
                body = oai.completion_choice("", None, None, [])
                out.append(self._chunk([body], extra=self._extra()))
            return out
        for i, choice in enumerate(self.choices):
            choice.opened = True
            body = self._choice(i, self._echo(i), None, [], [], delta=True, role=True)
            out.append(self._chunk([body], extra=self._extra() if i == 0 else None))
        return out

    def chunks(self, delta: Delta) -> list[dict[str, Any]]:
        """The stream chunks of one delta (none if it carries nothing)."""
        self.add(delta)
        out = []
        choice = self.choices[delta.index]
        if not choice.opened:
            choice.opened = True
            if self.echo or delta.prompt_logprobs is not None:
                out.append(self._chunk([self._choice(delta.index, self._echo(delta.index),
                                                     None, [], [], delta=True,
                                                     opening=True)]))
        if not (delta.token_ids or delta.text or delta.finish_reason):
            return out
        if self.tools is not None:
            make = functools.partial(self._choice, delta.index)
            return out + [self._chunk([c]) for c in tool_chunks(self.tools, make, delta)]
        out.append(self._chunk([self._choice(delta.index, delta.text, delta.finish_reason,
                                             delta.logprobs, delta.token_ids, delta=True)]))
        return out

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        return self._chunk([], usage_body=self.usage)

    def _chunk(self, choices: list[dict[str, Any]], usage_body: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return oai.envelope(self.id, obj, self.created, self.model, choices, usage_body,
                            with_usage=self.parsed.include_usage, extra=extra)
