"""The router: pdserve's only public entry point, an asyncio gRPC server.

It authenticates, validates and tokenizes each request (bad input: INVALID_ARGUMENT with a
message naming the field), hands it to ``Flow`` (admission, balancing, streaming, failover),
and streams ``GenerateResponse`` messages back. Client cancel, deadline or disconnect
cancels the handler, and ``Flow`` releases the request on every worker at once; the
client's deadline also bounds the request's waits. No client ever reads a traceback: an
unexpected error is logged here and answered INTERNAL with a short message. The standard
health service and server reflection are served beside ``pdserve.v1.Generation``.

The router's view of the workers is pushed to it: every worker publishes its KV events and
load as they happen (``router.events`` applies them to this router's prefix index and load
view; a gap is repaired from a snapshot). Several routers may serve one cluster: the one
that creates the pools publishes a directory (``router.directory``), and a router whose
``PoolConfig.attach`` is set serves those pools instead of creating its own.

The OpenAI-compatible HTTP front (``router.http``, on ``RouterConfig.http_port``) runs on the
same event loop and goes through the same ``Router.prepare`` (validation) and ``Router.run``
(the request path, with its metrics): no second implementation of either. ``router.app``
wires both fronts to one ``Router`` and runs them.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from pdserve._version import __version__
from pdserve.engine.config import KVCacheSpec
from pdserve.engine.model.checkpoint import load_model_config
from pdserve.engine.tokenizer import NoChatTemplateError, Tokenizer
from pdserve.protos.pdserve.v1 import generation_pb2 as pb
from pdserve.protos.pdserve.v1 import generation_pb2_grpc as pb_grpc
from pdserve.router.balancer import BalancerConfig, PrefillChoice, make_balancer
from pdserve.router.chat import ChatParts, chat_parts, with_tool_constraint
from pdserve.router.cluster import Cluster, WorkerHandle
from pdserve.router.directory import ClusterInfo
from pdserve.router.errors import public_reason
from pdserve.router.events import EventSubscriber, endpoint_of
from pdserve.router.flow import Delta, Flow, FlowConfig, RequestError
from pdserve.router.grpc_chat import (
    ChatReply,
    chat_body,
    logprobs_pb,
    named_field,
    set_final,
)
from pdserve.router.grpc_service import Undecodable
from pdserve.router.grpc_structured import sampling_args
from pdserve.router.kv_pool import PullCostModel
from pdserve.router.metrics import RouterMetrics, WorkerSample
from pdserve.router.openai_tools import check_tool_parser
from pdserve.router.pool_config import PoolConfig
from pdserve.router.prefix_index import PrefixIndex
from pdserve.router.request_log import (
    StatsLog,
    StatsSample,
    WorkerLoadSample,
    access_line,
    access_logger,
    stats_logger,
)
from pdserve.router.served_model import served_names
from pdserve.router.stream import TokenInbox
from pdserve.router.text import TextPool
from pdserve.router.validation import (
    ChatOptions,
    Prepared,
    RequestLimits,
    SamplingArgs,
    Validator,
)
from pdserve.worker.protocol import PrefillResult, resolve_host

logger = logging.getLogger(__name__)

_CODES = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "model_not_found": grpc.StatusCode.NOT_FOUND,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "internal": grpc.StatusCode.INTERNAL,
}


@dataclass(frozen=True, slots=True)
class RouterConfig:
    pools: PoolConfig
    host: str = "127.0.0.1"
    port: int = 50051
    api_key: str | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    balancer: str = "prefix_aware"
    model_name: str = ""
    """Deprecated spelling of one served name; ``served_model_names`` wins."""
    served_model_names: tuple[str, ...] = ()
    """Names clients may use in ``model`` (default: the engine's ``model`` as given)."""
    chat_template: str | None = None
    """Jinja chat template for chat requests, instead of the model's own."""
    tool_call_parser: str | None = None
    """How tool calls are read out of "auto" outputs ("hermes"); None: "auto" is refused."""
    log_requests: bool = True
    """One access line per request at INFO (``pdserve.access``)."""
    stats_interval_s: float | None = None
    """A stats line at INFO this often (``pdserve.stats``); None: never."""
    flow: FlowConfig = field(default_factory=FlowConfig)
    http_port: int | None = None
    """The OpenAI-compatible HTTP front (and /metrics) on ``host``: None = off, 0 = any free
    port (``Router.http_port`` tells which). HTTPS with ``tls_cert``/``tls_key``."""
    metrics_port: int | None = None
    """``/metrics`` alone, without a key, on its own plain-HTTP port (None: off)."""
    metrics_open: bool = False
    """``/metrics`` on the HTTP front needs no API key (default: it needs the key)."""
    limits: RequestLimits = field(default_factory=RequestLimits)
    drain_timeout_s: float = 60.0
    """On stop, how long requests in flight may take to finish before they are cut."""
    pool_link_bytes_per_s: float = 1e9
    """Balancer ``kv_pool``: the link rate assumed for a prefill worker's pulls until it
    has measured its own (``pull_bytes_per_s`` in its stats)."""
    pool_latency_s: float = 0.005
    """Balancer ``kv_pool``: the fixed cost of one pull (the call to the holder, its wait
    for the end of its current step, the first byte)."""


class Router(pb_grpc.GenerationServicer):
    """Serves ``pdserve.v1.Generation`` over the worker pools of ``cluster``."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        engine_cfg = config.pools.engine
        from pdserve.engine.model.builtin import resolve_model

        started = time.monotonic()
        self.model_path = resolve_model(engine_cfg.model)
        self.model_config = load_model_config(self.model_path)
        self.model_names = served_names(
            engine_cfg.model, config.served_model_names or tuple(filter(None, [config.model_name])))
        self.model_name = self.model_names[0]
        self.tokenizer = Tokenizer(self.model_path)
        mc = self.model_config
        logger.info("model %s: %s (%s, %d layers, %d tokens of context); tokenizer and config "
                    "read in %.1f s", engine_cfg.model, self.model_path, mc.architecture,
                    mc.num_layers, mc.max_position_embeddings, time.monotonic() - started)
        self.text = TextPool(self.tokenizer, self.model_path, chat_template=config.chat_template)
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.cluster = Cluster(config.pools)
        self.index = PrefixIndex(engine_cfg.cache.block_size)
        self.events: EventSubscriber | None = None
        dtype = engine_cfg.dtype
        if dtype == "auto":
            dtype = "bfloat16" if engine_cfg.device.startswith("cuda") else "float32"
        self._block_bytes = KVCacheSpec(mc.num_layers, mc.num_kv_heads, mc.head_dim,
                                        engine_cfg.cache.block_size, dtype).block_bytes
        self.balancer = make_balancer(config.balancer, self.index, **self._pool_options())
        self.inbox: TokenInbox | None = None
        self.flow: Flow | None = None
        self._eos = tuple(sorted(eos))
        self._tasks: list[asyncio.Task[None]] = []
        self._active: set[str] = set()
        self.requests_total = 0
        self.outcomes: dict[str, int] = {}
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self.validator = Validator(
            self.model_names, self.tokenizer, self.model_config.vocab_size,
            lambda: self.cluster.max_model_len() or self.model_config.max_position_embeddings,
            self.text, config.limits)
        self.metrics = RouterMetrics(
            policy=self.balancer.name, balancer=self.balancer,
            workers=lambda: [WorkerSample(h.worker_id, h.role, h.alive, h.stats)
                             for h in self.cluster.workers.values()],
            failovers=lambda: self.flow.failovers if self.flow is not None else 0,
            running=lambda: len(self._active), model_name=self.model_name,
            waiting=lambda: self.flow.waiting if self.flow is not None else 0)

    def _pool_options(self) -> dict[str, Any]:
        """Policy ``kv_pool``: the decode workers' caches are a source too (their own index,
        fed by their events), and pulls are costed from this model's KV bytes per token."""
        if self.config.balancer != "kv_pool":
            return {}
        cfg = self.config
        bs = cfg.pools.engine.cache.block_size
        pull = PullCostModel(kv_bytes_per_token=max(1, self._block_bytes // bs),
                             link_bytes_per_s=cfg.pool_link_bytes_per_s,
                             latency_s=cfg.pool_latency_s, min_pull_tokens=bs)
        return {"decode_index": PrefixIndex(bs), "config": BalancerConfig(pull=pull)}

    # ------------------------------------------------------------------ lifecycle

    async def start(self, on_connected: Callable[[], None] | None = None) -> None:
        """Start the pools (``on_connected()`` once Ray is connected) and the token path."""
        await self.cluster.start(on_connected)
        self.inbox = TokenInbox(self.cluster.channel_key, resolve_host(self.config.pools.kv_host))
        self.inbox.start()
        self.cluster.router_endpoint = self.inbox.endpoint
        self.flow = Flow(self.cluster, self.inbox, self.tokenizer, self.balancer, self._eos,
                         self.config.flow, router_tag=self.cluster.instance)
        self.flow.on_prefill = self._on_prefill
        for h in self.cluster.pool("prefill"):
            self.index.add_worker(h.worker_id)
        self.events = EventSubscriber(
            self.cluster.channel_key,
            {"prefill": self.index, "decode": self.balancer.decode_index},
            self._snapshot, self.flow.loads.on_load, on_lag=self.metrics.event_lag.observe)
        self.events.start()
        for h in self.cluster.workers.values():
            self._subscribe(h)
        self.cluster.on_ready.append(self._subscribe)
        self.cluster.run_monitor(self._on_death)
        if not self.config.pools.attach:
            self.cluster.publish(ClusterInfo(
                self.config.pools, self.cluster.channel_key, self.model_names,
                self.config.chat_template, owner=self.inbox.endpoint))
        loop = asyncio.get_running_loop()
        if self.config.stats_interval_s:
            self._tasks.append(loop.create_task(self._log_stats(self.config.stats_interval_s)))
        await self._probe_all()

    def _subscribe(self, handle: WorkerHandle) -> None:
        endpoint = endpoint_of(handle.info)
        if self.events is not None and endpoint is not None:
            self.events.add_worker(handle.worker_id, handle.role, endpoint)

    async def _snapshot(self, worker_id: str) -> tuple[str, int, list[int], dict[str, float]]:
        return await self.cluster.workers[worker_id].actor.kv_snapshot.remote()

    async def _probe_all(self) -> None:
        for h in self.cluster.workers.values():
            h.stats = await h.actor.stats.remote()
        assert self.flow is not None
        self.flow.loads.refresh()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.flow is not None:
            await self.flow.calls.drain()
        await self.cluster.shutdown()
        if self.events is not None:
            await self.events.close()
        if self.inbox is not None:
            await self.inbox.close()
        self.text.close()

    def _on_prefill(self, choice: PrefillChoice, result: PrefillResult | None,
                    blocks: int) -> None:
        ok = None if result is None or (not result.ok and not result.retryable) else result.ok
        self.metrics.on_prefill(
            choice.predicted_ttft_s, choice.cached_tokens, ok,
            actual_ttft_s=result.prefill_s if result else 0.0,
            transfer_s=result.transfer_tail_s if result else 0.0,
            bytes_written=blocks * self._block_bytes)

    def healthy(self) -> bool:
        """True while both pools have a live worker (the service can answer)."""
        return bool(self.cluster.pool("prefill")) and bool(self.cluster.pool("decode"))

    async def _on_death(self, handle: WorkerHandle) -> None:
        if self.flow is not None:
            self.flow.on_worker_death(handle)

    def stats_sample(self) -> StatsSample:
        """The figures of the periodic stats line, now."""
        workers = tuple(
            WorkerLoadSample(h.role, int(h.stats.get("num_running", 0)),
                             int(h.stats.get("num_waiting", 0)),
                             int(h.stats.get("num_used_blocks", 0)),
                             int(h.stats.get("num_blocks", 0)),
                             int(h.stats.get("prefix_queried_tokens", 0)),
                             int(h.stats.get("prefix_hit_tokens", 0)))
            for h in self.cluster.workers.values() if h.alive)
        return StatsSample(time.monotonic(), self.metrics.prompt_tokens_total,
                           self.metrics.generation_tokens_total, len(self._active),
                           self.flow.waiting if self.flow is not None else 0, workers)

    async def _log_stats(self, interval_s: float) -> None:
        log = StatsLog()
        while True:
            line = log.line(self.stats_sample())
            if line is not None:
                stats_logger.info(line)
            await asyncio.sleep(interval_s)

    # ------------------------------------------------------------------ the request path

    async def prepare(self, model: str, prompt: str | Sequence[int] | None,
                      args: SamplingArgs,
                      messages: Sequence[dict[str, Any]] | None = None,
                      chat: ChatOptions | None = None,
                      tools: list[dict[str, Any]] | None = None) -> Prepared:
        """Validate and tokenize a request of either front (``RequestError`` if bad);
        ``tools`` are given to the chat template."""
        return await self.validator.prepare(model, prompt, args, messages, chat, tools)

    def authorized(self, header: str | None) -> bool:
        """Whether an ``authorization`` header value carries the API key (any, if none is
        configured); compared in constant time."""
        key = self.config.api_key
        if not key:
            return True
        return header is not None and hmac.compare_digest(header.encode(),
                                                          f"Bearer {key}".encode())

    def render_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """A conversation's prompt ids, rendered with ``--chat-template`` or else the model's
        own template; ``RequestError("invalid_argument")`` when there is neither."""
        try:
            return self.tokenizer.apply_chat_template(messages,
                                                      chat_template=self.config.chat_template)
        except NoChatTemplateError as exc:
            raise RequestError("invalid_argument", str(exc)) from None

    def count_refused(self, outcome: str) -> None:
        """Count a request a front refused before ``run`` (bad input, bad key)."""
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.metrics.requests.labels(outcome).inc()

    async def run(self, rid: str, prepared: Prepared, arrival: float,
                  deadline: float | None = None) -> AsyncIterator[Delta]:
        """The one request path of every front: ``Flow.generate`` plus the bookkeeping and
        metrics. Raises ``RequestError``; cancelling the caller (or closing this generator)
        aborts the request on every worker. Close it with ``contextlib.aclosing`` when the
        caller may stop early, so that the abort is immediate. ``deadline``
        (``time.monotonic()``) bounds the request's waits. An unexpected error is logged
        and raised as ``RequestError("internal")`` with a short message."""
        if rid in self._active:
            self.count_refused("invalid_argument")
            raise RequestError("invalid_argument", f"request id {rid!r} is in flight")
        assert self.flow is not None
        self._active.add(rid)
        self.requests_total += 1
        timer = self.metrics.track(len(prepared.prompt), arrival)
        outcome = "error"
        queue_s = None
        last: Delta | None = None
        try:
            async for delta in self.flow.generate(rid, prepared.prompt, prepared.params,
                                                  prepared.max_len, arrival, deadline,
                                                  prepared.priority):
                timer.on_tokens(len(delta.token_ids))
                if delta.finish_reason is not None:
                    outcome = delta.finish_reason
                    queue_s = delta.timing.get("queue_s")
                    last = delta
                yield delta
        except RequestError as exc:
            outcome = exc.code
            raise
        except Exception as exc:
            logger.exception("request %s failed", rid)
            outcome = "internal"
            raise RequestError("internal", f"internal error ({public_reason(exc)}); "
                               f"request id {rid}") from None
        except (asyncio.CancelledError, GeneratorExit):
            if outcome == "error":  # not closed after its last delta
                outcome = "cancelled"
            raise
        finally:
            self._active.discard(rid)
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            timer.finish(outcome, queue_s,
                         prefill_s=last.timing.get("prefill_s") if last is not None else None)
            if self.config.log_requests:
                assert timer.e2e_s is not None
                access_logger.info(access_line(
                    rid, self.model_name, outcome, timer.prompt_tokens, timer.tokens,
                    last.cached_tokens if last is not None else 0, timer.ttft_s, timer.e2e_s,
                    last.prefill_worker if last is not None else "",
                    last.decode_worker if last is not None else ""))

    # ------------------------------------------------------------------ RPCs

    async def _authorize(self, context: grpc.aio.ServicerContext, request: object) -> None:
        if self.config.api_key:
            metadata = dict(context.invocation_metadata() or ())
            if not self.authorized(metadata.get("authorization")):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API "
                                    "key (metadata 'authorization: Bearer KEY')")
        if isinstance(request, Undecodable):
            self.count_refused("invalid_argument")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())

    async def _validate(self, request: pb.GenerateRequest) -> Prepared:
        kind = request.WhichOneof("prompt")
        prompt: str | list[int] | None = None
        if kind == "text":
            prompt = request.text
        elif kind == "token_ids":
            prompt = list(request.token_ids.ids)
        return await self.prepare(request.model, prompt,
                                  sampling_args(request.sampling, request.priority))

    async def _admit(self, context: grpc.aio.ServicerContext, rid: str,
                     validate: Callable[[], Awaitable[Prepared]]) -> Prepared:
        """``validate()``'s request, or the call aborted with the status of its error."""
        try:
            self.validator.check_request_id(rid)
            return await validate()
        except RequestError as exc:
            self.count_refused(exc.code)
            await context.abort(_CODES[exc.code], named_field(exc))
        except Exception as exc:  # a bug in validation: never a traceback to the client
            logger.exception("validating request %s failed", rid[:64])
            self.count_refused("internal")
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"internal error ({public_reason(exc)})")
        raise AssertionError("context.abort returned")

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        await self._authorize(context, request)
        arrival = time.monotonic()
        remaining = context.time_remaining()
        deadline = arrival + remaining if remaining is not None else None
        rid = request.request_id or uuid.uuid4().hex
        prepared = await self._admit(context, rid, lambda: self._validate(request))
        try:
            async for delta in self.run(rid, prepared, arrival, deadline):
                yield self._response(rid, delta)
        except RequestError as exc:
            await context.abort(_CODES[exc.code], exc.message)

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext):
        """A chat completion: read by ``router.chat`` as the HTTP front's are (the request is
        made OpenAI-shaped first), answered by ``grpc_chat.ChatReply``."""
        await self._authorize(context, request)
        arrival = time.monotonic()
        remaining = context.time_remaining()
        deadline = arrival + remaining if remaining is not None else None
        rid = request.request_id or uuid.uuid4().hex
        parts: list[ChatParts] = []

        async def validate() -> Prepared:
            chat = chat_parts(chat_body(request))
            check_tool_parser(chat.tools, self.config.tool_call_parser)
            args = with_tool_constraint(sampling_args(request.sampling, request.priority),
                                        chat.tools)
            parts.append(chat)
            return await self.prepare(request.model, None, args, chat.messages, chat.options,
                                      chat.template_tools)

        prepared = await self._admit(context, rid, validate)
        reply = ChatReply(rid, parts[0].tools, self.config.tool_call_parser)
        try:
            async for delta in self.run(rid, prepared, arrival, deadline):
                yield reply.response(delta)
        except RequestError as exc:
            await context.abort(_CODES[exc.code], exc.message)

    @staticmethod
    def _response(rid: str, delta: Delta) -> pb.GenerateResponse:
        msg = pb.GenerateResponse(request_id=rid, token_ids=delta.token_ids, text=delta.text,
                                  index=delta.index, logprobs=logprobs_pb(delta.logprobs),
                                  prompt_logprobs=logprobs_pb(delta.prompt_logprobs or []))
        if delta.finish_reason is not None:
            msg.finish_reason = delta.finish_reason
            set_final(msg, delta)
        return msg

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext):
        await self._authorize(context, request)
        return pb.ListModelsResponse(models=[pb.ModelInfo(
            id=name, max_model_len=self.cluster.max_model_len(),
            vocab_size=self.model_config.vocab_size, dtype=self.config.pools.engine.dtype)
            for name in self.model_names])

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext):
        await self._authorize(context, request)
        try:
            self.validator.check_model(request.model)
            ids = await self.validator.tokenize(request.text)
        except RequestError as exc:
            await context.abort(_CODES[exc.code], exc.message)
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request: pb.DetokenizeRequest,
                         context: grpc.aio.ServicerContext):
        await self._authorize(context, request)
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        try:
            self.validator.check_model(request.model)
            text = await self.validator.detokenize(list(request.token_ids), skip)
        except RequestError as exc:
            await context.abort(_CODES[exc.code], exc.message)
        return pb.DetokenizeResponse(text=text)

    async def GetVersion(self, request: pb.GetVersionRequest,
                         context: grpc.aio.ServicerContext):
        await self._authorize(context, request)
        return pb.GetVersionResponse(version=__version__)

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext):
        await self._authorize(context, request)
        workers = []
        for h in self.cluster.workers.values():
            s = h.stats
            workers.append(pb.WorkerStats(
                worker_id=h.worker_id, role=h.role, alive=h.alive,
                running=int(s.get("num_running", 0)), waiting=int(s.get("num_waiting", 0)),
                kv_blocks_total=int(s.get("num_blocks", 0)),
                kv_blocks_used=int(s.get("num_used_blocks", 0)),
                prefix_queried_tokens=int(s.get("prefix_queried_tokens", 0)),
                prefix_hit_tokens=int(s.get("prefix_hit_tokens", 0)),
                prefill_tokens_computed=int(s.get("prefill_tokens_computed", 0))))
        metrics = self.metrics.samples()
        return pb.GetStatsResponse(workers=workers, requests_total=self.requests_total,
                                   requests_running=len(self._active), metrics=metrics)
