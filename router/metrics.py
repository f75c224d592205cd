"""The router's metrics, in the Prometheus data model (served as ``GET /metrics`` and, as
flat samples, by the gRPC ``GetStats``).

Names follow the peers' (vLLM's ``vllm:*``, SGLang's ``sglang:*``) so that dashboards carry
over: ``pdserve:time_to_first_token_seconds``, ``pdserve:inter_token_latency_seconds``,
``pdserve:e2e_request_latency_seconds``, ``pdserve:request_queue_time_seconds``,
``pdserve:prompt_tokens_total``, ``pdserve:generation_tokens_total``,
``pdserve:requests_total{outcome}``; per worker ``pdserve:num_requests_running``,
``pdserve:num_requests_waiting``, ``pdserve:kv_blocks_used`` / ``_total``,
``pdserve:prefix_cache_queries_total`` / ``pdserve:prefix_cache_hits_total`` (tokens),
``pdserve:engine_steps_total`` and the CPU seconds of those steps and of the loop around them
(``pdserve:engine_step_cpu_seconds_total``, ``pdserve:engine_hook_cpu_seconds_total``) and
of the whole worker process (``pdserve:worker_process_cpu_seconds_total``): what the
planner's cost model calibrates on; ``pdserve:kv_transfer_*``; ``pdserve:balancer_*``.
Beside them, the same figures under vLLM's own names and labels (``vllm:*`` with
``model_name``; ``router.metrics_vllm``), so that vLLM dashboards and schedulers read pdserve
unchanged.

Request metrics are pushed by the one request path (``Router.run``) through a
``RequestTimer`` per request; worker, balancer and failover figures are pulled at scrape
time from the router's own state (worker stats as of the monitor's last round, so they lag
by at most one ping interval). Each ``RouterMetrics`` owns its registry: several routers in
one process (tests) never share a counter. Not thread-safe beyond what prometheus-client
guarantees; the router's event loop owns it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from pdserve.router.balancer import Balancer
from pdserve.router.metrics_vllm import VllmMetrics

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The ``Content-Type`` of ``RouterMetrics.render()``."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5,
                   0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
"""Seconds; fine near the ITL of a decode step, coarse up to long end-to-end latencies."""
TOKEN_BUCKETS = (0, 16, 64, 256, 1024, 4096, 16384, 65536)


@dataclass(frozen=True, slots=True)
class WorkerSample:
    """One worker as the scrape sees it (``stats`` is its last reported ``stats()``)."""

    worker_id: str
    role: str
    alive: bool
    stats: dict[str, float]


EVENT_LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
"""KV event lag histogram bounds (seconds): the target is under 10 ms."""


class RouterMetrics:
    """Every metric of one router. ``track()`` per request; ``render()`` for /metrics;
    ``samples()`` for GetStats."""

    def __init__(self, *, policy: str, workers: Callable[[], Iterable[WorkerSample]],
                 balancer: Balancer | None = None,
                 failovers: Callable[[], int] = lambda: 0,
                 running: Callable[[], int] = lambda: 0,
                 model_name: str = "", waiting: Callable[[], int] = lambda: 0) -> None:
        self.policy = policy
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("pdserve:requests", "Requests by outcome: finish reason "
                                "(stop, length, abort), cancelled, or the error code",
                                ["outcome"], registry=r)
        self.prompt_tokens = Counter("pdserve:prompt_tokens", "Prompt tokens of admitted "
                                     "requests", registry=r)
        self.generation_tokens = Counter("pdserve:generation_tokens", "Output tokens sent to "
                                         "clients", registry=r)
        self.ttft = Histogram("pdserve:time_to_first_token_seconds", "Arrival at the router "
                              "to the first output token leaving it", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("pdserve:inter_token_latency_seconds", "Gap between consecutive "
                             "output messages of a request (one per decode step)",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("pdserve:e2e_request_latency_seconds", "Arrival to the last "
                             "token of finished requests", buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("pdserve:request_queue_time_seconds", "Arrival to the decode "
                               "reservation (admission wait) of finished requests",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.kv_bytes = Counter("pdserve:kv_transfer_bytes", "KV bytes written from prefill "
                                "to decode workers (blocks the decode worker did not hold)",
                                registry=r)
        self.kv_seconds = Histogram("pdserve:kv_transfer_seconds", "First token to the last "
                                    "KV write landing: the transfer time not hidden behind "
                                    "prefill", buckets=LATENCY_BUCKETS, registry=r)
        self.kv_failures = Counter("pdserve:kv_transfer_failures", "Prefill attempts whose "
                                   "KV transfer failed (retried on another worker)",
                                   registry=r)
        self.decisions = Counter("pdserve:balancer_decisions", "Prefill worker choices",
                                 ["policy"], registry=r)
        self.cached_prefix = Histogram("pdserve:balancer_cached_prefix_tokens", "Prompt "
                                       "tokens the chosen prefill worker held (per the "
                                       "prefix index)", buckets=TOKEN_BUCKETS, registry=r)
        self.predicted_ttft = Histogram("pdserve:balancer_predicted_ttft_seconds",
                                        "The balancer's predicted prefill TTFT of its choice",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.actual_ttft = Histogram("pdserve:balancer_actual_ttft_seconds", "The chosen "
                                     "worker's measured prefill TTFT (what was predicted)",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.event_lag = Histogram("pdserve:kv_event_lag_seconds", "A worker taking KV "
                                   "events from its engine to this router applying them "
                                   "to its prefix index (wall clocks: exact on one machine)",
                                   buckets=EVENT_LAG_BUCKETS, registry=r)
        self.running = Gauge("pdserve:router_requests_running", "Requests in the router",
                             registry=r)
        self.running.set_function(lambda: float(running()))
        r.register(_PulledCollector(workers, balancer, failovers))
        self.vllm = VllmMetrics(r, model_name, workers, waiting)
        self.prompt_tokens_total = 0  # the counters' values, for the stats line
        self.generation_tokens_total = 0

    def track(self, prompt_tokens: int, arrival: float) -> RequestTimer:
        """Start the metrics of one admitted request (``arrival`` on ``time.monotonic``)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.vllm.prompt_tokens.inc(prompt_tokens)
        self.prompt_tokens_total += prompt_tokens
        return RequestTimer(self, arrival, prompt_tokens)

    def on_prefill(self, predicted_ttft_s: float, cached_tokens: int, ok: bool | None,
                   actual_ttft_s: float = 0.0, transfer_s: float = 0.0,
                   bytes_written: int = 0) -> None:
        """One prefill attempt: ``ok`` None if it never answered (worker died, cancelled)."""
        self.decisions.labels(self.policy).inc()
        self.cached_prefix.observe(cached_tokens)
        self.predicted_ttft.observe(predicted_ttft_s)
        if ok:
            self.actual_ttft.observe(actual_ttft_s)
            self.kv_seconds.observe(transfer_s)
            self.kv_bytes.inc(bytes_written)
        elif ok is False:
            self.kv_failures.inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def samples(self) -> dict[str, float]:
        """Every sample as ``name{label="v",...}`` (or ``name``) -> value, as in ``render``."""
        out: dict[str, float] = {}
        for metric in self.registry.collect():
            for s in metric.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
        return out


class RequestTimer:
    """One request's latencies, as the client sees them leave the router. Owned by the
    request's handler; ``finish`` exactly once."""

    __slots__ = ("_metrics", "_arrival", "_last", "tokens", "prompt_tokens", "ttft_s", "e2e_s")

    def __init__(self, metrics: RouterMetrics, arrival: float, prompt_tokens: int = 0) -> None:
        self._metrics = metrics
        self._arrival = arrival
        self._last: float | None = None
        self.tokens = 0
        self.prompt_tokens = prompt_tokens
        self.ttft_s: float | None = None
        self.e2e_s: float | None = None

    def on_tokens(self, count: int, now: float | None = None) -> None:
        """``count`` output tokens left the router at ``now``."""
        if count <= 0:
            return
        now = time.monotonic() if now is None else now
        m = self._metrics
        if self._last is None:
            self.ttft_s = now - self._arrival
            m.ttft.observe(self.ttft_s)
            m.vllm.ttft.observe(self.ttft_s)
        else:
            m.itl.observe(now - self._last)
            m.vllm.itl.observe(now - self._last)
        self._last = now
        self.tokens += count
        m.generation_tokens.inc(count)
        m.vllm.generation_tokens.inc(count)
        m.generation_tokens_total += count

    def finish(self, outcome: str, queue_s: float | None = None,
               now: float | None = None, prefill_s: float | None = None) -> None:
        """Count the request under ``outcome``; a finished one (finish reason) also
        observes its end-to-end latency and queue time."""
        now = time.monotonic() if now is None else now
        m = self._metrics
        m.requests.labels(outcome).inc()
        self.e2e_s = now - self._arrival
        if outcome in ("stop", "length", "abort"):
            m.e2e.observe(self.e2e_s)
            if queue_s is not None:
                m.queue.observe(queue_s)
        m.vllm.on_finish(outcome, self.prompt_tokens, self.tokens, self.e2e_s, self.ttft_s,
                         queue_s, prefill_s)


class _PulledCollector(Collector):
    """Worker, balancer and failover figures read from the router's state at scrape time."""

    def __init__(self, workers: Callable[[], Iterable[WorkerSample]],
                 balancer: Balancer | None, failovers: Callable[[], int]) -> None:
        self._workers = workers
        self._balancer = balancer
        self._failovers = failovers

    def collect(self) -> Iterator[Metric]:
        labels = ["worker", "role"]
        gauges = {
            "num_requests_running": ("Requests in the worker's running batch", "num_running"),
            "num_requests_waiting": ("Requests queued in the worker's scheduler",
                                     "num_waiting"),
            "num_requests_awaiting_kv": ("Decode reservations whose KV has not all landed",
                                         "num_awaiting_kv"),
            "kv_blocks_used": ("KV blocks referenced by requests", "num_used_blocks"),
            "kv_blocks_total": ("KV blocks of the worker's cache", "num_blocks"),
            "kv_blocks_cached": ("Free KV blocks still holding a cached prefix",
                                 "num_cached_blocks"),
        }
        counters = {
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache",
                                     "prefix_queried_tokens"),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache",
                                  "prefix_hit_tokens"),
            "prefill_tokens_computed": ("Prompt tokens the worker computed",
                                        "prefill_tokens_computed"),
            "preemptions": ("Requests preempted for lack of KV blocks", "num_preemptions"),
            "engine_steps": ("Engine steps the worker ran", "steps"),
            "engine_step_cpu_seconds": ("CPU seconds of the worker's engine steps",
                                        "step_cpu_seconds"),
            "engine_hook_cpu_seconds": ("CPU seconds the worker's step loop spent around its "
                                        "steps (KV writes, polling, token and event pushes)",
                                        "hook_cpu_seconds"),
            "worker_process_cpu_seconds": ("CPU seconds of the worker's process, every thread",
                                           "process_cpu_seconds"),
            "kv_pool_pulled_tokens": ("Prompt tokens whose KV a prefill worker pulled from "
                                      "another worker instead of computing it",
                                      "pool_pulled_tokens"),
            "kv_pool_pulls": ("Pulls a prefill worker started", "pool_pulls"),
            "kv_pool_pull_failures": ("Pulls that fell back to computing the prefix",
                                      "pool_pull_failures"),
            "kv_pool_lent_tokens": ("Tokens of cached KV a worker sent to pulling prefill "
                                    "workers", "pool_lent_tokens"),
        }
        families: dict[str, Metric] = {}
        for name, (doc, _) in gauges.items():
            families[name] = GaugeMetricFamily(f"pdserve:{name}", doc, labels=labels)
        for name, (doc, _) in counters.items():
            families[name] = CounterMetricFamily(f"pdserve:{name}", doc, labels=labels)
        up = GaugeMetricFamily("pdserve:worker_up", "1 if the worker answers its checks",
                               labels=labels)
        for w in self._workers():
            key = [w.worker_id, w.role]
            up.add_metric(key, 1.0 if w.alive else 0.0)
            for name, (_, stat) in (*gauges.items(), *counters.items()):
                if stat in w.stats:
                    families[name].add_metric(key, float(w.stats[stat]))  # type: ignore[attr-defined]
        yield up
        yield from families.values()
        yield CounterMetricFamily("pdserve:failovers", "Request attempts retried on another "
                                  "worker after a failure", value=float(self._failovers()))
        b = self._balancer
        if b is not None:
            m = b.metrics
            yield CounterMetricFamily("pdserve:balancer_ttft_abs_error_seconds",
                                      "Sum of |actual - predicted| prefill TTFT",
                                      value=m.ttft_abs_error_sum_s)
            yield CounterMetricFamily("pdserve:balancer_decode_no_room",
                                      "Decode choices that found no worker with room",
                                      value=float(m.decode_no_room))
