"""The placement search: which P:D split of N GPUs serves a workload best (after DistServe's).

A split's *goodput* is the highest request rate it sustains with at least ``attainment``
of the requests meeting the SLO: the workload is replayed faster or slower (its arrivals
scaled) and the rate found by bisection on a log scale. A replay counts only while it lasts
``min_span_latencies`` times the requests' median end-to-end latency: squeezed further,
a finite trace becomes one burst that a big enough pool absorbs whole, which says nothing
of the rate it sustains (replay more requests to measure higher rates). Splits are
compared by goodput (per GPU: the same thing for a fixed N); the best one is recommended.
Every split is then also simulated at one common rate, the recommended split's goodput,
for its latency percentiles.

Each worker is one TP group of ``costs.tp`` GPUs: ``plan`` takes one costs model per TP
degree measured (one today; tensor parallelism adds more) and searches over all of them.
For many workers, P is first searched on a coarse grid, then every split near the best.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from pdserve.planner.costs import HardwareCosts
from pdserve.planner.metrics import SLO, Summary, meets, summarize
from pdserve.planner.router_model import RouterSettings
from pdserve.planner.sim import ClusterSpec, simulate
from pdserve.planner.workload import Workload


@dataclass(frozen=True, slots=True)
class SearchConfig:
    attainment: float = 0.9
    """Share of requests that must meet the SLO."""
    bisect_steps: int = 7
    max_scale: float = 1e4
    min_scale: float = 1e-3
    coarse_above: int = 16
    """With more workers than this, P is first searched on a coarse grid."""
    min_span_latencies: float = 20.0
    router: RouterSettings = field(default_factory=RouterSettings)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.attainment <= 1:
            raise ValueError(f"attainment must be in (0, 1], got {self.attainment}")


@dataclass(frozen=True, slots=True)
class SplitResult:
    prefill: int
    decode: int
    tp: int
    goodput_rps: float
    """The highest request rate sustained at the SLO (0: not even the slowest replay)."""
    rate_scale: float
    capped: bool = False
    """The replay got too short to measure a higher rate: the goodput is a lower bound
    (replay more requests)."""
    at_common_rate: Summary | None = None

    @property
    def gpus(self) -> int:
        return (self.prefill + self.decode) * self.tp

    @property
    def label(self) -> str:
        tp = f" (TP{self.tp})" if self.tp > 1 else ""
        return f"{self.prefill}P{self.decode}D{tp}"


@dataclass(frozen=True, slots=True)
class Plan:
    gpus: int
    slo: SLO
    trace_rate_rps: float
    splits: tuple[SplitResult, ...]
    """Every split evaluated, by P then TP."""
    best: SplitResult
    simulations: int


def max_rate_scale(workload: Workload, costs: HardwareCosts, spec: ClusterSpec, slo: SLO,
                   cfg: SearchConfig, counter: list[int],
                   hint: float = 1.0) -> tuple[float, bool]:
    """The largest arrival-rate scale (bisection, log scale) at which ``spec`` meets the SLO
    for ``cfg.attainment`` of the requests, over a replay long enough to mean a rate
    (module docstring), and whether the replay's length, not the SLO, set the bound;
    (0.0, False) if even ``cfg.min_scale`` does not."""
    too_short: dict[float, bool] = {}

    def ok(scale: float) -> bool:
        counter[0] += 1
        replay = workload.scaled(scale)
        res = simulate(replay, costs, spec)
        if float(meets(res, slo).mean()) < cfg.attainment:
            too_short[scale] = False
            return False
        long_enough = (replay.duration_s
                       >= cfg.min_span_latencies * float(np.nanmedian(res.e2e_s)))
        too_short[scale] = not long_enough
        return long_enough

    def bound(lo: float) -> tuple[float, bool]:
        failed = [s for s in too_short if s > lo]  # every scale tried above lo failed
        return lo, bool(failed) and too_short[min(failed)]

    lo, hi = hint, hint
    if ok(hint):
        while hi < cfg.max_scale:
            hi = min(hi * 4, cfg.max_scale)
            if not ok(hi):
                break
            lo = hi
        else:
            return lo, False
    else:
        lo = hint
        while lo > cfg.min_scale:
            lo = max(lo / 4, cfg.min_scale)
            if ok(lo):
                break
            hi = lo
        else:
            return 0.0, False
    for _ in range(cfg.bisect_steps):
        mid = math.sqrt(lo * hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return bound(lo)


def _splits(workers: int, coarse: bool) -> list[int]:
    if not coarse:
        return list(range(1, workers))
    step = max(1, workers // 8)
    grid = sorted({*range(1, workers, step), workers - 1})
    return grid


def plan(workload: Workload, costs_by_tp: Sequence[HardwareCosts], gpus: int, slo: SLO,
         cfg: SearchConfig | None = None,
         progress: Callable[[str], None] | None = None) -> Plan:
    """Search every P:D split of ``gpus`` GPUs (for each TP degree's costs); see module doc."""
    cfg = cfg or SearchConfig()
    if len(workload) < 2 or workload.duration_s <= 0:
        raise ValueError("the workload needs at least two requests spread over time")
    rate = (len(workload) - 1) / workload.duration_s
    counter = [0]
    results: dict[tuple[int, int], SplitResult] = {}

    def evaluate(costs: HardwareCosts, p: int, workers: int, hint: float) -> SplitResult:
        key = (costs.tp, p)
        if key not in results:
            spec = ClusterSpec(p, workers - p, router=cfg.router, seed=cfg.seed)
            scale, capped = max_rate_scale(workload, costs, spec, slo, cfg, counter, hint)
            goodput = scale * rate
            results[key] = SplitResult(p, workers - p, costs.tp, goodput, scale, capped)
            if progress:
                more = " (or more: the replay got too short)" if capped else ""
                progress(f"{results[key].label}: goodput {goodput:.3g} req/s{more}")
        return results[key]

    for costs in costs_by_tp:
        workers = gpus // costs.tp
        if workers < 2:
            continue
        coarse = workers > cfg.coarse_above
        hint = 1.0
        for p in _splits(workers, coarse):
            r = evaluate(costs, p, workers, hint)
            hint = r.rate_scale or hint
        if coarse:
            best_p = max((r for r in results.values() if r.tp == costs.tp),
                         key=lambda r: r.goodput_rps).prefill
            step = max(1, workers // 8)
            for p in range(max(1, best_p - step + 1), min(workers, best_p + step)):
                evaluate(costs, p, workers, results[(costs.tp, best_p)].rate_scale or 1.0)
    if not results:
        raise ValueError(f"{gpus} GPUs cannot hold one prefill and one decode worker "
                         f"(TP degrees {[c.tp for c in costs_by_tp]})")
    ordered = sorted(results.values(), key=lambda r: (r.tp, r.prefill))
    # Best goodput; ties (e.g. none meets the SLO) go to the split closest to balanced.
    best = max(ordered, key=lambda r: (r.goodput_rps, -abs(r.prefill - r.decode)))
    common = best.rate_scale if best.rate_scale > 0 else 1.0
    by_tp = {c.tp: c for c in costs_by_tp}
    final = []
    for r in ordered:
        spec = ClusterSpec(r.prefill, r.decode, router=cfg.router, seed=cfg.seed)
        res = simulate(workload.scaled(common), by_tp[r.tp], spec)
        counter[0] += 1
        final.append(replace(r, at_common_rate=summarize(res, slo)))
    best = next(r for r in final if (r.prefill, r.tp) == (best.prefill, best.tp))
    return Plan(gpus, slo, rate, tuple(final), best, counter[0])
