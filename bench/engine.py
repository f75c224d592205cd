"""Engine benchmark: pdserve's engine against transformers on one machine and one checkpoint.

Systems, all in one process with the same torch thread count and the same prompts:

- ``pdserve``: ``engine.Engine`` (paged KV cache, continuous batching, prefix caching);
- ``hf-static``: transformers ``generate`` on static batches of 32 in arrival order,
  left-padded; a batch runs to its longest requested output;
- ``hf-cb``: transformers continuous batching (the manager behind ``generate_batch``), fed
  every request with its own ``max_new_tokens``.

Workloads (request counts times ``--scale``):

- ``a``: 64 requests, 256-token prompts, 128 output tokens;
- ``b``: 256 requests from the Azure 2023 code trace, prompt lengths divided by 8 and output
  lengths clamped to 1..256;
- ``c``: pdserve only, prefix caching on vs off: 200 requests sharing a 512-token system
  prompt with 32-token unique suffixes and 32 output tokens, each sent when the previous
  one emitted its first token, so its time to first token is its own prefill.

Output tokens/s = requested output tokens / wall time from the first request added to the
last one finished; outputs are forced to their length (``ignore_eos``; ``min_new_tokens``
in transformers). Prefill MFU = prefill tokens/s x 2 x matmul parameters outside the
embedding and LM head, over a matmul peak measured in the same run.

Run: ``python -m pdserve.bench.engine [--dtype float32 bfloat16] [--workloads a b c]
[--systems pdserve hf-static hf-cb] [--scale 0.25] [--json PATH]``; the results file is
rewritten after every system, and ``--report PATH`` prints the tables of one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pdserve.bench.common import Progress, markdown_table, mean_median, read_azure
from pdserve.bench.trace import RESULTS_DIR

SYSTEMS = ("pdserve", "hf-static", "hf-cb")
WORKLOADS = ("a", "b", "c")
DTYPES = ("float32", "bfloat16")
FIRST_REGULAR_TOKEN = 3
"""Prompt token ids start here: 0..2 are the built-in checkpoints' BOS, EOS and PAD."""
PAD_TOKEN = 2

TARGETS: dict[str, float] = {
    "a pdserve/hf-static": 1.0,
    "b pdserve/hf-static": 2.0,
    "b pdserve/hf-cb": 3.0,
    "c ttft off/on": 8.0,
}
"""Minimum ratios the engine must reach (throughput ratios, or TTFT off over on)."""
PREFILL_EXCESS_TARGET = 0.02
"""With prefix caching, prefill tokens computed may exceed the minimum by at most this."""


@dataclass(frozen=True, slots=True)
class Request:
    """A prompt and the exact number of output tokens every system must produce."""

    prompt: list[int]
    max_tokens: int


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


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """What one run measures. ``scale`` multiplies request counts (at least one each)."""

    model: str = "small"
    dtypes: tuple[str, ...] = DTYPES
    workloads: tuple[str, ...] = WORKLOADS
    systems: tuple[str, ...] = SYSTEMS
    scale: float = 1.0
    seed: int = 0
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    sizes: Sizes = field(default_factory=Sizes)
    azure_path: str | None = None


# ---------------------------------------------------------------------------- workloads


def _scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def _random_tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(FIRST_REGULAR_TOKEN, vocab) for _ in range(n)]


def workload_fixed(
    n: int, prompt_len: int, output_len: int, vocab: int, seed: int
) -> list[Request]:
    """``n`` random prompts of ``prompt_len`` tokens, each asking ``output_len`` tokens."""
    rng = random.Random(f"fixed-{seed}")
    return [Request(_random_tokens(rng, prompt_len, vocab), output_len) for _ in range(n)]


def workload_azure(
    n: int, vocab: int, seed: int, length_divisor: int, max_output: int,
    max_model_len: int, path: str | None = None,
) -> list[Request]:
    """The first ``n`` Azure trace rows as random prompts of ``ContextTokens / divisor``
    tokens (at least 1) asking ``GeneratedTokens`` clamped to ``1..max_output`` tokens."""
    rng = random.Random(f"azure-{seed}")
    out = []
    for row in read_azure(path, limit=n):
        output = min(max(row.generated_tokens, 1), max_output)
        prompt = max(1, row.context_tokens // length_divisor)
        prompt = min(prompt, max_model_len - output - 1)
        out.append(Request(_random_tokens(rng, prompt, vocab), output))
    if len(out) < n:
        raise ValueError(f"the Azure trace has {len(out)} rows, {n} were asked for")
    return out


def workload_shared_prefix(
    n: int, prefix_len: int, suffix_len: int, output_len: int, vocab: int, seed: int
) -> list[Request]:
    """``n`` prompts: one shared ``prefix_len`` system prompt, then a unique suffix each."""
    rng = random.Random(f"prefix-{seed}")
    prefix = _random_tokens(rng, prefix_len, vocab)
    return [
        Request(prefix + _random_tokens(rng, suffix_len, vocab), output_len) for _ in range(n)
    ]


def min_prefill_tokens(prompts: Sequence[Sequence[int]]) -> int:
    """Fewest prompt tokens any cache can compute when prompts arrive in this order: each
    prompt's tokens past its longest common prefix with an earlier prompt; the last token
    is always computed (its logits give the first output token)."""
    total = 0
    for i, p in enumerate(prompts):
        shared = 0
        for q in prompts[:i]:
            k = 0
            for x, y in zip(p, q, strict=False):
                if x != y:
                    break
                k += 1
            shared = max(shared, k)
        total += len(p) - min(shared, len(p) - 1)
    return total


def output_tokens(requests: Sequence[Request]) -> int:
    return sum(r.max_tokens for r in requests)


# ---------------------------------------------------------------------------- results


@dataclass(slots=True)
class ThroughputResult:
    """One system on one throughput workload. ``generated`` counts every token produced
    (static batches produce more than requested); throughput counts requested ones."""

    system: str
    requests: int
    output_tokens: int
    generated: int
    wall_s: float
    tokens_per_s: float
    error: str | None = None


@dataclass(slots=True)
class TTFTResult:
    """Workload (c) on one engine: times to first token and prefill work."""

    prefix_caching: bool
    requests: int
    ttft_mean_s: float
    ttft_median_s: float
    ttft_p90_s: float
    prefill_tokens_computed: int
    prefix_hit_tokens: int
    wall_s: float


# ---------------------------------------------------------------------------- pdserve


def make_engine(opts: BenchOptions, dtype: str, prefix_caching: bool = True) -> Any:
    from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.engine.engine import Engine

    return Engine(EngineConfig(
        model=opts.model, dtype=dtype, device="cpu",
        cache=CacheConfig(block_size=opts.block_size, enable_prefix_caching=prefix_caching),
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


# ---------------------------------------------------------------------------- transformers


def load_hf(model_path: str | Path, dtype: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    return model.eval()


def _hf_generation_config(model: Any, max_new_tokens: int) -> Any:
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    return GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
        eos_token_id=eos, pad_token_id=PAD_TOKEN,
    )


@torch.inference_mode()
def run_hf_static(model: Any, requests: Sequence[Request], batch: int) -> ThroughputResult:
    """``generate`` on batches of ``batch`` in arrival order, left-padded, each batch run to
    its longest requested output (``min_new_tokens`` keeps EOS from ending it early)."""
    generated = 0
    start = time.perf_counter()
    for lo in range(0, len(requests), batch):
        chunk = requests[lo : lo + batch]
        width = max(len(r.prompt) for r in chunk)
        ids = torch.full((len(chunk), width), PAD_TOKEN, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, r in enumerate(chunk):
            ids[row, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[row, width - len(r.prompt) :] = 1
        new = max(r.max_tokens for r in chunk)
        out = model.generate(input_ids=ids, attention_mask=mask,
                             generation_config=_hf_generation_config(model, new))
        if out.shape[1] != width + new:
            raise RuntimeError(f"hf-static batch at {lo}: {out.shape[1] - width} new tokens, "
                               f"{new} asked")
        generated += len(chunk) * new
    wall = time.perf_counter() - start
    n = output_tokens(requests)
    return ThroughputResult("hf-static", len(requests), n, generated, wall, n / wall)


def _cb_config(opts: BenchOptions, requests: Sequence[Request]) -> Any:
    """Sized like pdserve: the same token budget a step and batch size, and a cache that
    holds every request at once (no preemption)."""
    from transformers import ContinuousBatchingConfig

    page = opts.block_size * 16
    pages = sum(math.ceil((len(r.prompt) + r.max_tokens) / page) for r in requests)
    return ContinuousBatchingConfig(
        page_size=page,
        num_blocks=pages + 8,
        max_batch_tokens=opts.max_num_batched_tokens,
        max_requests_per_batch=opts.max_num_seqs,
    )


def warm_hf_cb(model: Any, opts: BenchOptions) -> None:
    """One tiny ``generate_batch`` call: proves the API runs here and warms it up."""
    reqs = [Request(list(range(FIRST_REGULAR_TOKEN, FIRST_REGULAR_TOKEN + 8)), 2)]
    out = model.generate_batch(
        [r.prompt for r in reqs], generation_config=_hf_generation_config(model, 2),
        continuous_batching_config=_cb_config(opts, reqs), max_new_tokens=2,
    )
    errors = [o.error for o in out.values() if o.error is not None]
    if len(out) != 1 or errors:
        raise RuntimeError(f"generate_batch warm-up failed: {errors or out}")


def run_hf_cb(model: Any, requests: Sequence[Request], opts: BenchOptions) -> ThroughputResult:
    """The continuous batching manager of ``generate_batch``, each request with its own
    ``max_new_tokens`` and no EOS (-1); timed from the first add to the last result.
    (Not under ``inference_mode``: the manager's thread updates the cache in place.)"""
    from transformers.generation.continuous_batching.utils import WorkloadHints

    hints = WorkloadHints(
        max_prompt_length=max(len(r.prompt) for r in requests),
        max_generated_length=max(r.max_tokens for r in requests),
        num_requests=len(requests),
    )
    got: dict[str, int] = {}
    with model.continuous_batching_context_manager(
        generation_config=_hf_generation_config(model, max(r.max_tokens for r in requests)),
        continuous_batching_config=_cb_config(opts, requests),
        workload_hints=hints, block=True, timeout=30,
    ) as manager:
        start = time.perf_counter()
        for i, r in enumerate(requests):
            manager.add_request(r.prompt, request_id=f"h{i}", max_new_tokens=r.max_tokens,
                                eos_token_id=-1)
        while len(got) < len(requests):
            res = manager.get_result(timeout=1.0)
            if res is None:
                if not manager.is_running():
                    raise RuntimeError("continuous batching thread stopped; "
                                       f"{len(got)}/{len(requests)} requests done")
                continue
            if res.error is not None:
                raise RuntimeError(f"hf-cb request {res.request_id}: {res.error}")
            if res.is_finished():
                got[res.request_id] = len(res.generated_tokens)
        wall = time.perf_counter() - start
    for i, r in enumerate(requests):
        if got.get(f"h{i}") != r.max_tokens:
            raise RuntimeError(f"hf-cb request {i}: {got.get(f'h{i}')} tokens, "
                               f"{r.max_tokens} asked")
    n = output_tokens(requests)
    return ThroughputResult("hf-cb", len(requests), n, sum(got.values()), wall, n / wall)


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


def _system_runner(system: str, engine: Any, hf: Any, reqs: Sequence[Request],
                   opts: BenchOptions) -> Callable[[], ThroughputResult]:
    if system == "pdserve":
        return lambda: run_pdserve(engine, reqs)
    if system == "hf-static":
        return lambda: run_hf_static(hf, reqs, opts.sizes.hf_batch)
    return lambda: run_hf_cb(hf, reqs, opts)


def bench_dtype(opts: BenchOptions, dtype: str, progress: Progress,
                out: dict[str, Any] | None = None,
                saved: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Every measurement for one dtype, stored into ``out`` as it comes (``saved`` is
    called after each workload, so a long run leaves its partial figures behind)."""
    sz = opts.sizes
    out = {} if out is None else out
    progress(f"{dtype}: matmul peak ({sz.matmul_n}^3)")
    peak = matmul_peak_gflops(dtype, sz.matmul_n)
    out["matmul_peak_gflops"] = peak
    progress(f"{dtype}: matmul peak {peak:.1f} GFLOP/s")

    engine = _warm_engine(opts, dtype)
    vocab = engine.model_config.vocab_size
    max_len = engine.max_model_len
    model_path = engine.model_path

    if "pdserve" in opts.systems:
        progress(f"{dtype}: prefill MFU ({sz.mfu_prompts} x {sz.mfu_prompt_len} tokens)")
        mfu_reqs = workload_fixed(sz.mfu_prompts, sz.mfu_prompt_len, 1, vocab, opts.seed + 1)
        out["prefill"] = measure_prefill(engine, mfu_reqs, peak)
        saved()
        progress(f"{dtype}: prefill {out['prefill']['prefill_tokens_per_s']:.0f} tok/s, "
                 f"MFU {out['prefill']['mfu']:.1%}")

    hf = None
    if {"hf-static", "hf-cb"} & set(opts.systems) and {"a", "b"} & set(opts.workloads):
        hf = load_hf(model_path, dtype)
        warm = [Request([FIRST_REGULAR_TOKEN] * 8, 2)]
        if "hf-static" in opts.systems:
            run_hf_static(hf, warm, sz.hf_batch)
    cb_error: str | None = None
    if hf is not None and "hf-cb" in opts.systems:
        try:
            warm_hf_cb(hf, opts)
        except Exception as e:
            traceback.print_exc()
            cb_error = f"{type(e).__name__}: {e}"
            progress(f"{dtype}: hf-cb does not run: {cb_error}")

    workloads: dict[str, list[Request]] = {}
    if "a" in opts.workloads:
        workloads["a"] = workload_fixed(_scaled(sz.a_requests, opts.scale), sz.a_prompt,
                                        sz.a_output, vocab, opts.seed)
    if "b" in opts.workloads:
        workloads["b"] = workload_azure(_scaled(sz.b_requests, opts.scale), vocab, opts.seed,
                                        sz.b_length_divisor, sz.b_max_output, max_len,
                                        opts.azure_path)
    for name, reqs in workloads.items():
        entry: dict[str, Any] = {
            "requests": len(reqs),
            "prompt_tokens": sum(len(r.prompt) for r in reqs),
            "output_tokens": output_tokens(reqs),
            "systems": {},
        }
        out[name] = entry  # filled in as systems finish
        results: dict[str, ThroughputResult] = {}
        for system in opts.systems:
            what = f"{dtype} {name} {system} ({len(reqs)} requests)"
            progress(f"{what}: start")
            if system == "pdserve":
                del engine  # one engine (and KV cache) alive at a time
                engine = _warm_engine(opts, dtype)
            if system == "hf-cb" and cb_error is not None:
                res = ThroughputResult(system, len(reqs), output_tokens(reqs), 0, 0.0, 0.0,
                                       error=cb_error)
            else:
                res = _try(progress, what, _system_runner(system, engine, hf, reqs, opts),
                           system, reqs)
            results[system] = res
            entry["systems"][system] = {**asdict(res), "loadavg_1m": os.getloadavg()[0]}
            saved()
        tps = {s: (r.tokens_per_s if r.error is None else None) for s, r in results.items()}
        entry["ratios"] = {
            f"pdserve/{s}": _ratio(tps.get("pdserve"), tps.get(s))
            for s in ("hf-static", "hf-cb") if s in results and "pdserve" in results
        }
        entry["targets"] = {
            key: _target(entry["ratios"].get(key.split(" ", 1)[1]), t)
            for key, t in TARGETS.items() if key.startswith(f"{name} ")
            and key.split(" ", 1)[1] in entry["ratios"]
        }
        saved()
    del hf, engine

    if "c" in opts.workloads and "pdserve" in opts.systems:
        reqs = workload_shared_prefix(_scaled(sz.c_requests, opts.scale), sz.c_prefix,
                                      sz.c_suffix, sz.c_output, vocab, opts.seed)
        entry = {"requests": len(reqs),
                 "min_prefill_tokens": min_prefill_tokens([r.prompt for r in reqs])}
        for caching in (True, False):
            label = "on" if caching else "off"
            progress(f"{dtype} c prefix caching {label} ({len(reqs)} requests): start")
            res = run_ttft(_warm_engine(opts, dtype, prefix_caching=caching), reqs)
            entry[label] = asdict(res)
            progress(f"{dtype} c prefix caching {label}: mean TTFT {res.ttft_mean_s * 1e3:.1f}"
                     f" ms, {res.prefill_tokens_computed} prefill tokens")
            # Later requests with nothing else running, once one request has put the
            # system prompt in the cache (as the overlapping run has after its first
            # request): TTFT is the request's own prefill.
            iso_engine = _warm_engine(opts, dtype, prefix_caching=caching)
            run_pdserve(iso_engine, reqs[:1], tag="prime")
            iso = reqs[1 : 1 + max(1, len(reqs) // 10)]
            res = run_ttft(iso_engine, iso, False)
            entry[f"isolated_{label}"] = asdict(res)
            progress(f"{dtype} c isolated, caching {label}: mean TTFT "
                     f"{res.ttft_mean_s * 1e3:.1f} ms")
        on, off = entry["on"], entry["off"]
        entry["ttft_ratio"] = _ratio(off["ttft_mean_s"], on["ttft_mean_s"])
        entry["isolated_ttft_ratio"] = _ratio(entry["isolated_off"]["ttft_mean_s"],
                                              entry["isolated_on"]["ttft_mean_s"])
        entry["prefill_excess"] = on["prefill_tokens_computed"] / entry["min_prefill_tokens"] - 1
        entry["targets"] = {
            "c ttft off/on": _target(entry["ttft_ratio"], TARGETS["c ttft off/on"]),
            "c prefill excess": {
                "value": entry["prefill_excess"], "target": PREFILL_EXCESS_TARGET,
                "met": entry["prefill_excess"] <= PREFILL_EXCESS_TARGET,
            },
        }
        entry["loadavg_1m"] = os.getloadavg()[0]
        out["c"] = entry
        saved()
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
    (if given) after every workload."""
    import transformers

    progress = progress or Progress("pdserve.bench.engine")
    torch.set_num_threads(opts.threads)
    result: dict[str, Any] = {
        "config": {
            **{k: v for k, v in asdict(opts).items() if k != "sizes"},
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


def _fmt_ratio(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "-"
    mark = "ok" if entry["met"] else "MISSED"
    return f"{entry['value']:.2f} (>= {entry['target']:g}: {mark})"


def report(result: dict[str, Any]) -> str:
    """Markdown tables: throughput and ratios, TTFT, peak and MFU."""
    parts = []
    rows = []
    for dtype, res in result["results"].items():
        for name in ("a", "b"):
            if name not in res:
                continue
            w = res[name]
            sys_ = w["systems"]
            targets, ratios = w.get("targets", {}), w.get("ratios", {})

            def tps(s: str, sys_: dict[str, Any] = sys_) -> object:
                r = sys_.get(s)
                if r is None:
                    return None
                return "error" if r["error"] else r["tokens_per_s"]

            rows.append([
                dtype, name, w["requests"], w["output_tokens"],
                tps("pdserve"), tps("hf-static"), tps("hf-cb"),
                _fmt_ratio(targets[f"{name} pdserve/hf-static"])
                if f"{name} pdserve/hf-static" in targets
                else _num(ratios.get("pdserve/hf-static")),
                _fmt_ratio(targets[f"{name} pdserve/hf-cb"])
                if f"{name} pdserve/hf-cb" in targets
                else _num(ratios.get("pdserve/hf-cb")),
            ])
    if rows:
        parts.append(markdown_table(
            ["dtype", "workload", "requests", "output tokens", "pdserve tok/s",
             "hf-static tok/s", "hf-cb tok/s", "pdserve / hf-static", "pdserve / hf-cb"],
            rows))
    rows, iso_rows = [], []
    for dtype, res in result["results"].items():
        c = res.get("c")
        if c:
            rows.append([
                dtype, c["requests"], c["on"]["ttft_mean_s"] * 1e3,
                c["on"]["ttft_median_s"] * 1e3, c["off"]["ttft_mean_s"] * 1e3,
                c["off"]["ttft_median_s"] * 1e3, _fmt_ratio(c["targets"]["c ttft off/on"]),
                c["on"]["prefill_tokens_computed"], c["off"]["prefill_tokens_computed"],
                c["min_prefill_tokens"],
                f"{c['prefill_excess']:+.2%} (<= 2%: "
                f"{'ok' if c['targets']['c prefill excess']['met'] else 'MISSED'})",
            ])
            iso_rows.append([
                dtype, c["isolated_on"]["requests"], c["isolated_on"]["ttft_mean_s"] * 1e3,
                c["isolated_on"]["ttft_median_s"] * 1e3, c["isolated_off"]["ttft_mean_s"] * 1e3,
                c["isolated_off"]["ttft_median_s"] * 1e3, _num(c["isolated_ttft_ratio"]),
            ])
    if rows:
        parts.append(markdown_table(
            ["dtype", "requests", "TTFT on mean ms", "on median ms", "TTFT off mean ms",
             "off median ms", "mean off / on", "prefill tokens on", "prefill tokens off",
             "minimum", "on vs minimum"], rows))
        parts.append("Each request alone (the system prompt already cached):\n\n" + markdown_table(
            ["dtype", "requests", "TTFT on mean ms", "on median ms", "TTFT off mean ms",
             "off median ms", "mean off / on"], iso_rows))
    rows = []
    for dtype, res in result["results"].items():
        p = res.get("prefill")
        rows.append([
            dtype, res.get("matmul_peak_gflops"),
            p["prefill_tokens_per_s"] if p else None,
            p["model_gflops"] if p else None,
            f"{p['mfu']:.1%}" if p else None,
        ])
    if rows:
        parts.append(markdown_table(
            ["dtype", "matmul peak GFLOP/s", "prefill tok/s", "prefill model GFLOP/s",
             "prefill MFU"], rows))
    return "\n\n".join(parts)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def main(argv: Sequence[str] | None = None, sizes: Sizes | None = None) -> int:
    """The command line; ``sizes`` overrides the workload shapes (tests shrink them)."""
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.engine",
                                description=__doc__.split("\n")[0])
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--scale", type=float, default=1.0,
                   help="fraction of each workload's request count (quick runs)")
    p.add_argument("--model", default="small", help="built-in name or checkpoint folder")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
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
    opts = BenchOptions(
        model=args.model, dtypes=tuple(args.dtype), workloads=tuple(args.workloads),
        systems=tuple(args.systems), scale=args.scale, seed=args.seed,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        threads=args.threads, sizes=sizes or Sizes(),
    )
    result = run_benchmark(opts, json_path=args.json)
    save_json(result, args.json)
    print(report(result))
    print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

