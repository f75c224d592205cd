"""vLLM's metric names and labels, for what pdserve and vLLM both measure.

Dashboards, alerts and schedulers written for vLLM read these unchanged. Every series has
the ``model_name`` label (the first served name). Request metrics are observed at the
router, as the client sees them:

- ``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds``,
  ``vllm:request_time_per_output_token_seconds``, ``vllm:e2e_request_latency_seconds``,
  ``vllm:request_queue_time_seconds``, ``vllm:request_prefill_time_seconds``,
  ``vllm:request_decode_time_seconds`` (histograms);
- ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``,
  ``vllm:request_success_total{finished_reason}`` (stop, length, abort: a client that went
  away counts as abort, as in vLLM), ``vllm:request_prompt_tokens``,
  ``vllm:request_generation_tokens``.

Engine metrics are per worker, labelled as vLLM labels its engines (``engine``: the worker
id) plus ``role`` (prefill or decode): ``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` (0..1),
``vllm:prefix_cache_queries_total`` / ``vllm:prefix_cache_hits_total`` (tokens),
``vllm:num_preemptions_total``. Requests the router holds back for decode capacity are
``vllm:num_requests_waiting{engine="router",role="router"}``: summed over ``engine`` the
waiting figure is the whole service's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pdserve.router.metrics import WorkerSample

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
"""vLLM's time-to-first-token buckets, used for every latency here."""
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                 100000)
FINISHED_REASONS = {"stop": "stop", "length": "length", "abort": "abort", "cancelled": "abort"}
"""pdserve outcome -> vLLM ``finished_reason`` (errors are not successes)."""


class VllmMetrics:
    """The vLLM-named twins of the router's metrics, in the router's registry."""

    def __init__(self, registry: CollectorRegistry, model_name: str,
                 workers: Callable[[], Iterable[WorkerSample]],
                 router_waiting: Callable[[], int]) -> None:
        r, m = registry, model_name
        label = ["model_name"]

        def hist(name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, label, buckets=buckets, registry=r).labels(m)

        self.ttft = hist("vllm:time_to_first_token_seconds",
                         "Histogram of time to first token in seconds.")
        self.itl = hist("vllm:inter_token_latency_seconds",
                        "Histogram of inter-token latency in seconds.")
        self.tpot = hist("vllm:request_time_per_output_token_seconds",
                         "Histogram of time_per_output_token_seconds per request.")
        self.e2e = hist("vllm:e2e_request_latency_seconds",
                        "Histogram of e2e request latency in seconds.")
        self.queue = hist("vllm:request_queue_time_seconds",
                          "Histogram of time spent in WAITING phase for request.")
        self.prefill = hist("vllm:request_prefill_time_seconds",
                            "Histogram of time spent in PREFILL phase for request.")
        self.decode = hist("vllm:request_decode_time_seconds",
                           "Histogram of time spent in DECODE phase for request.")
        self.request_prompt = hist("vllm:request_prompt_tokens",
                                   "Number of prefill tokens processed.", TOKEN_BUCKETS)
        self.request_generation = hist("vllm:request_generation_tokens",
                                       "Number of generation tokens processed.", TOKEN_BUCKETS)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens "
                                     "processed.", label, registry=r).labels(m)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation "
                                         "tokens processed.", label, registry=r).labels(m)
        self._success = Counter("vllm:request_success", "Count of successfully processed "
                                "requests.", ["model_name", "finished_reason"], registry=r)
        self._model = m
        r.register(_EngineCollector(m, workers, router_waiting))

    def on_finish(self, outcome: str, prompt_tokens: int, output_tokens: int, e2e_s: float,
                  ttft_s: float | None, queue_s: float | None, prefill_s: float | None) -> None:
        """A request left the router with ``outcome`` (a finish reason, cancelled, or an
        error code, which vLLM does not count as a success)."""
        reason = FINISHED_REASONS.get(outcome)
        if reason is None:
            return
        self._success.labels(self._model, reason).inc()
        self.e2e.observe(e2e_s)
        self.request_prompt.observe(prompt_tokens)
        self.request_generation.observe(output_tokens)
        if queue_s is not None:
            self.queue.observe(queue_s)
        if prefill_s:
            self.prefill.observe(prefill_s)
        if ttft_s is not None:
            self.decode.observe(max(e2e_s - ttft_s, 0.0))
            if output_tokens > 1:
                self.tpot.observe(max(e2e_s - ttft_s, 0.0) / (output_tokens - 1))


class _EngineCollector(Collector):
    """Per-worker engine gauges and counters, read from the workers' last stats."""

    def __init__(self, model_name: str, workers: Callable[[], Iterable[WorkerSample]],
                 router_waiting: Callable[[], int]) -> None:
        self._model = model_name
        self._workers = workers
        self._router_waiting = router_waiting

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name", "engine", "role"]
        running = GaugeMetricFamily("vllm:num_requests_running", "Number of requests in "
                                    "model execution batches.", labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Number of requests "
                                    "waiting to be processed.", labels=labels)
        usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means "
                                  "100 percent usage.", labels=labels)
        queries = CounterMetricFamily("vllm:prefix_cache_queries", "Prefix cache queries, "
                                      "in terms of number of queried tokens.", labels=labels)
        hits = CounterMetricFamily("vllm:prefix_cache_hits", "Prefix cache hits, in terms of "
                                   "number of cached tokens.", labels=labels)
        preemptions = CounterMetricFamily("vllm:num_preemptions", "Cumulative number of "
                                          "preemption from the engine.", labels=labels)
        waiting.add_metric([self._model, "router", "router"], float(self._router_waiting()))
        for w in self._workers():
            if not w.alive or not w.stats:
                continue
            key = [self._model, w.worker_id, w.role]
            s = w.stats
            running.add_metric(key, float(s.get("num_running", 0)))
            waiting.add_metric(key, float(s.get("num_waiting", 0)))
            total = float(s.get("num_blocks", 0))
            usage.add_metric(key, float(s.get("num_used_blocks", 0)) / total if total else 0.0)
            queries.add_metric(key, float(s.get("prefix_queried_tokens", 0)))
            hits.add_metric(key, float(s.get("prefix_hit_tokens", 0)))
            preemptions.add_metric(key, float(s.get("num_preemptions", 0)))
        yield from (running, waiting, usage, queries, hits, preemptions)
