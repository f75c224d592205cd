"""Service benchmark: what the disaggregated path costs and what streaming KV saves.

    python -m pdserve.bench.service [--parts 1 2 3] [--quick] [--json PATH]

- Part 1, overhead: the same greedy requests (``--prompt-len`` 128-token prompts, 64 output
  tokens, ``ignore_eos``) at 1, 16 and 64 concurrent streams, (a) on the colocated
  ``engine.Engine`` stepped in this process, every request of a round added at once, and
  (b) on pdserve with the "tiny" model, 1 prefill + 1 decode worker, streamed through the
  SDK (``AsyncClient``). Time to first token (TTFT) and inter-token latency (ITL, chunk
  gaps split evenly over the chunk's tokens) are taken where the tokens appear: after
  ``Engine.step`` returns, or when the client reads a chunk. "Added" is pdserve minus
  colocated. Ray starts each worker with ``OMP_NUM_THREADS`` = its CPUs (1), so the
  colocated engine gets the same torch thread count (``--colocated-threads``, default 1):
  pdserve then computes on 2 processes x 1 thread (prefill and decode overlap on the 2
  cores, beside the router, Ray and the client) against 1 process x 1 thread, so part of
  the difference is compute placement, not router cost.
- Part 2, exposed KV transfer: the "small" model, one ``--long-prompt`` (2,048-token)
  prompt at a time, chunked prefill of ``--chunk`` tokens. The prefill worker reports
  ``prefill_s`` (arrival to first token) and ``transfer_tail_s`` (first token to its last
  KV write completing in the decode worker's memory); the router returns them as
  ``Timing.prefill_s`` / ``transfer_s``. Streamed (the default: blocks written after every
  chunk) vs sent once at the end (``PoolConfig(stream_kv=False)``). Target: streamed
  exposed transfer <= 10 % of the prefill time.
- Part 3, token path: one decode step of 64 requests x 1 token from a sender to another
  process. ``zmq batch`` is what decode workers do (``encode_batch`` + PUSH, received by the
  router's ``TokenInbox``); ``zmq per record`` sends one message per request; ``ray call``
  is one Ray actor call per step carrying the same ``TokenRecord``s. Per step: the sender's
  cost (what the decode loop pays), the round trip to the records being in per-request
  queues, and the pipelined cost (``--steps`` sent back to back).

The router runs in a child process (with its own local Ray cluster holding the workers), so
the client's 64 streams do not share the router's interpreter lock. Prompts are random
token ids, unique per request, so no prefix cache hit skews a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.bench.common import Progress, markdown_table
from pdserve.bench.trace import RESULTS_DIR
from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.kvtransfer.auth import ChannelKey
from pdserve.router.app import serve
from pdserve.router.cluster import NAMESPACE
from pdserve.router.flow import FlowConfig
from pdserve.router.pool_config import PoolConfig
from pdserve.router.server import Router, RouterConfig
from pdserve.worker.protocol import TokenRecord, encode_batch, token_channel

FIRST_REGULAR_TOKEN = 3
"""Prompt token ids start here: 0..2 are the built-in checkpoints' BOS, EOS and PAD."""
TRANSFER_SHARE_TARGET = 0.10
"""Streamed exposed KV transfer must stay within this share of the prefill time."""
RAY_ENV = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}


@dataclass(frozen=True, slots=True)
class Options:
    parts: tuple[int, ...] = (1, 2, 3)
    concurrency: tuple[int, ...] = (1, 16, 64)
    min_requests: int = 64  # per concurrency level: rounds = ceil(min_requests / c)
    colocated_threads: int = 1
    prompt_len: int = 128
    output_len: int = 64
    long_prompt: int = 2048
    chunk: int = 256
    runs: int = 5
    steps: int = 2000
    batch: int = 64


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_REGULAR_TOKEN, vocab) for _ in range(length)] for _ in range(n)]


def engine_config(model: str, num_blocks: int, chunk: int) -> EngineConfig:
    """The engine set-up shared by the colocated engine and both worker pools."""
    return EngineConfig(model=model, dtype="float32", device="cpu",
                        cache=CacheConfig(block_size=16, num_blocks=num_blocks),
                        scheduler=SchedulerConfig(max_num_batched_tokens=chunk))


# ---------------------------------------------------------------------- the service


def _serve_child(config: RouterConfig, conn: Connection) -> None:
    os.dup2(2, 1)  # the benchmark's stdout carries only its tables
    import ray

    ray.init(num_cpus=16, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
             runtime_env=RAY_ENV)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def ready(router: Router, port: int) -> None:
            conn.send(("ready", port))
            loop.run_in_executor(None, conn.recv).add_done_callback(lambda _: stop.set())

        await serve(config, stop=stop, on_ready=ready)

    try:
        asyncio.run(main())
    except BaseException as exc:
        conn.send(("error", repr(exc)))
        raise
    finally:
        ray.shutdown()


class ServiceProcess:
    """A pdserve router, its local Ray cluster and worker pools, in a child process."""

    def __init__(self, config: RouterConfig, start_timeout_s: float = 300.0) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_child, args=(config, child))
        self._proc.start()
        if not self._conn.poll(start_timeout_s):
            self.stop()
            raise RuntimeError(f"service did not start within {start_timeout_s:.0f}s")
        kind, value = self._conn.recv()
        if kind != "ready":
            self.stop()
            raise RuntimeError(f"service did not start: {value}")
        self.target = f"127.0.0.1:{value}"

    def stop(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send("stop")
            except OSError:
                pass
            self._proc.join(60)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(10)

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def router_config(model: str, num_blocks: int, chunk: int, stream_kv: bool = True) -> RouterConfig:
    engine = engine_config(model, num_blocks, chunk)
    return RouterConfig(
        pools=PoolConfig(engine=engine, num_prefill=1, num_decode=1, stream_kv=stream_kv),
        port=0, flow=FlowConfig(max_waiting=1024),
    )


# ---------------------------------------------------------------------- part 1: overhead


@dataclass(slots=True)
class Trace:
    """When one request's tokens appeared: ``times[i]`` carried ``counts[i]`` tokens."""

    start: float
    times: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def add(self, now: float, tokens: Sequence[int]) -> None:
        if tokens:
            self.times.append(now)
            self.counts.append(len(tokens))
            self.tokens.extend(tokens)

    def ttft(self) -> float:
        return self.times[0] - self.start

    def itls(self) -> list[float]:
        out: list[float] = []
        for i in range(1, len(self.times)):
            gap = self.times[i] - self.times[i - 1]
            out += [gap / self.counts[i]] * self.counts[i]
        return out


def summarize(traces: list[Trace]) -> dict[str, float]:
    ttft = [t.ttft() for t in traces]
    itl = [x for t in traces for x in t.itls()]
    chunks = sum(len(t.times) for t in traces)
    tokens = sum(len(t.tokens) for t in traces)
    return {"ttft_median_ms": 1e3 * statistics.median(ttft),
            "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "itl_median_ms": 1e3 * statistics.median(itl),
            "itl_p99_ms": 1e3 * percentile(itl, 99),
            "requests": len(traces), "tokens": tokens, "tokens_per_chunk": tokens / chunks}


def run_colocated(config: EngineConfig, rounds: list[list[list[int]]],
                  output_len: int) -> list[Trace]:
    from pdserve.engine.engine import Engine
    from pdserve.engine.sampling import SamplingParams

    engine = Engine(config)  # the caller sets torch's thread count
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    traces: list[Trace] = []
    for r, prompts in enumerate(rounds):
        ids = [f"r{r}-{i}" for i in range(len(prompts))]
        start = time.perf_counter()
        for rid, prompt in zip(ids, prompts, strict=True):
            engine.add_request(rid, prompt, params)
        by_id = {rid: Trace(start) for rid in ids}
        while engine.has_unfinished():
            outputs = engine.step()
            now = time.perf_counter()
            for out in outputs:
                by_id[out.request_id].add(now, out.new_token_ids)
        traces += [by_id[rid] for rid in ids]
    return traces


async def _stream(client: Any, prompt: list[int], output_len: int) -> Trace:
    trace = Trace(time.perf_counter())
    async with client.stream(prompt, max_tokens=output_len, temperature=0.0,
                             ignore_eos=True) as stream:
        async for chunk in stream:
            trace.add(time.perf_counter(), chunk.token_ids)
    return trace


async def _run_service_rounds(target: str, rounds: list[list[list[int]]],
                              output_len: int) -> list[Trace]:
    from pdserve_client import AsyncClient

    traces: list[Trace] = []
    async with AsyncClient(target, timeout=600.0) as client:
        for prompts in rounds:
            traces += await asyncio.gather(*(_stream(client, p, output_len) for p in prompts))
    return traces


def run_service(target: str, rounds: list[list[list[int]]], output_len: int) -> list[Trace]:
    return asyncio.run(_run_service_rounds(target, rounds, output_len))


def part_overhead(opts: Options, log: Progress) -> dict[str, Any]:
    import torch

    from pdserve.engine.model.builtin import BUILTINS

    vocab = BUILTINS["tiny"].vocab_size
    blocks_per_req = -(-(opts.prompt_len + opts.output_len) // 16)
    num_blocks = max(512, 2 * blocks_per_req * max(opts.concurrency))
    config = engine_config("tiny", num_blocks, 256)
    plan: dict[int, list[list[list[int]]]] = {}
    seed = 1000
    for c in opts.concurrency:
        n_rounds = -(-opts.min_requests // c)
        plan[c] = []
        for _ in range(n_rounds):
            plan[c].append(random_prompts(c, opts.prompt_len, vocab, seed))
            seed += 1
    warmup = [random_prompts(4, opts.prompt_len, vocab, 1)]

    colocated: dict[int, list[Trace]] = {}
    log(f"part 1: colocated engine, {opts.colocated_threads} torch thread(s)")
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.colocated_threads)
    try:
        run_colocated(config, warmup, opts.output_len)
        for c in opts.concurrency:
            colocated[c] = run_colocated(config, plan[c], opts.output_len)
            log(f"  c={c}: {len(colocated[c])} requests")
    finally:
        torch.set_num_threads(threads)
    service: dict[int, list[Trace]] = {}
    log("part 1: starting pdserve (tiny, 1 prefill + 1 decode)")
    with ServiceProcess(router_config("tiny", num_blocks, 256)) as svc:
        run_service(svc.target, warmup, opts.output_len)
        for c in opts.concurrency:
            service[c] = run_service(svc.target, plan[c], opts.output_len)
            log(f"  c={c}: {len(service[c])} requests")
    rows = []
    for c in opts.concurrency:
        co, sv = summarize(colocated[c]), summarize(service[c])
        same = sum(a.tokens == b.tokens for a, b in zip(colocated[c], service[c], strict=True))
        rows.append({
            "concurrency": c, "colocated": co, "pdserve": sv,
            "added_ttft_median_ms": sv["ttft_median_ms"] - co["ttft_median_ms"],
            "added_ttft_p99_ms": sv["ttft_p99_ms"] - co["ttft_p99_ms"],
            "added_itl_median_ms": sv["itl_median_ms"] - co["itl_median_ms"],
            "added_itl_p99_ms": sv["itl_p99_ms"] - co["itl_p99_ms"],
            "identical_outputs": same,
        })
    return {"model": "tiny", "prompt_len": opts.prompt_len, "output_len": opts.output_len,
            "max_num_batched_tokens": 256, "num_blocks": num_blocks,
            "colocated_threads": opts.colocated_threads, "rows": rows}


# ---------------------------------------------------------------------- part 2: KV transfer


async def _sequential_completions(target: str, prompts: list[list[int]]) -> list[Any]:
    from pdserve_client import AsyncClient

    async with AsyncClient(target, timeout=600.0) as client:
        return [await client.generate(p, max_tokens=4, temperature=0.0, ignore_eos=True)
                for p in prompts]


def part_transfer(opts: Options, log: Progress) -> dict[str, Any]:
    from pdserve.engine.model.builtin import BUILTINS

    spec = BUILTINS["small"]
    block_bytes = spec.num_layers * 2 * 16 * spec.num_kv_heads * spec.head_dim * 4
    num_blocks = 4 * (-(-(opts.long_prompt + 16) // 16))
    modes: dict[str, Any] = {}
    # Distinct prompts: no prefix cache hit; the same ones in both modes (a fresh service each).
    prompts = random_prompts(opts.runs + 1, opts.long_prompt, spec.vocab_size, 7)
    outputs: list[list[tuple[int, ...]]] = []
    for name, stream_kv in (("streamed", True), ("sent once at the end", False)):
        log(f"part 2: starting pdserve (small, chunk {opts.chunk}, {name})")
        config = router_config("small", num_blocks, opts.chunk, stream_kv=stream_kv)
        with ServiceProcess(config) as svc:
            done = asyncio.run(_sequential_completions(svc.target, prompts))[1:]  # 1 warm-up
        outputs.append([c.token_ids for c in done])
        prefill = [c.timing.prefill_s for c in done]
        tail = [c.timing.transfer_s for c in done]
        shares = [t / p for t, p in zip(tail, prefill, strict=True)]
        modes[name] = {"prefill_s": statistics.median(prefill),
                       "transfer_s": statistics.median(tail),
                       "share": statistics.median(shares),
                       "ttft_s": statistics.median(c.timing.first_token_s for c in done),
                       "runs": [{"prefill_s": p, "transfer_s": t} for p, t in
                                zip(prefill, tail, strict=True)]}
        log(f"  {name}: share {modes[name]['share']:.3%}")
    return {"model": "small", "prompt_len": opts.long_prompt, "chunk": opts.chunk,
            "kv_mib": -(-opts.long_prompt // 16) * block_bytes / 2**20,
            "target_share": TRANSFER_SHARE_TARGET,
            "meets_target": modes["streamed"]["share"] <= TRANSFER_SHARE_TARGET,
            "identical_outputs": outputs[0] == outputs[1], "modes": modes}


# ---------------------------------------------------------------------- part 3: token path


def _inbox_child(conn: Connection, batch: int, key: ChannelKey) -> None:
    """Receives steps with the router's ``TokenInbox``; acks each step once every one of its
    ``batch`` records sits in its request's queue."""
    import zmq

    from pdserve.router.stream import TokenInbox

    async def main() -> None:
        inbox = TokenInbox(key)
        inbox.start()
        queues = [inbox.open(f"req-{i}") for i in range(batch)]
        ctx = zmq.Context.instance()
        ack = ctx.socket(zmq.PUSH)
        conn.send(inbox.endpoint)
        ack.connect(conn.recv())
        while True:
            for q in queues:
                if (await q.get()).finish_reason == "stop":
                    ack.close(linger=1000)
                    await inbox.close()
                    return
            ack.send(b"")

    asyncio.run(main())


class _Sink:
    """Ray actor: what a router's token endpoint would be if tokens came by actor call."""

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue[TokenRecord]] = {}

    async def push(self, records: list[TokenRecord]) -> int:
        for r in records:
            self.queues.setdefault(r.request_id, asyncio.Queue()).put_nowait(r)
        return len(records)

    async def drain(self) -> int:
        n = sum(q.qsize() for q in self.queues.values())
        self.queues.clear()
        return n


def _step_records(batch: int, step: int) -> list[TokenRecord]:
    return [TokenRecord(f"req-{i}", [FIRST_REGULAR_TOKEN + step % 100]) for i in range(batch)]


def _stats_us(send: list[float], rtt: list[float], pipelined: float,
              batch: int) -> dict[str, float]:
    return {"send_median_us": 1e6 * statistics.median(send),
            "rtt_median_us": 1e6 * statistics.median(rtt),
            "rtt_p99_us": 1e6 * percentile(rtt, 99),
            "pipelined_us_per_step": 1e6 * pipelined,
            "pipelined_us_per_token": 1e6 * pipelined / batch}


def _bench_zmq(opts: Options, per_record: bool) -> dict[str, float]:
    import zmq

    ctx = zmq.Context.instance()
    parent, child = mp.get_context("spawn").Pipe()
    key = ChannelKey.generate()
    proc = mp.get_context("spawn").Process(target=_inbox_child, args=(child, opts.batch, key))
    proc.start()
    ack = ctx.socket(zmq.PULL)
    ack_port = ack.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDHWM, 100_000)
    endpoint = parent.recv()
    push.connect(endpoint)
    sealer = key.sealer(token_channel(endpoint))  # as decode workers seal (HMAC-SHA256)
    parent.send(f"tcp://127.0.0.1:{ack_port}")
    send_t: list[float] = []
    rtt: list[float] = []

    def send(records: list[TokenRecord]) -> None:
        if per_record:
            for r in records:
                push.send(sealer.seal(encode_batch([r])), zmq.NOBLOCK)
        else:
            push.send(sealer.seal(encode_batch(records)), zmq.NOBLOCK)

    for step in range(opts.steps + 20):
        records = _step_records(opts.batch, step)
        t0 = time.perf_counter()
        send(records)
        t1 = time.perf_counter()
        ack.recv()
        t2 = time.perf_counter()
        if step >= 20:
            send_t.append(t1 - t0)
            rtt.append(t2 - t0)
    steps = [_step_records(opts.batch, s) for s in range(opts.steps)]
    t0 = time.perf_counter()
    for records in steps:
        send(records)
    for _ in steps:
        ack.recv()
    pipelined = (time.perf_counter() - t0) / opts.steps
    send([TokenRecord(f"req-{i}", [], "stop") for i in range(opts.batch)])
    proc.join(30)
    push.close()
    ack.close()
    return _stats_us(send_t, rtt, pipelined, opts.batch)


def _bench_ray(opts: Options) -> dict[str, float]:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, namespace="pdserve-bench", include_dashboard=False,
                 log_to_driver=False, runtime_env=RAY_ENV)
    try:
        sink = ray.remote(_Sink).options(max_concurrency=1000).remote()
        send_t: list[float] = []
        rtt: list[float] = []
        for step in range(opts.steps + 20):
            records = _step_records(opts.batch, step)
            t0 = time.perf_counter()
            ref = sink.push.remote(records)
            t1 = time.perf_counter()
            ray.get(ref)
            t2 = time.perf_counter()
            if step >= 20:
                send_t.append(t1 - t0)
                rtt.append(t2 - t0)
            if step % 500 == 0:
                ray.get(sink.drain.remote())
        ray.get(sink.drain.remote())
        steps = [_step_records(opts.batch, s) for s in range(opts.steps)]
        t0 = time.perf_counter()
        ray.get([sink.push.remote(records) for records in steps])
        pipelined = (time.perf_counter() - t0) / opts.steps
        ray.kill(sink)
    finally:
        if started:
            ray.shutdown()
    return _stats_us(send_t, rtt, pipelined, opts.batch)


TOKEN_METHODS = ("zmq batch", "zmq per record", "ray call")


def part_token_path(opts: Options, log: Progress,
                    which: Sequence[str] = TOKEN_METHODS) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    log(f"part 3: {opts.steps} steps of {opts.batch} records")
    for name in which:
        if name == "ray call":
            methods[name] = _bench_ray(opts)
        else:
            methods[name] = _bench_zmq(opts, per_record=name == "zmq per record")
    return {"batch": opts.batch, "steps": opts.steps,
            "batch_bytes": len(encode_batch(_step_records(opts.batch, 0))), "methods": methods}


# ---------------------------------------------------------------------- report


def report(result: dict[str, Any]) -> str:
    out = [f"machine: {result['cpus']} CPUs, load average {result['load_before']} before, "
           f"{result['load_after']} after"]
    if "overhead" in result:
        p = result["overhead"]
        out.append(f"\n### Part 1: overhead, tiny model, {p['prompt_len']}-token prompts, "
                   f"{p['output_len']} output tokens (ms); colocated: 1 process x "
                   f"{p['colocated_threads']} thread(s), pdserve: 2 workers x 1 thread\n")
        header = ["c", "path", "TTFT med", "TTFT p99", "ITL med", "ITL p99", "tokens/chunk",
                  "same tokens"]
        rows: list[list[object]] = []
        for r in p["rows"]:
            for name in ("colocated", "pdserve"):
                s = r[name]
                rows.append([r["concurrency"], name, s["ttft_median_ms"], s["ttft_p99_ms"],
                             s["itl_median_ms"], s["itl_p99_ms"], s["tokens_per_chunk"],
                             f"{r['identical_outputs']}/{s['requests']}"
                             if name == "pdserve" else None])
            rows.append([r["concurrency"], "**added**", r["added_ttft_median_ms"],
                         r["added_ttft_p99_ms"], r["added_itl_median_ms"],
                         r["added_itl_p99_ms"], None, None])
        out.append(markdown_table(header, rows))
    if "transfer" in result:
        p = result["transfer"]
        out.append(f"\n### Part 2: exposed KV transfer, small model, {p['prompt_len']}-token "
                   f"prompt ({p['kv_mib']:.0f} MiB of KV), chunk {p['chunk']}\n")
        rows = [[name, m["prefill_s"], m["transfer_s"], f"{100 * m['share']:.2f}%",
                 m["ttft_s"], len(m["runs"])] for name, m in p["modes"].items()]
        out.append(markdown_table(["mode", "prefill s", "exposed transfer s", "share",
                                   "router TTFT s", "runs"], rows))
        verdict = "met" if p["meets_target"] else "MISSED"
        out.append(f"\ntarget: streamed share <= {100 * p['target_share']:.0f}%: {verdict}; "
                   f"same tokens in both modes: {p['identical_outputs']}")
    if "token_path" in result:
        p = result["token_path"]
        out.append(f"\n### Part 3: token path, {p['batch']} requests x 1 token per step "
                   f"({p['batch_bytes']} bytes batched), {p['steps']} steps (us)\n")
        rows = [[name, m["send_median_us"], m["rtt_median_us"], m["rtt_p99_us"],
                 m["pipelined_us_per_step"], m["pipelined_us_per_token"]]
                for name, m in p["methods"].items()]
        out.append(markdown_table(["method", "sender/step", "round trip med", "round trip p99",
                                   "pipelined/step", "pipelined/token"], rows))
        step_ms = _decode_step_ms(result, p["batch"])
        if step_ms and "zmq batch" in p["methods"]:
            send_us = p["methods"]["zmq batch"]["send_median_us"]
            out.append(f"\nzmq batch sender cost = {send_us / (10 * step_ms):.2f}% of a "
                       f"{step_ms:.1f} ms decode step at c={p['batch']} (pdserve ITL median, "
                       "part 1)")
    return "\n".join(out)


def _decode_step_ms(result: dict[str, Any], concurrency: int) -> float | None:
    for row in result.get("overhead", {}).get("rows", []):
        if row["concurrency"] == concurrency:
            return float(row["pdserve"]["itl_median_ms"])
    return None


def run_benchmark(opts: Options, log: Progress) -> dict[str, Any]:
    import torch

    result: dict[str, Any] = {"options": asdict(opts), "cpus": os.cpu_count(),
                              "torch_threads": torch.get_num_threads(),
                              "load_before": [round(x, 2) for x in os.getloadavg()]}
    if 1 in opts.parts:
        result["overhead"] = part_overhead(opts, log)
    if 2 in opts.parts:
        result["transfer"] = part_transfer(opts, log)
    if 3 in opts.parts:
        result["token_path"] = part_token_path(opts, log)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.bench.service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, nargs="+", choices=(1, 2, 3), default=[1, 2, 3])
    parser.add_argument("--quick", action="store_true",
                        help="fewer requests, runs and steps (a smoke run, not a measurement)")
    parser.add_argument("--json", type=Path,
                        default=RESULTS_DIR / "service.json")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--long-prompt", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--colocated-threads", type=int, default=1,
                        help="torch threads of the colocated engine (each worker has 1)")
    args = parser.parse_args(argv)
    opts = Options(parts=tuple(sorted(set(args.parts))), prompt_len=args.prompt_len,
                   output_len=args.output_len, long_prompt=args.long_prompt, chunk=args.chunk,
                   colocated_threads=args.colocated_threads)
    if args.quick:
        opts = replace(opts, min_requests=4, runs=2, steps=200)
    result = run_benchmark(opts, Progress("service"))
    print(report(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults: {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
