"""How fast the planner's simulator runs at cluster scale.

    python -m pdserve.bench.plan_scale [--workers 100] [--rate 10000] [--seconds 600]

A Poisson stream of ``--rate`` requests/s for ``--seconds`` simulated seconds, with the
Azure code trace's lengths (prompts times ``--length-scale`` so that the pools keep up),
through half prefill and half decode workers with the H100 costs. Requests share no
prefix, so the simulation routes with ``FastRouter`` (``--live``: the live balancer, which
scans every worker per request). Prints the simulated latencies and the wall-clock and CPU
seconds the simulation took.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np

from pdserve.planner.costs import load_costs
from pdserve.planner.router_model import RouterSettings
from pdserve.planner.sim import ClusterSpec, simulate
from pdserve.planner.workload import load_trace, poisson


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.plan_scale",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=100)
    p.add_argument("--rate", type=float, default=10_000.0)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--length-scale", type=float, default=0.1)
    p.add_argument("--costs", default="h100-llama3-8b")
    p.add_argument("--live", action="store_true", help="route with the live balancer")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    lengths = load_trace("azure", length_scale=args.length_scale)
    workload = poisson(lengths, args.rate, args.seconds, seed=args.seed)
    prefill = args.workers // 2
    spec = ClusterSpec(prefill, args.workers - prefill, seed=args.seed,
                       router=RouterSettings(fast=not args.live))
    wall, cpu = time.perf_counter(), time.process_time()
    res = simulate(workload, load_costs(args.costs), spec)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    ttft = np.percentile(res.ttft_s[res.ok], (50, 99)) * 1000
    tpot = np.nanpercentile(res.tpot_s[res.ok], (50, 99)) * 1000
    print(f"{len(workload):,} requests ({args.rate:g}/s for {args.seconds:g} s, prompts "
          f"{workload.prompt_tokens.mean():.0f} and outputs {workload.output_tokens.mean():.0f} "
          f"tokens on average) on {spec.label} ({'live' if args.live else 'fast'} router): "
          f"{res.ok.mean():.1%} served, TTFT p50/p99 {ttft[0]:.0f}/{ttft[1]:.0f} ms, TPOT "
          f"{tpot[0]:.2f}/{tpot[1]:.2f} ms")
    print(f"simulated in {wall:.1f} s wall, {cpu:.1f} s CPU; {res.events:,} events "
          f"({cpu / len(workload) * 1e6:.1f} us CPU per request)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
