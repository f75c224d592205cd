"""Calibrate the planner's cost model: write a costs file (``pdserve.planner.costs``).

    python -m pdserve.bench.costs --model tiny --out planner/hardware/cpu-tiny.json
    python -m pdserve.bench.costs --from-gpu bench/results/gpu.json --out h100.json

Engine steps, measured here: one ``Engine`` in this process (the workers' code) with one
torch thread per worker (what Ray gives a worker of one CPU), timed step by step:

- prefill: one sequence computing ``tokens`` new prompt tokens over ``context`` cached ones
  (a prefix-cache hit of ``context`` tokens sets the context);
- decode: ``batch`` sequences of ``context`` tokens each, one decode step.

Each point is the median of ``--repeats`` steps, timed by the wall clock (run it on an
otherwise quiet machine), or with ``--cpu-time`` in CPU time of the stepping thread
(``time.thread_time``): what the step costs on a core of its own whatever else the machine
runs meanwhile (sharing cores is the planner's ``host`` model). ``--from-gpu`` instead reads a
``pdserve.bench.gpu`` result (its decode rows with CUDA graphs and its one-step prefills).
``--kvtransfer`` reads a ``pdserve.bench.kvtransfer`` result for the link: the median rate
of its block-list writes (NIXL) and the one-block latency. Service overheads (what the
router, the RPCs and the workers' loops around their steps add) come from a running service:
``pdserve.bench.plan_check`` measures them on lightly loaded requests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pdserve.planner.costs import SCHEMA, fit_decode, fit_prefill

PREFILL_POINTS = [(t, k) for k in (0, 256, 1024) for t in (16, 64, 128, 256, 512)]
DECODE_POINTS = [(b, k) for k in (32, 256, 1024) for b in (1, 4, 16, 64)]
QUICK_PREFILL = [(t, k) for k in (0, 512) for t in (16, 128, 512)]
QUICK_DECODE = [(b, k) for k in (64, 512) for b in (1, 8, 32)]


def _engine(model: str, block_size: int, num_blocks: int, budget: int, max_seqs: int) -> Any:
    import torch

    from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.engine.engine import Engine

    torch.set_num_threads(1)
    return Engine(EngineConfig(
        model=model, dtype="float32", device="cpu",
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs)))


class _Ids:
    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.next = 0

    def tokens(self, n: int) -> list[int]:
        """Fresh ids (never a prefix-cache hit with anything before)."""
        out = [3 + (self.next + i) % (self.vocab - 3) for i in range(n)]
        self.next += n + 7919
        return out


Clock = Callable[[], float]


def measure_prefill(engine: Any, points: Sequence[tuple[int, int]], repeats: int,
                    clock: Clock = time.perf_counter) -> list[dict]:
    """Median step time of each (tokens, context) prefill step."""
    from pdserve.engine.sampling import SamplingParams

    ids = _Ids(engine.model_config.vocab_size)
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    out = []
    for n, (tokens, context) in enumerate(points):
        times = []
        for r in range(repeats):
            prefix = ids.tokens(context)
            if context:
                engine.add_request(f"warm-{n}-{r}", prefix + ids.tokens(1), one)
                while engine.has_unfinished():
                    engine.step()
            engine.add_request(f"p-{n}-{r}", prefix + ids.tokens(tokens), one)
            t0 = clock()
            engine.step()
            times.append(clock() - t0)
            while engine.has_unfinished():
                engine.step()
        out.append({"tokens": tokens, "context": context,
                    "ms": round(statistics.median(times) * 1000, 4)})
    return out


def measure_decode(engine: Any, points: Sequence[tuple[int, int]], repeats: int,
                   clock: Clock = time.perf_counter) -> list[dict]:
    """Median decode step time of each (batch, context) point."""
    from pdserve.engine.sampling import SamplingParams

    ids = _Ids(engine.model_config.vocab_size)
    out = []
    for n, (batch, context) in enumerate(points):
        # Long enough that the first sequences still run when the last finish prefill.
        prefill_steps = -(-batch * context // engine.config.scheduler.max_num_batched_tokens)
        params = SamplingParams(max_tokens=prefill_steps + repeats + 8, ignore_eos=True)
        rids = [f"d-{n}-{b}" for b in range(batch)]
        for rid in rids:
            engine.add_request(rid, ids.tokens(context), params)
        times: list[float] = []
        while len(times) <= repeats:
            decoding = all(s.num_uncomputed_tokens <= 1 for s in engine.scheduler.running)
            full = len(engine.scheduler.running) == batch and not engine.scheduler.waiting
            t0 = clock()
            engine.step()
            if decoding and full:
                times.append(clock() - t0)
        for rid in rids:
            engine.abort(rid)
        out.append({"batch": batch, "context": context,
                    "ms": round(statistics.median(times[1:]) * 1000, 4)})
    return out


def from_gpu(result: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """(prefill points, decode points) of a ``pdserve.bench.gpu`` result."""
    prefill = [{"tokens": r["tokens"], "context": 0, "ms": r["ms"]} for r in result["prefill"]]
    decode = [{"batch": r["batch"], "context": r["context"], "ms": r["step_ms_graphs"]}
              for r in result["decode"] if r.get("step_ms_graphs")]
    return prefill, decode


def link_from_kvtransfer(result: dict[str, Any]) -> dict[str, Any]:
    """The link rate (median of the NIXL block-list rows) and one block's latency."""
    rows = result["rows"]
    rates = [r["gb_per_s"] * 1e9 for r in rows
             if r["method"] == "nixl" and r["case"].startswith("blocks")]
    lat = [r["median_ms"] / 1000 for r in rows if r["method"] == "nixl" and "1 block" in r["case"]]
    if not rates:
        raise ValueError("no NIXL block-list rows in the kvtransfer result")
    return {"link_bytes_per_s": statistics.median(rates),
            "latency_s": lat[0] if lat else 0.0, "source": "pdserve.bench.kvtransfer"}


def calibrate(model: str = "tiny", *, quick: bool = False, repeats: int = 7,
              cpu_time: bool = False, block_size: int = 16, num_blocks: int = 4096,
              max_num_batched_tokens: int = 512, max_num_seqs: int = 128) -> dict[str, Any]:
    """A costs file's JSON for ``model`` on this CPU (engine steps only; no transfer or
    overheads). ``quick``: fewer points and repeats (a few seconds for "tiny")."""
    clock = time.thread_time if cpu_time else time.perf_counter
    # Room for the largest decode point whatever num_blocks (which only describes the
    # service being planned).
    engine = _engine(model, block_size, max(num_blocks, 16384), max_num_batched_tokens,
                     max_num_seqs)
    if quick:
        repeats = min(repeats, 5)
    prefill = measure_prefill(engine, QUICK_PREFILL if quick else PREFILL_POINTS, repeats, clock)
    decode = measure_decode(engine, QUICK_DECODE if quick else DECODE_POINTS, repeats, clock)
    spec = engine.kv_spec
    how = "CPU time" if cpu_time else "wall clock"
    return {
        "schema": SCHEMA,
        "name": f"CPU ({os.cpu_count()} cores), 1 torch thread per worker, {model} fp32",
        "source": f"python -m pdserve.bench.costs --model {model}"
                  f"{' --cpu-time' if cpu_time else ''} ({how}, median of {repeats} steps)",
        "engine": {"block_size": block_size, "num_blocks": num_blocks,
                   "max_num_batched_tokens": max_num_batched_tokens,
                   "max_num_seqs": max_num_seqs},
        "kv_bytes_per_token": spec.block_bytes // spec.block_size,
        "prefill_steps": prefill,
        "decode_steps": decode,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.costs",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="checkpoint or built-in name")
    p.add_argument("--name", default=None, help="the costs file's name field")
    p.add_argument("--from-gpu", default=None, help="a pdserve.bench.gpu result (JSON)")
    p.add_argument("--kvtransfer", default=None, help="a pdserve.bench.kvtransfer result")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=4096)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--cpu-time", action="store_true",
                   help="time steps in the thread's CPU time instead of the wall clock")
    p.add_argument("--kv-bytes-per-token", type=int, default=131072,
                   help="with --from-gpu: KV bytes per token of the model (Llama-3-8B's)")
    p.add_argument("--link-bytes-per-s", type=float, default=None,
                   help="the link's rate, when no --kvtransfer result is at hand")
    p.add_argument("--link-latency-s", type=float, default=0.0)
    p.add_argument("--cores", type=float, default=None,
                   help="workers share this many cores (adds the host section)")
    p.add_argument("--background-threads", type=float, default=0.3,
                   help="with --cores: cores the router and clients keep busy")
    p.add_argument("--out", required=True, help="costs file to write")
    args = p.parse_args(argv)
    if args.from_gpu:
        result = json.loads(Path(args.from_gpu).read_text())
        prefill, decode = from_gpu(result)
        data: dict[str, Any] = {
            "schema": SCHEMA,
            "name": args.name or f"{result.get('device', 'GPU')}, {result.get('model', '')}",
            "source": f"python -m pdserve.bench.gpu ({Path(args.from_gpu).name})",
            "engine": {"block_size": args.block_size, "num_blocks": args.num_blocks,
                       "max_num_batched_tokens": args.max_num_batched_tokens,
                       "max_num_seqs": args.max_num_seqs},
            "kv_bytes_per_token": args.kv_bytes_per_token,
            "prefill_steps": prefill, "decode_steps": decode}
    else:
        data = calibrate(args.model, repeats=args.repeats, cpu_time=args.cpu_time,
                         block_size=args.block_size, num_blocks=args.num_blocks,
                         max_num_batched_tokens=args.max_num_batched_tokens,
                         max_num_seqs=args.max_num_seqs)
        if args.name:
            data["name"] = args.name
    if args.kvtransfer:
        data["transfer"] = link_from_kvtransfer(json.loads(Path(args.kvtransfer).read_text()))
    elif args.link_bytes_per_s:
        data["transfer"] = {"link_bytes_per_s": args.link_bytes_per_s,
                            "latency_s": args.link_latency_s}
    if args.cores:
        data["host"] = {"cores": args.cores, "threads_per_worker": 1,
                        "background_threads": args.background_threads}
    prefill, decode = data["prefill_steps"], data["decode_steps"]
    pf, df = fit_prefill(prefill), fit_decode(decode)
    print(f"prefill fit {pf.coef} (max error {pf.max_rel_error:.1%}); "
          f"decode fit {df.coef} (max error {df.max_rel_error:.1%})", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
