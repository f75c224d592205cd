"""Evaluate the prefill balancer policies by replaying a Mooncake trace on a simulated pool.

The pool: N prefill workers, each a FIFO queue in front of one LRU prefix cache of C blocks.
A request's prefill costs its uncached tokens over the worker's prefill rate, plus the KV
transfer of its whole prompt to a decode worker (not overlapped: a conservative bound).
Requests arrive at the trace's timestamps. Workers publish ``BlockStored`` /
``BlockRemoved`` batches when a prefill finishes; every router's ``PrefixIndex`` is fed by
those batches alone, and the REAL ``pdserve.router.balancer`` code makes every choice.

Routers see worker load through ``LoadView``: sampled every ``--load-interval`` seconds,
drained at the measured rate and grown by their own routing in between. With ``--routers R``
each request goes to one of R routers at random; each router only knows its own traffic
between samples, which is what makes several routers herd. Measured by ``regret``: the
policy's own score of the chosen worker minus the best score under fresh load (seconds), and
``misroute_rate``: the share of choices with a positive regret.

The oracle bound: one global cache of N x C blocks that every worker reads, a block readable
as soon as its prefill starts, least-loaded routing.

Default cost model: Llama-3.1-8B-Instruct in BF16 on one H100 SXM 80 GB per worker.
Prefill ~16,000 tokens/s: about 20 GFLOP a token (2 x 8.0e9 parameters plus attention at
~8k context) at ~320 TFLOP/s, a third of the H100's dense BF16 peak. KV cache 128 KiB a
token (32 layers x 8 KV heads x 128 dims x K,V x 2 bytes), so a 512-token block is 64 MiB
and 1,000 blocks (62.5 GiB) are what the GPU holds beside the 16 GB of weights. One
400 Gb/s NIC per GPU moves KV at ~381,000 tokens/s.

Run: ``python -m pdserve.bench.balancer [--trace conversation|synthetic|PATH] [--json P]
[--plot P]``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.bench.trace import (
    MOONCAKE_BLOCK_TOKENS,
    TRACES,
    BlockHasher,
    TraceRequest,
    read_mooncake,
    resolve_trace,
)
from pdserve.engine.kv_events import BlockRemoved, BlockStored, KVEvent
from pdserve.router.balancer import (
    POLICIES,
    Balancer,
    BalancerConfig,
    LoadView,
    RouteRequest,
    WorkerLoad,
    make_balancer,
)
from pdserve.router.prefix_index import PrefixIndex

ORACLE = "oracle"
METRIC_KEYS = ("hit_rate", "ttft_mean", "ttft_p99", "imbalance")


@dataclass(frozen=True, slots=True)
class CostModel:
    """Per-worker costs; the defaults are the calibration stated in the module docstring."""

    gpu: str = "H100 SXM 80GB"
    model: str = "Llama-3.1-8B-Instruct BF16"
    prefill_tokens_per_s: float = 16_000.0
    kv_bytes_per_token: int = 131_072
    link_gbit_per_s: float = 400.0

    @property
    def transfer_tokens_per_s(self) -> float:
        """0 when the link is disabled (``link_gbit_per_s`` = 0)."""
        return self.link_gbit_per_s * 1e9 / 8 / self.kv_bytes_per_token


@dataclass(frozen=True, slots=True)
class SimConfig:
    num_workers: int = 8
    cache_blocks: int = 1_000
    block_size: int = MOONCAKE_BLOCK_TOKENS
    cost: CostModel = field(default_factory=CostModel)
    routers: int = 1
    load_interval_s: float = 0.5
    load_scale: float = 1.0
    """Arrival-rate multiplier: timestamps are divided by it."""
    event_loss: float = 0.0
    """Probability that a router misses an event batch (exercises gap detection + resync)."""
    pending_ttl_s: float = 10.0
    recompute_weight: float = BalancerConfig().recompute_weight
    seed: int = 0


@dataclass(slots=True)
class _Job:
    idx: int
    arrival: float
    tokens: int
    hashes: tuple[int, ...]
    router: int
    est_uncached: int = 0
    cached: int = 0
    end: float = 0.0


class _Worker:
    """One simulated prefill worker: FIFO queue, single server, LRU cache of blocks."""

    def __init__(self, wid: str, capacity: int, rate: float, cache: OrderedDict[int, None]):
        self.wid = wid
        self.capacity = capacity
        self.rate = rate
        self.cache = cache
        self.queue: deque[_Job] = deque()
        self.current: _Job | None = None
        self.queued_tokens = 0
        self.busy_s = 0.0
        self.seq_no = 0

    def leading_hits(self, hashes: Sequence[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.cache:
                break
            n += 1
        return n

    def pending_tokens(self, now: float) -> int:
        running = 0.0
        if self.current is not None:
            running = max(0.0, (self.current.end - now) * self.rate)
        return self.queued_tokens + math.ceil(running)

    def insert(self, hashes: Sequence[int], block_size: int) -> list[KVEvent]:
        """Cache ``hashes`` as most recently used; returns the block pool's events."""
        hashes = hashes[: self.capacity]
        cache = self.cache
        events: list[KVEvent] = []
        run: list[int] = []
        parent: int | None = None
        for i, h in enumerate(hashes):
            if h in cache:
                cache.move_to_end(h)
                if run:
                    events.append(BlockStored(tuple(run), parent, block_size))
                    run = []
                continue
            if not run:
                parent = hashes[i - 1] if i else None
            cache[h] = None
            run.append(h)
        if run:
            events.append(BlockStored(tuple(run), parent, block_size))
        evicted = []
        while len(cache) > self.capacity:
            evicted.append(cache.popitem(last=False)[0])
        if evicted:  # evicted to make room, so reported before the new blocks
            events.insert(0, BlockRemoved(tuple(evicted)))
        return events


@dataclass(slots=True)
class _Router:
    balancer: Balancer
    view: LoadView
    next_sample: float
    sampled: bool = False


@dataclass(slots=True)
class RunResult:
    hit_rate: float
    ttft_mean: float
    ttft_p99: float
    imbalance: float
    ttft_pred_abs_err: float
    regret_mean: float
    misroute_rate: float
    routers: int
    resyncs: int

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


def _p99(values: list[float]) -> float:
    """Linear-interpolated 99th percentile (numpy's default method)."""
    s = sorted(values)
    pos = 0.99 * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def simulate(
    trace: Sequence[TraceRequest],
    policy: str,
    cfg: SimConfig,
    hasher: BlockHasher | None = None,
) -> RunResult:
    """Replay ``trace`` under ``policy`` (one of ``POLICIES`` or ``ORACLE``)."""
    if not trace:
        raise ValueError("empty trace")
    hasher = hasher or BlockHasher()
    oracle = policy == ORACLE
    rng = random.Random(cfg.seed)
    cost = cfg.cost
    now = 0.0
    clock = lambda: now  # noqa: E731 - the simulated clock every component reads
    shared: OrderedDict[int, None] = OrderedDict()
    workers = [
        _Worker(
            f"prefill-{i}",
            cfg.cache_blocks * (cfg.num_workers if oracle else 1),
            cost.prefill_tokens_per_s,
            shared if oracle else OrderedDict(),
        )
        for i in range(cfg.num_workers)
    ]
    by_id = {w.wid: w for w in workers}
    bconfig = BalancerConfig(
        default_prefill_tokens_per_s=cost.prefill_tokens_per_s,
        recompute_weight=cfg.recompute_weight,
    )
    n_routers = 1 if oracle else cfg.routers
    routers = []
    for r in range(n_routers):
        index = PrefixIndex(cfg.block_size, clock=clock, pending_ttl_s=cfg.pending_ttl_s)
        for w in workers:
            index.add_worker(w.wid, incarnation=w.wid)
        routers.append(
            _Router(
                balancer=make_balancer(
                    "least_loaded" if oracle else policy,
                    index,
                    config=bconfig,
                    rng=random.Random(cfg.seed * 1000 + r),
                ),
                view=LoadView(clock=clock, default_rate=cost.prefill_tokens_per_s),
                next_sample=cfg.load_interval_s * r / n_routers,
            )
        )
    transfer_rate = cost.transfer_tokens_per_s

    def true_loads() -> list[WorkerLoad]:
        return [
            WorkerLoad(
                worker_id=w.wid,
                pending_prefill_tokens=w.pending_tokens(now),
                prefill_tokens_per_s=w.rate,
                transfer_tokens_per_s=transfer_rate,
            )
            for w in workers
        ]

    completions: list[tuple[float, int, _Job, _Worker]] = []
    ttfts: list[float] = []
    cached_total = 0
    tokens_total = 0
    regret_sum = 0.0
    misroutes = 0
    resyncs = 0

    def start(w: _Worker, job: _Job) -> None:
        hits = w.leading_hits(job.hashes)
        for h in job.hashes[:hits]:
            w.cache.move_to_end(h)
        job.cached = min(hits * cfg.block_size, job.tokens)
        service = (job.tokens - job.cached) / w.rate
        job.end = now + service
        w.busy_s += service
        w.current = job
        if oracle:  # readable by everyone as soon as the prefill starts: an upper bound
            w.insert(job.hashes, cfg.block_size)
        heapq.heappush(completions, (job.end, job.idx, job, w))

    def publish(w: _Worker, events: list[KVEvent]) -> None:
        nonlocal resyncs
        seq = w.seq_no
        w.seq_no += 1
        for router in routers:
            if cfg.event_loss and rng.random() < cfg.event_loss:
                continue
            index = router.balancer.prefill_index
            if not index.apply_events(w.wid, seq, events, incarnation=w.wid):
                # The worker answers a resync request with its cache as of its last batch.
                index.snapshot(w.wid, seq, list(w.cache), incarnation=w.wid)
                resyncs += 1

    def finish(w: _Worker, job: _Job) -> None:
        nonlocal cached_total, tokens_total
        if not oracle:
            events = w.insert(job.hashes, cfg.block_size)
            if events:
                publish(w, events)
        ttft = job.end - job.arrival
        if transfer_rate > 0:
            ttft += job.tokens / transfer_rate
        ttfts.append(ttft)
        cached_total += job.cached
        tokens_total += job.tokens
        routers[job.router].balancer.observe_ttft(str(job.idx), ttft)
        w.current = None
        if w.queue:
            nxt = w.queue.popleft()
            w.queued_tokens -= nxt.est_uncached
            start(w, nxt)

    def advance(until: float) -> None:
        nonlocal now
        while completions and completions[0][0] <= until:
            end, _, job, w = heapq.heappop(completions)
            now = end
            finish(w, job)
        now = until

    for idx, row in enumerate(trace):
        advance(row.timestamp_s / cfg.load_scale)
        hashes = hasher.block_hashes(row.hash_ids)
        req = RouteRequest(str(idx), hashes, row.input_length)
        r = rng.randrange(n_routers) if n_routers > 1 else 0
        router = routers[r]
        fresh = true_loads()
        if now >= router.next_sample or cfg.load_interval_s <= 0 or not router.sampled:
            router.sampled = True
            router.view.update(fresh)
            if cfg.load_interval_s > 0:
                steps = math.floor((now - router.next_sample) / cfg.load_interval_s) + 1
                router.next_sample += steps * cfg.load_interval_s
        balancer = router.balancer
        fresh_cands = balancer.candidates(req, fresh)
        truth = dict(
            zip((c.worker_id for c in fresh_cands), balancer.scores(req, fresh_cands), strict=True)
        )
        choice = balancer.choose_prefill(req, router.view.current())
        regret = truth[choice.worker_id] - min(truth.values())
        regret_sum += regret
        misroutes += regret > 1e-6
        w = by_id[choice.worker_id]
        router.view.add_prefill(w.wid, row.input_length - choice.cached_tokens)
        job = _Job(idx, now, row.input_length, hashes, r)
        if w.current is None:
            start(w, job)
        else:
            hits = w.leading_hits(hashes)
            job.est_uncached = row.input_length - min(hits * cfg.block_size, row.input_length)
            w.queued_tokens += job.est_uncached
            w.queue.append(job)
    advance(math.inf)

    busy = [w.busy_s for w in workers]
    mean_busy = sum(busy) / len(busy)
    err_sum = sum(r.balancer.metrics.ttft_abs_error_sum_s for r in routers)
    return RunResult(
        hit_rate=cached_total / tokens_total if tokens_total else 0.0,
        ttft_mean=sum(ttfts) / len(ttfts),
        ttft_p99=_p99(ttfts),
        imbalance=max(busy) / mean_busy if mean_busy > 0 else 1.0,
        ttft_pred_abs_err=err_sum / len(ttfts),
        regret_mean=regret_sum / len(trace),
        misroute_rate=misroutes / len(trace),
        routers=n_routers,
        resyncs=resyncs,
    )


def evaluate(
    trace: Sequence[TraceRequest],
    cfg: SimConfig,
    policies: Sequence[str] = POLICIES,
    herd_routers: int = 0,
) -> dict[str, dict[str, Any]]:
    """``{policy: metrics}`` for every policy and the oracle. With ``herd_routers`` > 1,
    ``least_loaded`` and ``prefix_aware`` also run with that many routers, reported under
    their ``"herding"`` key."""
    hasher = BlockHasher()
    out: dict[str, dict[str, Any]] = {}
    for policy in (*policies, ORACLE):
        out[policy] = simulate(trace, policy, cfg, hasher).as_dict()
    if herd_routers > 1:
        herd_cfg = _replace(cfg, routers=herd_routers)
        for policy in policies:
            if policy in ("least_loaded", "prefix_aware"):
                out[policy]["herding"] = simulate(trace, policy, herd_cfg, hasher).as_dict()
    return out


def _replace(cfg: SimConfig, **changes: Any) -> SimConfig:
    fields = {k: getattr(cfg, k) for k in cfg.__slots__}
    fields.update(changes)
    return SimConfig(**fields)


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of the results (herding runs as extra rows)."""
    lines = [
        "| policy | routers | hit rate | TTFT mean (s) | TTFT p99 (s) | imbalance | regret (s) "
        "| misrouted |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(name: str, m: dict[str, Any]) -> str:
        return (
            f"| {name} | {m['routers']} | {m['hit_rate']:.3f} | {m['ttft_mean']:.3f} | "
            f"{m['ttft_p99']:.3f} | {m['imbalance']:.3f} | {m['regret_mean']:.4f} | "
            f"{m['misroute_rate']:.1%} |"
        )

    for name, m in results.items():
        lines.append(row(name, m))
    for name, m in results.items():
        if "herding" in m:
            lines.append(row(name, m["herding"]))
    return "\n".join(lines)


def check_targets(results: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's targets, each as 'PASS: ...' or 'FAIL: ...'."""
    out: list[str] = []
    if not all(p in results for p in ("prefix_aware", "round_robin", "least_loaded")):
        return out
    pa, rr, ll, orc = (results[p] for p in ("prefix_aware", "round_robin", "least_loaded", ORACLE))
    checks = [
        (
            f"prefix_aware hit rate {pa['hit_rate']:.3f} >= 0.9 x oracle {orc['hit_rate']:.3f}",
            pa["hit_rate"] >= 0.9 * orc["hit_rate"],
        ),
        (
            f"prefix_aware hit rate {pa['hit_rate']:.3f} >= 1.5 x round_robin {rr['hit_rate']:.3f}",
            pa["hit_rate"] >= 1.5 * rr["hit_rate"],
        ),
        (
            f"prefix_aware p99 TTFT {pa['ttft_p99']:.3f} s <= 1.1 x least_loaded "
            f"{ll['ttft_p99']:.3f} s",
            pa["ttft_p99"] <= 1.1 * ll["ttft_p99"],
        ),
    ]
    return [("PASS: " if ok else "FAIL: ") + text for text, ok in checks]


def plot(results: dict[str, dict[str, Any]], path: str | Path, title: str = "") -> None:
    """A PNG with one bar chart per metric, every policy and the oracle side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    labels = {
        "hit_rate": "prefix hit rate",
        "ttft_mean": "TTFT mean (s)",
        "ttft_p99": "TTFT p99 (s)",
        "imbalance": "busy max / mean",
    }
    fig, axes = plt.subplots(1, len(METRIC_KEYS), figsize=(4 * len(METRIC_KEYS), 3.6))
    for ax, key in zip(axes, METRIC_KEYS, strict=True):
        values = [results[n][key] for n in names]
        colors = ["tab:gray" if n == ORACLE else "tab:blue" for n in names]
        ax.bar(names, values, color=colors)
        ax.set_title(labels[key])
        ax.tick_params(axis="x", rotation=30)
        for i, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    d = SimConfig()
    c = d.cost
    p = argparse.ArgumentParser(
        prog="python -m pdserve.bench.balancer",
        description=__doc__.split("\n\n")[0] if __doc__ else "",
    )
    p.add_argument(
        "--trace",
        default="conversation",
        help=f"trace path, or one of {', '.join(TRACES)} (shipped in bench/data)",
    )
    p.add_argument("--limit", type=int, default=None, help="replay only the first N rows")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated policies")
    p.add_argument("--workers", type=int, default=d.num_workers, help="prefill workers N")
    p.add_argument("--cache-blocks", type=int, default=d.cache_blocks, help="blocks per worker C")
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per trace id")
    p.add_argument("--prefill-rate", type=float, default=c.prefill_tokens_per_s, help="tokens/s")
    p.add_argument("--kv-bytes-per-token", type=int, default=c.kv_bytes_per_token)
    p.add_argument("--link-gbps", type=float, default=c.link_gbit_per_s, help="0 = no transfer")
    p.add_argument("--routers", type=int, default=d.routers, help="routers R")
    p.add_argument(
        "--herd-routers", type=int, default=4, help="also run R>1 routers for herding (0: off)"
    )
    p.add_argument("--load-interval", type=float, default=d.load_interval_s, help="seconds")
    p.add_argument("--load-scale", type=float, default=d.load_scale, help="arrival-rate factor")
    p.add_argument("--event-loss", type=float, default=d.event_loss, help="batch loss prob.")
    p.add_argument(
        "--recompute-weight",
        type=float,
        default=d.recompute_weight,
        help="prefix_aware's weight on recomputing tokens another worker holds (0: pure TTFT)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", dest="json_path", default=None, help="write results as JSON")
    p.add_argument("--plot", dest="plot_path", default=None, help="write a PNG (matplotlib)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in POLICIES:
            print(f"unknown policy {p!r}; choose from {', '.join(POLICIES)}", file=sys.stderr)
            return 2
    for name, value in (("--workers", args.workers), ("--cache-blocks", args.cache_blocks)):
        if value <= 0:
            print(f"{name} must be positive, got {value}", file=sys.stderr)
            return 2
    path = resolve_trace(args.trace)
    trace = read_mooncake(path, args.limit)
    cost = CostModel(
        prefill_tokens_per_s=args.prefill_rate,
        kv_bytes_per_token=args.kv_bytes_per_token,
        link_gbit_per_s=args.link_gbps,
    )
    cfg = SimConfig(
        num_workers=args.workers,
        cache_blocks=args.cache_blocks,
        block_size=args.block_size,
        cost=cost,
        routers=args.routers,
        load_interval_s=args.load_interval,
        load_scale=args.load_scale,
        event_loss=args.event_loss,
        recompute_weight=args.recompute_weight,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    results = evaluate(trace, cfg, policies, herd_routers=args.herd_routers)
    elapsed = time.perf_counter() - t0
    print(
        f"trace {path.name}: {len(trace)} requests; N={cfg.num_workers} workers x "
        f"C={cfg.cache_blocks} blocks of {cfg.block_size} tokens; {cost.model} on {cost.gpu} "
        f"({cost.prefill_tokens_per_s:,.0f} prefill tokens/s, {cost.link_gbit_per_s:g} Gb/s); "
        f"load sampled every {cfg.load_interval_s:g} s; {elapsed:.1f} s"
    )
    print(format_table(results))
    for line in check_targets(results):
        print(line)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot_path:
        plot(results, args.plot_path, title=path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
