"""The OpenAI-compatible HTTP front, served by the router process beside gRPC.

``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions``,
``POST /v1/chat/completions`` (streamed as server-sent events when ``stream`` is true),
``GET /health`` and ``GET /metrics`` (Prometheus text). Every generation goes through
``Router.prepare`` and ``Router.run``, the same validation and request path as gRPC; errors
come back in OpenAI's error shape with the matching status (400 bad input, 401 bad key,
404 unknown model, 429 overload, 503 no workers), and so does anything unexpected (500, a
short message; the traceback stays in the router's log). A body that is not JSON, nested
too deep to parse, or carries text that is not valid Unicode is a 400 naming what is wrong.
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

import json
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pdserve.engine.sampling import TokenLogprobs
from pdserve.router import openai_types as oai
from pdserve.router.errors import public_reason
from pdserve.router.flow import Delta, RequestError
from pdserve.router.metrics import CONTENT_TYPE
from pdserve.router.validation import Prepared

if TYPE_CHECKING:
    from pdserve.router.server import Router

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_BODY_CAP = 256 << 20
"""No body is ever read past this, whatever the prompt bound says."""


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def _error(code: str, message: str) -> web.Response:
    return _json(*oai.error_body(code, message))


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
            return _error(exc.code, exc.message)
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
            rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
            router.validator.check_request_id(rid)
            prepared = await router.prepare(parsed.model, parsed.prompt, parsed.args,
                                            parsed.messages)
        except RequestError as exc:
            router.count_refused(exc.code)
            return _error(exc.code, exc.message)
        reply = _Reply(self, parsed, prepared, chat, rid)
        deltas = router.run(rid, prepared, arrival)
        if parsed.stream:
            return await self._stream(request, reply, deltas)
        try:
            async with aclosing(deltas) as stream:
                async for delta in stream:
                    reply.add(delta)
        except RequestError as exc:
            return _error(exc.code, exc.message)
        return _json(200, reply.whole())

    async def _stream(self, request: web.Request, reply: _Reply,
                      deltas: AsyncIterator[Delta]) -> web.StreamResponse:
        """Stream ``deltas`` as SSE chunks. The first delta is awaited before the response
        starts, so that an admission error still gets its HTTP status."""
        async with aclosing(deltas) as stream:  # type: ignore[type-var]
            try:
                first = await anext(stream)
            except RequestError as exc:
                return _error(exc.code, exc.message)
            except StopAsyncIteration:
                first = None
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-cache",
                                                   "X-Request-Id": reply.rid})
            await response.prepare(request)
            try:
                opening = reply.first_chunk()
                if opening is not None:
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
                await response.write(_sse(oai.error_body(exc.code, exc.message)[1]))
            except ConnectionResetError:
                logger.info("%s: client went away mid-stream", reply.rid)
                return response
            await response.write(_sse("[DONE]"))
            await response.write_eof()
        return response


class _Reply:
    """Accumulates one request's deltas into OpenAI response bodies or stream chunks."""

    def __init__(self, front: HttpFront, parsed: oai.ParsedRequest, prepared: Prepared,
                 chat: bool, rid: str) -> None:
        self.front = front
        self.parsed = parsed
        self.chat = chat
        self.rid = rid
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())
        self.model = parsed.model or front.router.model_name  # the name the client used
        self.prompt_ids = prepared.prompt
        self.want_logprobs = parsed.args.logprobs is not None
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self._offset = 0

    def add(self, delta: Delta) -> None:
        self.text.append(delta.text)
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.usage = oai.usage(delta.prompt_tokens, delta.completion_tokens,
                                   delta.cached_tokens)

    def _logprobs(self, lps: list[TokenLogprobs]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        if self.chat:
            return oai.chat_logprobs(lps, self.front._token)
        out = oai.completion_logprobs(lps, self.front._token, self._offset)
        self._offset += sum(len(t) for t in out["tokens"])
        return out

    def _choice(self, text: str | None, finish: str | None, lps: list[TokenLogprobs],
                ids: list[int], *, delta: bool, role: bool = False) -> dict[str, Any]:
        token_ids = ids if self.parsed.return_token_ids else None
        if self.chat:
            return oai.chat_choice(text, finish, self._logprobs(lps), token_ids, delta=delta,
                                   role=role)
        return oai.completion_choice(text or "", finish, self._logprobs(lps), token_ids)

    def _extra(self) -> dict[str, Any] | None:
        return {"prompt_token_ids": self.prompt_ids} if self.parsed.return_token_ids else None

    def whole(self) -> dict[str, Any]:
        """The non-streamed response."""
        choice = self._choice("".join(self.text), self.finish_reason, self.logprobs,
                              self.token_ids, delta=False)
        return oai.envelope(self.id, self.object, self.created, self.model, [choice],
                            self.usage, with_usage=True, extra=self._extra())

    def first_chunk(self) -> dict[str, Any] | None:
        """The opening chunk: the assistant role (chat) or, for completions, the prompt's
        token ids if asked for (else none)."""
        if not (self.chat or self.parsed.return_token_ids):
            return None
        choice = self._choice("", None, [], [], delta=True, role=True)
        return self._chunk([choice], extra=self._extra())

    def chunks(self, delta: Delta) -> list[dict[str, Any]]:
        """The stream chunk of one delta (none if it carries nothing)."""
        self.add(delta)
        if not (delta.token_ids or delta.text or delta.finish_reason):
            return []
        choice = self._choice(delta.text, delta.finish_reason, delta.logprobs,
                              delta.token_ids, delta=True)
        return [self._chunk([choice])]

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        return self._chunk([], usage_body=self.usage)

    def _chunk(self, choices: list[dict[str, Any]], usage_body: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return oai.envelope(self.id, obj, self.created, self.model, choices, usage_body,
                            with_usage=self.parsed.include_usage, extra=extra)
