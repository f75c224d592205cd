"""``pdserve bench serve``: a load generator and latency report for a running server.

    pdserve bench serve --target 127.0.0.1:50051 --dataset sharegpt --num-prompts 200 \\
        --request-rate 2 --goodput ttft:1000 tpot:100 --json out.json --plot out.png
    pdserve bench serve --endpoint http://127.0.0.1:8000 ...   # any OpenAI-compatible server
    pdserve bench serve --colocated --model small ...          # an Engine in this process

Backends: pdserve over gRPC (the SDK's ``AsyncClient``), any OpenAI-compatible endpoint
(``POST /v1/completions``, streamed, ``ignore_eos`` so that output lengths are what the
workload asks), or ``--colocated``: one ``engine.Engine`` doing prefill and decode in this
process on a thread (``--threads`` torch threads), fed at the same send times, with each
chunk timed when ``Engine.step`` returns it (no network: the baseline without disaggregation
or a front). Every request is greedy. Workloads and arrivals: ``pdserve.bench.serve_workload``;
metric definitions: ``pdserve.bench.serve_metrics``. ``--sweep R1,R2,...`` repeats the run at each
rate and plots goodput against rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import queue
import sys
import threading
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from pdserve.bench.serve_metrics import RequestResult, parse_goodput, summarize
from pdserve.bench.serve_workload import (
    WorkItem,
    read_trace,
    replay,
    sharegpt_prompts,
    synthetic_prompts,
    trace_prompts,
    with_arrivals,
)

FALLBACK_VOCAB = 500
"""Random prompt ids stay below this when the server does not say its vocabulary (an
OpenAI endpoint): every tokenizer has that many ids."""

# ---------------------------------------------------------------------- backends


class Backend(ABC):
    """Sends one request and records its timeline into a ``RequestResult``."""

    name: str = ""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect / load; called once before the first request."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections, stop threads."""

    async def vocab_size(self) -> int | None:
        """The served model's vocabulary, if the backend can tell."""
        return None

    @abstractmethod
    async def send(self, item: WorkItem, result: RequestResult) -> None:
        """Run ``item``; append each output chunk's time since the send to
        ``result.chunk_times`` and set ``output_len`` (raise on failure)."""


class GrpcBackend(Backend):
    """pdserve's gRPC API through the SDK."""

    name = "pdserve-grpc"

    def __init__(self, target: str, api_key: str | None = None) -> None:
        self.target = target
        self.api_key = api_key
        self._client: Any = None

    async def start(self) -> None:
        from pdserve_client import AsyncClient

        self._client = AsyncClient(self.target, api_key=self.api_key, retries=0)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def vocab_size(self) -> int | None:
        models = await self._client.list_models()
        return models[0].vocab_size if models else None

    async def send(self, item: WorkItem, result: RequestResult) -> None:
        start = time.perf_counter()
        tokens = 0
        async for chunk in self._client.stream(item.prompt, max_tokens=item.output_len,
                                               temperature=0.0, ignore_eos=True):
            if chunk.token_ids:
                result.chunk_times.append(time.perf_counter() - start)
                tokens += len(chunk.token_ids)
            self.observe(chunk, result)
        result.output_len = tokens

    def observe(self, chunk: Any, result: RequestResult) -> None:
        """Take what a streamed chunk says beyond its tokens (its usage)."""
        if chunk.usage is not None:
            result.prompt_len = chunk.usage.prompt_tokens


class OpenAIBackend(Backend):
    """Any OpenAI-compatible server: streamed ``/v1/completions`` over aiohttp."""

    name = "openai"

    def __init__(self, endpoint: str, model: str | None = None,
                 api_key: str | None = None) -> None:
        self.endpoint = endpoint.rstrip("/")
        if self.endpoint.endswith("/v1"):
            self.endpoint = self.endpoint[:-3]
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: Any = None

    async def start(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=6 * 3600))
        if self.model is None:
            async with self._session.get(f"{self.endpoint}/v1/models",
                                         headers=self.headers) as resp:
                resp.raise_for_status()
                self.model = (await resp.json())["data"][0]["id"]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, item: WorkItem, result: RequestResult) -> None:
        body = {"model": self.model, "prompt": item.prompt, "max_tokens": item.output_len,
                "temperature": 0.0, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        chunks = 0
        async with self._session.post(f"{self.endpoint}/v1/completions", json=body,
                                      headers=self.headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    raise RuntimeError(f"stream error: {msg['error']}")
                now = time.perf_counter() - start
                choices = msg.get("choices") or []
                if choices and (choices[0].get("text") or choices[0].get("token_ids")):
                    result.chunk_times.append(now)
                    chunks += 1
                usage = msg.get("usage")
                if usage:
                    result.output_len = int(usage["completion_tokens"])
                    result.prompt_len = int(usage["prompt_tokens"])
        if not result.output_len:
            result.output_len = chunks


class ColocatedBackend(Backend):
    """One ``Engine`` running both phases on a thread of this process."""

    name = "colocated"

    def __init__(self, model: str, *, threads: int = 2, max_num_batched_tokens: int = 512,
                 block_size: int = 16, num_blocks: int | None = None,
                 dtype: str = "float32") -> None:
        self.model = model
        self.dtype = dtype
        self.threads = threads
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._inbox: queue.SimpleQueue[tuple[str, list[int] | str, int] | None] = (
            queue.SimpleQueue())
        self._outboxes: dict[str, asyncio.Queue[tuple[float, Any]]] = {}
        self._thread: threading.Thread | None = None
        self._engine: Any = None

    async def start(self) -> None:
        import torch

        from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
        from pdserve.engine.engine import Engine

        torch.set_num_threads(self.threads)
        config = EngineConfig(
            model=self.model, dtype=self.dtype, device="cpu",
            cache=CacheConfig(block_size=self.block_size, num_blocks=self.num_blocks),
            scheduler=SchedulerConfig(max_num_batched_tokens=self.max_num_batched_tokens))
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[Any] = loop.create_future()

        def run() -> None:
            # The engine is built on the thread that steps it: OpenMP keeps a pool of
            # threads per thread that starts parallel regions, and the loading's pool, idle
            # beside the stepping one, made libgomp count more threads than cores and stop
            # spinning between regions. Measured on 2 cores (SmolLM2 bf16, batch 16): decode
            # steps of 51.5 ms with the engine built elsewhere, 34.2 ms built here.
            try:
                engine = Engine(config)
            except BaseException as exc:
                loop.call_soon_threadsafe(ready.set_exception, exc)
                return
            loop.call_soon_threadsafe(ready.set_result, engine)
            self._run(loop, engine)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        self._engine = await ready

    async def vocab_size(self) -> int | None:
        return int(self._engine.model_config.vocab_size)

    async def close(self) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            await asyncio.to_thread(self._thread.join, 30)

    def _run(self, loop: asyncio.AbstractEventLoop, engine: Any) -> None:
        from pdserve.engine.sampling import SamplingParams

        while True:
            block = not engine.has_unfinished()
            while True:
                try:
                    job = self._inbox.get(block=block)
                except queue.Empty:
                    break
                if job is None:
                    return
                rid, prompt, max_tokens = job
                params = SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                        ignore_eos=True)
                engine.add_request(rid, prompt, params)
                block = False
            outputs = engine.step()
            if outputs:  # one wake-up of the event loop per step, not one per request
                loop.call_soon_threadsafe(self._deliver, time.perf_counter(), outputs)

    def _deliver(self, at: float, outputs: list[Any]) -> None:
        """Hand a step's outputs to their requests (event loop thread)."""
        for out in outputs:
            self._outboxes[out.request_id].put_nowait((at, out))

    async def send(self, item: WorkItem, result: RequestResult) -> None:
        rid = uuid.uuid4().hex
        box: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()
        self._outboxes[rid] = box
        start = time.perf_counter()
        self._inbox.put((rid, item.prompt, item.output_len))
        try:
            while True:
                at, out = await box.get()
                if out.new_token_ids:
                    result.chunk_times.append(at - start)
                if out.finished:
                    result.output_len = len(out.token_ids)
                    result.prompt_len = len(out.prompt_token_ids)
                    return
        finally:
            del self._outboxes[rid]


# ---------------------------------------------------------------------- one run


async def run_load(backend: Backend, items: list[WorkItem], *, max_concurrency: int | None = None,
                   progress: bool = True, label: str = "") -> tuple[list[RequestResult], float]:
    """Send ``items`` at their ``arrival_s`` (at most ``max_concurrency`` in flight);
    returns their results and the run's duration (start -> last completion)."""
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc=label or backend.name, disable=not progress,
               file=sys.stderr, leave=True, unit="req")
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    start = time.perf_counter()

    async def one(item: WorkItem) -> RequestResult:
        await asyncio.sleep(max(0.0, start + item.arrival_s - time.perf_counter()))
        result = RequestResult(prompt_len=item.prompt_len)
        if gate is not None:
            await gate.acquire()
        try:
            result.send_time = time.perf_counter() - start
            await backend.send(item, result)
            if not result.chunk_times:
                raise RuntimeError("no output")
        except Exception as exc:  # a failed request is a result, not a crash
            result.ok = False
            result.error = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            if gate is not None:
                gate.release()
            bar.update(1)
        return result

    results = await asyncio.gather(*(one(it) for it in items))
    duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


# ---------------------------------------------------------------------- reporting


def format_report(label: str, report: dict[str, Any]) -> str:
    """A human-readable block in the layout of vLLM's serving benchmark."""
    lines = [f"{'=' * 14} Serving Benchmark Result: {label} {'=' * 14}",
             f"{'Successful requests:':<40}{report['completed']:<10}",
             f"{'Failed requests:':<40}{report['failed']:<10}",
             f"{'Benchmark duration (s):':<40}{report['duration_s']:<10.2f}",
             f"{'Total input tokens:':<40}{report['input_tokens']:<10}",
             f"{'Total generated tokens:':<40}{report['output_tokens']:<10}",
             f"{'Request throughput (req/s):':<40}{report['request_throughput']:<10.2f}",
             f"{'Output token throughput (tok/s):':<40}{report['output_throughput']:<10.2f}",
             f"{'Total token throughput (tok/s):':<40}"
             f"{report['total_token_throughput']:<10.2f}"]
    if "goodput" in report:
        lines.append(f"{'Request goodput (req/s):':<40}{report['goodput']:<10.2f}")
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token "
                       "(excl. 1st token)"), ("itl", "Inter-token Latency"),
                       ("e2el", "End-to-end Latency")):
        d = report[key]
        lines.append(f"{'-' * 15}{title}{'-' * 15}")
        for stat in ("mean", "median", "p90", "p99"):
            lines.append(f"{f'{stat.capitalize()} {key.upper()} (ms):':<40}"
                         f"{d[f'{stat}_ms']:<10.2f}")
    for err in report.get("errors", []):
        lines.append(f"error: {err}")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path, *, sweep: bool) -> list[Path]:
    """Latency CDFs (TTFT, TPOT, ITL, E2E) of every run; with ``sweep`` also goodput and
    throughput against request rate (``<path stem>_goodput.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, key, title in zip(axes, ("ttft", "tpot", "itl", "e2el"),
                              ("TTFT", "TPOT", "ITL", "E2E latency"), strict=True):
        for run in runs:
            values = np.sort(np.asarray(run["samples"][key]) * 1000.0)
            if values.size:
                ax.plot(values, np.arange(1, values.size + 1) / values.size, label=run["label"])
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("fraction of requests (ITL: of gaps)")
    if any(ax.get_lines() for ax in axes):
        axes[-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out = [path]
    if sweep:
        fig, ax = plt.subplots(figsize=(6, 4))
        by_backend: dict[str, list[dict[str, Any]]] = {}
        for run in runs:
            by_backend.setdefault(run["backend"], []).append(run)
        for name, group in by_backend.items():
            rates = [r["request_rate"] for r in group]
            ax.plot(rates, [r["report"].get("goodput", r["report"]["request_throughput"])
                            for r in group], marker="o", label=f"{name} goodput")
            ax.plot(rates, [r["report"]["request_throughput"] for r in group], ls="--",
                    marker=".", label=f"{name} throughput")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("req/s")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        goodput_path = path.with_name(f"{path.stem}_goodput{path.suffix}")
        fig.savefig(goodput_path, dpi=110)
        plt.close(fig)
        out.append(goodput_path)
    return out


# ---------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pdserve bench serve``."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--target", default="127.0.0.1:50051",
                       help="pdserve's gRPC address (the default backend)")
    where.add_argument("--endpoint", help="an OpenAI-compatible base URL, e.g. "
                                          "http://127.0.0.1:8000 (pdserve's front, vLLM, ...)")
    where.add_argument("--colocated", action="store_true",
                       help="run one engine (both phases) in this process instead")
    p.add_argument("--model", default=None,
                   help="model name for --endpoint (default: its first), checkpoint or "
                        "built-in name for --colocated (default tiny)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--threads", type=int, default=2, help="torch threads of --colocated")
    p.add_argument("--dtype", default="float32", help="--colocated engine's dtype")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="--colocated engine's step token budget")
    p.add_argument("--label", default=None, help="name of this system in the results")
    p.add_argument("--dataset", default="sharegpt",
                   choices=["sharegpt", "synthetic", "azure", "mooncake"],
                   help="prompts: ShareGPT text, random ids, or a trace's lengths")
    p.add_argument("--trace", default=None,
                   help="trace file or short name (azure: the shipped code trace; mooncake: "
                        "conversation / synthetic)")
    p.add_argument("--replay", action="store_true",
                   help="send at the trace's timestamps (times --time-scale) instead of "
                        "--request-rate")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply trace time gaps (0.5 = twice as fast)")
    p.add_argument("--trace-offset", type=int, default=0, help="skip this many trace rows")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=256, help="synthetic prompt length")
    p.add_argument("--output-len", type=int, default=128,
                   help="output tokens (synthetic, sharegpt)")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="synthetic lengths vary uniformly by this fraction")
    p.add_argument("--length-scale", type=float, default=1.0,
                   help="scale trace input lengths (to fit a small model)")
    p.add_argument("--max-input-len", type=int, default=None)
    p.add_argument("--max-output-len", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None,
                   help="random prompt ids stay below this (default: the model's if the "
                        f"backend tells, else {FALLBACK_VOCAB})")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests/s (default inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the gaps: 1 Poisson, <1 burstier, >1 steadier")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--sweep", default=None,
                   help="comma-separated request rates: one run each, goodput vs rate plot")
    p.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs (ttft, tpot, e2el in ms) a request must all meet to count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="write latency CDFs here (PNG)")
    p.add_argument("--no-progress", action="store_true")


def make_backend(args: argparse.Namespace) -> Backend:
    if args.colocated:
        return ColocatedBackend(args.model or "tiny", threads=args.threads,
                                max_num_batched_tokens=args.max_num_batched_tokens,
                                dtype=args.dtype)
    if args.endpoint:
        if not args.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"--endpoint must be an http(s) URL, got {args.endpoint!r}")
        return OpenAIBackend(args.endpoint, args.model, args.api_key)
    return GrpcBackend(args.target, args.api_key)


def build_workload(args: argparse.Namespace, vocab_size: int) -> list[WorkItem]:
    """The requests of one run, without send times (trace replay keeps the trace's)."""
    n = args.num_prompts
    if args.dataset == "sharegpt":
        return sharegpt_prompts(n, args.output_len, seed=args.seed)
    if args.dataset == "synthetic":
        return synthetic_prompts(n, args.input_len, args.output_len, vocab_size=vocab_size,
                                 range_ratio=args.range_ratio, seed=args.seed)
    trace = args.trace or ("azure" if args.dataset == "azure" else "conversation")
    rows = read_trace(trace, args.dataset, limit=args.trace_offset + n)[args.trace_offset:]
    return trace_prompts(rows, vocab_size=vocab_size, length_scale=args.length_scale,
                         max_input_len=args.max_input_len, max_output_len=args.max_output_len,
                         seed=args.seed)


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    slos = parse_goodput(args.goodput or [])
    rates = ([float(r) for r in args.sweep.split(",")] if args.sweep
             else [args.request_rate])
    backend = make_backend(args)
    await backend.start()
    try:
        vocab = args.vocab_size or await backend.vocab_size() or FALLBACK_VOCAB
        base = build_workload(args, vocab)
        label = args.label or backend.name
        runs = []
        for rate in rates:
            if args.replay:
                items = replay(base, args.time_scale)
            else:
                items = with_arrivals(base, rate, args.burstiness, seed=args.seed)
            name = label if args.replay else f"{label} @ {rate:g} req/s"
            results, duration = await run_load(backend, items,
                                               max_concurrency=args.max_concurrency,
                                               progress=not args.no_progress, label=name)
            report = summarize(results, duration, slos)
            print(format_report(name, report), flush=True)
            done = [r for r in results if r.ok]
            runs.append({
                "label": name, "backend": label,
                "request_rate": None if args.replay else rate, "report": report,
                "samples": {"ttft": [r.ttft for r in done], "e2el": [r.e2e for r in done],
                            "tpot": [t for r in done if (t := r.tpot) is not None],
                            "itl": [g for r in done for g in r.itls]},
            })
    finally:
        await backend.close()
    config = {k: v for k, v in vars(args).items() if k != "func"}
    out = {"config": config, "runs": runs}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    if args.plot:
        for path in plot(runs, Path(args.plot), sweep=bool(args.sweep)):
            print(f"wrote {path}", file=sys.stderr)
    return out


def main(args: argparse.Namespace) -> int:
    """Run ``pdserve bench serve`` with parsed ``args``; 0 if every request completed."""
    try:
        out = asyncio.run(_main(args))
    except (ValueError, OSError) as exc:
        print(f"pdserve bench serve: error: {exc}", file=sys.stderr)
        return 2
    return 0 if all(run["report"]["failed"] == 0 for run in out["runs"]) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m pdserve.bench.serve", description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
