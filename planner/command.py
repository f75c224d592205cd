"""``pdserve plan``: the options, the run, and the printed plan.

    pdserve plan --trace FILE --slo ttft:MS,tpot:MS [--gpus N] [--costs FILE]
    pdserve plan --watch --metrics-url http://ROUTER:8000/metrics --slo ... [--json]

See ``pdserve.planner.search`` for the search and ``pdserve.planner.watch`` for ``--watch``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict
from typing import Any

from pdserve.planner.costs import HardwareCosts, load_costs
from pdserve.planner.metrics import SLO
from pdserve.planner.router_model import RouterSettings
from pdserve.planner.search import Plan, SearchConfig, plan
from pdserve.planner.workload import Workload, load_trace

DEFAULT_COSTS = "h100-llama3-8b"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pdserve plan``."""
    p.add_argument("--trace", help="trace file (Azure CSV or Mooncake JSONL), or a shipped "
                                   "one: azure, conversation, synthetic")
    p.add_argument("--trace-format", choices=["azure", "mooncake"], default=None,
                   help="default: from the file name")
    p.add_argument("--slo", required=True, help="latency targets, e.g. ttft:2000,tpot:100 (ms)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs to split (default 8)")
    p.add_argument("--costs", action="append", default=None,
                   help=f"costs file, or a shipped one (default {DEFAULT_COSTS}); repeat "
                        "for each tensor-parallel degree measured")
    p.add_argument("--requests", type=int, default=2000,
                   help="replay the first N requests of the trace (default 2000)")
    p.add_argument("--length-scale", type=float, default=1.0, help="scale prompt lengths")
    p.add_argument("--max-prompt", type=int, default=None)
    p.add_argument("--max-output", type=int, default=None)
    p.add_argument("--attainment", type=float, default=0.9,
                   help="share of requests that must meet the SLO (default 0.9)")
    p.add_argument("--policy", default="prefix_aware", help="the balancer policy simulated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None,
                   help="write the plan as JSON ('-': print it instead of the table)")
    w = p.add_argument_group("watch a running service")
    w.add_argument("--watch", action="store_true",
                   help="read live metrics and print the split to move to, every --interval")
    w.add_argument("--metrics-url", default=None, help="the router's /metrics URL")
    w.add_argument("--target", default=None, help="the router's gRPC address (GetStats)")
    w.add_argument("--api-key", default=None,
                   help="the router's API key (or $PDSERVE_API_KEY), for GetStats and for "
                        "/metrics on its HTTP port")
    w.add_argument("--interval", type=float, default=60.0, help="seconds between scrapes")
    w.add_argument("--rounds", type=int, default=None, help="stop after N rounds")
    w.add_argument("--horizon", type=float, default=300.0,
                   help="seconds of the observed traffic to simulate per round")


def format_plan(result: Plan) -> str:
    slo = result.slo
    targets = ", ".join(f"{n} <= {v * 1000:g} ms" for n, v in
                        (("TTFT", slo.ttft_s), ("TPOT", slo.tpot_s)) if v is not None)
    best = result.best
    lines = [
        f"{result.gpus} GPUs; SLO {targets} for 90% of requests; trace rate "
        f"{result.trace_rate_rps:.3g} req/s; {result.simulations} simulations",
        f"goodput: the highest request rate each split sustains at the SLO; latencies at "
        f"{best.rate_scale * result.trace_rate_rps:.3g} req/s (the best split's goodput)",
        "",
        "| split | goodput (req/s) | per GPU | TTFT p50 / p90 / p99 (ms) | "
        "TPOT p50 / p90 / p99 (ms) | SLO met |",
        "|---|---|---|---|---|---|",
    ]
    for r in result.splits:
        s = r.at_common_rate
        assert s is not None
        mark = " **(recommended)**" if r is best else ""
        more = "+" if r.capped else ""
        lines.append(
            f"| {r.label}{mark} | {r.goodput_rps:.3g}{more} | {r.goodput_rps / r.gpus:.3g}{more} | "
            f"{_ms(s.ttft_ms)} | {_ms(s.tpot_ms)} | {s.slo_attainment:.0%} |")
    lines.append("")
    if any(r.capped for r in result.splits):
        lines.append("+: at least this; the replayed requests ran out before the SLO did "
                     "(replay more with --requests)")
    if best.goodput_rps > 0:
        lines.append(f"recommended: {best.label} ({best.prefill} prefill + {best.decode} "
                     f"decode workers), {best.goodput_rps:.3g} req/s at the SLO")
    else:
        lines.append("no split meets the SLO even at the slowest replay; recommended the "
                     f"most balanced: {best.label}")
    return "\n".join(lines)


def _ms(values: tuple[float, float, float]) -> str:
    return " / ".join("-" if math.isnan(v) else f"{v:.3g}" for v in values)


def plan_json(result: Plan) -> dict[str, Any]:
    return {
        "gpus": result.gpus,
        "slo_ms": {k: v * 1000 for k, v in (("ttft", result.slo.ttft_s),
                                            ("tpot", result.slo.tpot_s)) if v is not None},
        "trace_rate_rps": result.trace_rate_rps,
        "recommended": {"prefill_replicas": result.best.prefill,
                        "decode_replicas": result.best.decode, "tp": result.best.tp,
                        "goodput_rps": result.best.goodput_rps},
        "splits": [{**{k: v for k, v in asdict(r).items() if k != "at_common_rate"},
                    "at_common_rate": asdict(r.at_common_rate) if r.at_common_rate else None}
                   for r in result.splits],
        "simulations": result.simulations,
    }


def _costs(args: argparse.Namespace) -> list[HardwareCosts]:
    return [load_costs(c) for c in (args.costs or [DEFAULT_COSTS])]


def _workload(args: argparse.Namespace) -> Workload:
    return load_trace(args.trace, args.trace_format, limit=args.requests,
                      length_scale=args.length_scale, max_prompt=args.max_prompt,
                      max_output=args.max_output)


def _search(args: argparse.Namespace) -> SearchConfig:
    return SearchConfig(attainment=args.attainment, router=RouterSettings(policy=args.policy),
                        seed=args.seed)


def run_plan(args: argparse.Namespace) -> int:
    slo = SLO.parse(args.slo)
    if not args.trace:
        raise ValueError("--trace is required (or --watch)")
    if args.gpus < 2:
        raise ValueError(f"--gpus must be >= 2, got {args.gpus}")
    result = plan(_workload(args), _costs(args), args.gpus, slo, _search(args),
                  progress=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json_path == "-":
        print(json.dumps(plan_json(result), indent=1))
        return 0
    print(format_plan(result))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(plan_json(result), f, indent=1)
    return 0


def run_watch(args: argparse.Namespace) -> int:
    from pdserve.planner.watch import scrape_grpc, scrape_http, watch, workload_for

    slo = SLO.parse(args.slo)
    if bool(args.metrics_url) == bool(args.target):
        raise ValueError("--watch needs one of --metrics-url or --target")
    api_key = args.api_key or os.environ.get("PDSERVE_API_KEY") or None
    scrape = ((lambda: scrape_http(args.metrics_url, api_key)) if args.metrics_url
              else (lambda: scrape_grpc(args.target, api_key)))
    costs = _costs(args)
    lengths = _workload(args) if args.trace else None

    def on_round(t: Any) -> None:
        workers = t.prefill_workers + t.decode_workers
        now = {"prefill_replicas": t.prefill_workers, "decode_replicas": t.decode_workers}
        out: dict[str, Any] = {"observed": {"rate_rps": t.rate, "mean_prompt": t.mean_prompt,
                                            "mean_output": t.mean_output}, "current": now}
        if t.requests < 2 or workers < 2:
            out["recommended"] = now
            out["reason"] = "too little traffic or too few workers to plan"
        else:
            gpus = workers * costs[0].tp
            result = plan(workload_for(t, args.horizon, args.seed, lengths), costs, gpus, slo,
                          _search(args))
            out["recommended"] = plan_json(result)["recommended"]
        if args.json_path == "-" or args.json_path:
            print(json.dumps(out), flush=True)
        else:
            rec = out["recommended"]
            print(f"observed {t.rate:.3g} req/s, prompts {t.mean_prompt:.0f} and outputs "
                  f"{t.mean_output:.0f} tokens on average; now {t.prefill_workers}P"
                  f"{t.decode_workers}D; move to {rec['prefill_replicas']}P"
                  f"{rec['decode_replicas']}D", flush=True)

    watch(scrape, args.interval, on_round, args.rounds)
    return 0


def main(args: argparse.Namespace) -> int:
    """Run ``pdserve plan`` with parsed ``args``; 2 for bad input."""
    try:
        return run_watch(args) if args.watch else run_plan(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"pdserve plan: error: {exc}", file=sys.stderr)
        return 2
