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

Policy ``kv_pool`` adds the cluster-wide prefix pool: a worker pulls the prompt blocks it
lacks from the workers holding them when ``PullCostModel`` says the pull (bytes over the
link) beats the compute (tokens over the prefill rate), decided by the balancer's own
``plan_pull`` on the caches as they are when the prefill starts. Pulled tokens are counted
apart from local hits (``pulled_rate``; ``saved_rate`` = both); pulled copies are cached
where eviction starts, so they do not push out blocks only that worker holds. With
``--decode-workers D``, D decode workers' caches (the prompts each was sent, chosen by the
balancer's decode choice) are sources too, and the blocks a decode worker already holds are
not transferred to it again (for every policy).

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
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.bench.balancer_cache import SimWorker
from pdserve.bench.balancer_report import METRIC_KEYS as METRIC_KEYS  # re-exported
from pdserve.bench.balancer_report import ORACLE, check_targets, format_table, plot
from pdserve.bench.trace import (
    MOONCAKE_BLOCK_TOKENS,
    TRACES,
    BlockHasher,
    TraceRequest,
    read_mooncake,
    resolve_trace,
)
from pdserve.engine.kv_events import KVEvent
from pdserve.router.balancer import (
    POLICIES,
    Balancer,
    BalancerConfig,
    KVPoolBalancer,
    LoadView,
    RouteRequest,
    WorkerLoad,
    make_balancer,
)
from pdserve.router.kv_pool import PullCostModel
from pdserve.router.prefix_index import PrefixIndex


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

    def pull_model(self, latency_s: float = 0.0) -> PullCostModel:
        """Pulls between workers over the same link as the transfer to decode."""
        return PullCostModel(self.kv_bytes_per_token, self.link_gbit_per_s * 1e9 / 8, latency_s)


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
    pull_latency_s: float = 0.0
    """Fixed cost of one pull from another worker's cache (policy ``kv_pool``)."""
    decode_workers: int = 0
    """Decode workers, each an LRU cache of ``cache_blocks`` holding the prompts it was
    sent (chosen by the balancer's decode choice); a source for ``kv_pool``'s pulls, and
    the blocks it holds are not transferred again. 0: none simulated."""
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
    pulled: int = 0
    end: float = 0.0


@dataclass(slots=True)
class _Router:
    balancer: Balancer
    view: LoadView
    next_sample: float
    sampled: bool = False


@dataclass(slots=True)
class RunResult:
    hit_rate: float
    """Prompt tokens found in the chosen worker's own cache, over all prompt tokens."""
    pulled_rate: float
    """Prompt tokens pulled from another worker's cache (``kv_pool``), over all."""
    saved_rate: float
    """Prompt tokens not computed: ``hit_rate + pulled_rate``."""
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
    shared: OrderedDict[int, float] = OrderedDict()
    workers = [
        SimWorker(
            f"prefill-{i}",
            cfg.cache_blocks * (cfg.num_workers if oracle else 1),
            cost.prefill_tokens_per_s,
            shared if oracle else OrderedDict(),
        )
        for i in range(cfg.num_workers)
    ]
    decoders = [
        SimWorker(f"decode-{i}", cfg.cache_blocks, 0.0, OrderedDict())
        for i in range(cfg.decode_workers)
    ]
    by_id = {w.wid: w for w in (*workers, *decoders)}
    pool = policy == "kv_pool"
    bconfig = BalancerConfig(
        default_prefill_tokens_per_s=cost.prefill_tokens_per_s,
        recompute_weight=cfg.recompute_weight,
        pull=cost.pull_model(cfg.pull_latency_s) if pool else PullCostModel(),
    )
    n_routers = 1 if oracle else cfg.routers
    routers = []
    for r in range(n_routers):
        index = PrefixIndex(cfg.block_size, clock=clock, pending_ttl_s=cfg.pending_ttl_s)
        for w in workers:
            index.add_worker(w.wid, incarnation=w.wid)
        decode_index = None
        if decoders:
            decode_index = PrefixIndex(cfg.block_size, clock=clock, pending_ttl_s=cfg.pending_ttl_s)
            for d in decoders:
                decode_index.add_worker(d.wid, incarnation=d.wid)
        routers.append(
            _Router(
                balancer=make_balancer(
                    "least_loaded" if oracle else policy,
                    index,
                    decode_index=decode_index,
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

    completions: list[tuple[float, int, _Job, SimWorker]] = []
    ttfts: list[float] = []
    cached_total = 0
    pulled_total = 0
    tokens_total = 0
    regret_sum = 0.0
    misroutes = 0
    resyncs = 0

    def work(w: SimWorker, job: _Job, touch: bool) -> tuple[int, int, float]:
        """(tokens w holds, tokens it pulls, pull seconds) if ``job`` started now; with
        ``touch`` the blocks read are marked used."""
        hits = w.leading_hits(job.hashes)
        cached = min(hits * cfg.block_size, job.tokens)
        if touch:
            for h in job.hashes[:hits]:
                w.touch(h, now)
        if not pool:
            return cached, 0, 0.0
        # The real pull decision, on the caches as they are now (a holder the balancer
        # saw may have evicted since).
        balancer = routers[job.router].balancer
        assert isinstance(balancer, KVPoolBalancer)
        holders: list[list[str]] = []
        for h in job.hashes:
            held = [o.wid for o in (*workers, *decoders) if h in o.cache]
            if not held:
                break
            holders.append(held)
        plan = balancer.plan_pull(
            RouteRequest(str(job.idx), job.hashes, job.tokens),
            WorkerLoad(w.wid, prefill_tokens_per_s=w.rate), cached, holders,
        )
        if touch and plan.tokens:  # a read is a use: the supplying copy stays warm
            first = cached // cfg.block_size
            last = -(-(cached + plan.tokens) // cfg.block_size)
            for i in range(first, last):
                if w.wid not in holders[i]:
                    by_id[holders[i][0]].touch(job.hashes[i], now)
        return cached, plan.tokens, plan.seconds

    def start(w: SimWorker, job: _Job) -> None:
        job.cached, job.pulled, pull_s = work(w, job, touch=True)
        service = pull_s + (job.tokens - job.cached - job.pulled) / w.rate
        job.end = now + service
        w.busy_s += service
        w.current = job
        if oracle:  # readable by everyone as soon as the prefill starts: an upper bound
            w.insert(job.hashes, cfg.block_size, now=now)
        heapq.heappush(completions, (job.end, job.idx, job, w))

    def publish(w: SimWorker, events: list[KVEvent], decode: bool = False) -> None:
        nonlocal resyncs
        seq = w.seq_no
        w.seq_no += 1
        for router in routers:
            if cfg.event_loss and rng.random() < cfg.event_loss:
                continue
            index = router.balancer.decode_index if decode else router.balancer.prefill_index
            assert index is not None
            if not index.apply_events(w.wid, seq, events, incarnation=w.wid):
                # The worker answers a resync request with its cache as of its last batch.
                index.snapshot(w.wid, seq, list(w.cache), incarnation=w.wid)
                resyncs += 1

    def to_decode(job: _Job) -> int:
        """Send ``job``'s KV to the decode worker the balancer picks; the prompt tokens
        that worker already held (not sent)."""
        balancer = routers[job.router].balancer
        size = cfg.cache_blocks
        choice = balancer.choose_decode(
            RouteRequest(str(job.idx), job.hashes, job.tokens),
            [WorkerLoad(d.wid, free_blocks=size, total_blocks=size) for d in decoders],
        )
        assert choice is not None  # every block of a simulated decode cache is evictable
        d = by_id[choice.worker_id]
        events = d.insert(job.hashes, cfg.block_size, now=now)
        if events:
            publish(d, events, decode=True)
        return min(choice.cached_blocks * cfg.block_size, job.tokens)

    def finish(w: SimWorker, job: _Job) -> None:
        nonlocal cached_total, pulled_total, tokens_total
        if not oracle:
            cold = -(-(job.cached + job.pulled) // cfg.block_size) if job.pulled else 0
            events = w.insert(job.hashes, cfg.block_size, cold, now)
            if events:
                publish(w, events)
        ttft = job.end - job.arrival
        sent = job.tokens
        if decoders:
            sent -= to_decode(job)
        if transfer_rate > 0:
            ttft += sent / transfer_rate
        ttfts.append(ttft)
        cached_total += job.cached
        pulled_total += job.pulled
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
        router.view.add_prefill(
            w.wid,
            row.input_length - choice.cached_tokens - choice.pulled_tokens
            + math.ceil(choice.pull_s * w.rate),
        )
        job = _Job(idx, now, row.input_length, hashes, r)
        if w.current is None:
            start(w, job)
        else:
            cached, pulled, pull_s = work(w, job, touch=False)
            job.est_uncached = row.input_length - cached - pulled + math.ceil(pull_s * w.rate)
            w.queued_tokens += job.est_uncached
            w.queue.append(job)
    advance(math.inf)

    busy = [w.busy_s for w in workers]
    mean_busy = sum(busy) / len(busy)
    err_sum = sum(r.balancer.metrics.ttft_abs_error_sum_s for r in routers)
    return RunResult(
        hit_rate=cached_total / tokens_total if tokens_total else 0.0,
        pulled_rate=pulled_total / tokens_total if tokens_total else 0.0,
        saved_rate=(cached_total + pulled_total) / tokens_total if tokens_total else 0.0,
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
    p.add_argument(
        "--decode-workers",
        type=int,
        default=d.decode_workers,
        help="simulate D decode workers' caches (a kv_pool source; 0: none)",
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
        decode_workers=args.decode_workers,
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
