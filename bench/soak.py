"""Soak: a running ``pdserve serve`` under hours-like load, mixed with cancels and bad input.

``--streams`` clients (256 by default) each send requests back to back over gRPC and the
OpenAI HTTP front, so that about that many streams are always open, for ``--duration``
seconds (30 minutes by default). The mix: greedy streams whose tokens are checked against
the first answer to the same prompt (exactness under load), sampled streams, whole HTTP
completions, client cancels mid-stream, deadlines that fall anywhere, HTTP disconnects,
and bad input of every kind (out-of-range fields, oversized prompts, broken JSON, bytes
that are no protobuf). Every ``--sample`` seconds it records the resident memory of the
router and of each worker process (``/proc``, Linux), and the workers' pids (a new pid is a
restart).

Reports requests served, answers by status code per kind of request, exactness mismatches,
worker restarts, blocks still held at the end, and memory over time (JSON, and a PNG with
``--plot``): memory is flat when each process's RSS over the last 10% of the run is within
5% of its RSS just after warm-up (``--warmup``, 10% of the run by default).

    python -m pdserve.bench.soak --duration 1800 --json bench/results/soak.json \\
        --plot bench/results/soak.png

The service runs as its own process (``pdserve serve --model tiny`` with an API key and
``--max-num-seqs 256``); pass ``--serve-args`` to change it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from pdserve.bench.common import Progress, start_server
from pdserve.protos.pdserve.v1 import generation_pb2 as pb
from pdserve.protos.pdserve.v1 import generation_pb2_grpc as pb_grpc

KEY = "soak-key"
KINDS = {  # kind -> weight
    "greedy": 30, "sampled": 15, "http": 15, "cancel": 10, "deadline": 10,
    "disconnect": 5, "bad_grpc": 8, "bad_http": 7,
}
PROMPTS = [f"Story {i}: once upon a time in a land of {i * 7} rivers," for i in range(40)]


@dataclass
class Tally:
    answers: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    mismatches: int = 0
    tokens: int = 0
    reference: dict[tuple[int, int], list[int]] = field(default_factory=dict)

    def count(self, kind: str, code: str) -> None:
        self.answers[(kind, code)] += 1


def _children(root: int) -> dict[int, str]:
    """Descendants of ``root`` -> their command line (Linux /proc)."""
    parents: dict[int, int] = {}
    cmd: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid:
                out[child] = cmd.get(child, "")
                frontier.append(child)
    return out


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _workers(router_pid: int) -> dict[str, int]:
    """'prefill-0' / 'decode-0' / 'tokenizer-0' -> pid: the router's worker processes."""
    found: dict[str, list[int]] = collections.defaultdict(list)
    for pid, cmd in _children(router_pid).items():
        for role, name in (("prefill", "PrefillWorker"), ("decode", "DecodeWorker")):
            if cmd.startswith(f"ray::{name}"):
                found[role].append(pid)
        if "pdserve.router.text" in cmd:  # the router's tokenizer process, once started
            found["tokenizer"].append(pid)
    return {f"{role}-{i}": pid for role, pids in found.items()
            for i, pid in enumerate(sorted(pids))}


class Load:
    """The clients. One grpc.aio channel and one aiohttp session shared by all streams."""

    def __init__(self, target: str, http_url: str, tally: Tally, seed: int) -> None:
        self.target, self.http_url, self.tally = target, http_url, tally
        self.rng = random.Random(seed)
        self.md = [("authorization", f"Bearer {KEY}")]

    async def __aenter__(self) -> Load:
        self.channel = grpc.aio.insecure_channel(self.target)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.raw = self.channel.unary_stream("/pdserve.v1.Generation/Generate",
                                             request_serializer=lambda m: m,
                                             response_deserializer=pb.GenerateResponse.FromString)
        self.http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"},
                                          timeout=aiohttp.ClientTimeout(total=600))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()
        await self.channel.close()

    def _request(self, prompt: str, max_tokens: int, **sampling: Any) -> pb.GenerateRequest:
        return pb.GenerateRequest(text=prompt, sampling=pb.SamplingParams(
            max_tokens=max_tokens, ignore_eos=True, **sampling))

    async def _grpc(self, kind: str, request: pb.GenerateRequest, *, timeout: float | None = None,
                    stop_after: int | None = None) -> list[int]:
        tokens: list[int] = []
        call = self.stub.Generate(request, metadata=self.md, timeout=timeout)
        try:
            async for reply in call:
                tokens += reply.token_ids
                if stop_after is not None and len(tokens) >= stop_after:
                    call.cancel()
                    self.tally.count(kind, "CANCELLED_BY_CLIENT")
                    return tokens
        except grpc.aio.AioRpcError as exc:
            self.tally.count(kind, exc.code().name)
            return tokens
        self.tally.count(kind, "OK")
        self.tally.tokens += len(tokens)
        return tokens

    async def one(self) -> None:
        rng = self.rng
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        n = rng.randrange(16, 257)
        p = rng.randrange(len(PROMPTS))
        if kind == "greedy":
            n = 16 * rng.randrange(1, 9)
            got = await self._grpc(kind, self._request(PROMPTS[p], n, temperature=0.0))
            ref = self.tally.reference.setdefault((p, n), got) if len(got) == n else None
            if ref is not None and got != ref:
                self.tally.mismatches += 1
        elif kind == "sampled":
            await self._grpc(kind, self._request(PROMPTS[p], n, temperature=0.8, top_p=0.9,
                                                 seed=rng.randrange(2**64)))
        elif kind == "cancel":
            await self._grpc(kind, self._request(PROMPTS[p], n, temperature=0.0),
                             stop_after=rng.randrange(1, 16))
        elif kind == "deadline":
            await self._grpc(kind, self._request(PROMPTS[p], n, temperature=0.0),
                             timeout=rng.uniform(0.01, 3.0))
        elif kind == "http":
            body = {"prompt": PROMPTS[p], "max_tokens": n, "temperature": 0, "ignore_eos": True}
            async with self.http.post(f"{self.http_url}/v1/completions", json=body) as resp:
                await resp.read()
                self.tally.count(kind, str(resp.status))
        elif kind == "disconnect":
            body = {"prompt": PROMPTS[p], "max_tokens": n, "stream": True, "ignore_eos": True}
            async with self.http.post(f"{self.http_url}/v1/completions", json=body) as resp:
                await resp.content.readline()
                self.tally.count(kind, f"{resp.status}+closed")
        elif kind == "bad_grpc":
            await self._bad_grpc()
        else:
            await self._bad_http()

    async def _bad_grpc(self) -> None:
        rng = self.rng
        choice = rng.randrange(4)
        if choice == 0:
            request = self._request("x", 4, temperature=0.5, top_k=-5)
        elif choice == 1:
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2**31]))
        elif choice == 2:
            request = self._request("y" * 200_000, 4)
        else:
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
            try:
                async for _ in self.raw(raw + b"\x22\x02\x08\x02", metadata=self.md):
                    pass
                self.tally.count("bad_grpc", "OK")
            except grpc.aio.AioRpcError as exc:
                self.tally.count("bad_grpc", exc.code().name)
            return
        await self._grpc("bad_grpc", request)

    async def _bad_http(self) -> None:
        rng = self.rng
        bodies: list[bytes] = [
            json.dumps({"prompt": "hi", "seed": 2**64, "temperature": 0.7}).encode(),
            json.dumps({"prompt": "hi", "model": "m" * 50_000}).encode(),
            b'{"prompt": "\\ud800"}', b"[" * 50_000 + b"]" * 50_000, b"{not json",
            json.dumps({"messages": []}).encode(),
        ]
        body = rng.choice(bodies)
        path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        async with self.http.post(f"{self.http_url}{path}", data=body,
                                  headers={"Content-Type": "application/json"}) as resp:
            await resp.read()
            self.tally.count("bad_http", str(resp.status))


async def _drive(opts: argparse.Namespace, target: str, http_url: str, tally: Tally,
                 on_sample: Any, log: Progress) -> float:
    end = time.monotonic() + opts.duration
    async with Load(target, http_url, tally, opts.seed) as load:
        async def stream_loop() -> None:
            while time.monotonic() < end:
                try:
                    await load.one()
                except Exception as exc:  # a client-side failure: counted, the soak goes on
                    tally.count("client", type(exc).__name__)

        async def sampler() -> None:
            while time.monotonic() < end:
                on_sample()
                await asyncio.sleep(opts.sample)

        start = time.monotonic()
        tasks = [asyncio.create_task(stream_loop()) for _ in range(opts.streams)]
        watcher = asyncio.create_task(sampler())
        last = start
        while time.monotonic() < end:
            await asyncio.sleep(min(60.0, max(end - time.monotonic(), 0.1)))
            if time.monotonic() - last >= 60:
                last = time.monotonic()
                served = sum(v for (k, c), v in tally.answers.items() if c in ("OK", "200"))
                log(f"{last - start:6.0f} s: {sum(tally.answers.values())} answers, "
                    f"{served} served, {tally.mismatches} mismatches")
        await asyncio.gather(*tasks)
        watcher.cancel()
        on_sample()
        return time.monotonic() - start


def _growth(series: list[tuple[float, float]], warmup_s: float, total_s: float) -> float:
    """RSS over the last 10% of the run vs. just after warm-up (median of each window)."""
    after = [v for t, v in series if warmup_s <= t <= warmup_s + 0.1 * total_s]
    last = [v for t, v in series if t >= 0.9 * total_s]
    if not after or not last:
        return float("nan")
    return statistics.median(last) / statistics.median(after) - 1.0


def _plot(path: str, memory: dict[str, list[tuple[float, float]]], warmup_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, series in sorted(memory.items()):
        ax.plot([t / 60 for t, _ in series], [v for _, v in series], label=name)
    ax.axvline(warmup_s / 60, color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("pdserve soak: resident memory per process")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds of load")
    parser.add_argument("--streams", type=int, default=256, help="clients, each back to back")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before the memory baseline (default 10%% of the run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=50091)
    parser.add_argument("--http-port", type=int, default=8091)
    parser.add_argument("--serve-args", default="--model tiny --max-num-seqs 256",
                        help="more `pdserve serve` options")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write the memory PNG here")
    opts = parser.parse_args(argv)
    log = Progress("soak")
    cmd = [sys.executable, "-m", "pdserve", "serve", "--port", str(opts.port), "--http-port",
           str(opts.http_port), "--api-key", KEY, "--device", "cpu",
           *opts.serve_args.split()]
    log("starting: " + " ".join(cmd[2:]))
    server = start_server(cmd, log)
    target, http_url = f"127.0.0.1:{opts.port}", f"http://127.0.0.1:{opts.http_port}"
    tally = Tally()
    memory: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    pids: dict[str, set[int]] = collections.defaultdict(set)
    t0 = time.monotonic()

    def sample() -> None:
        now = time.monotonic() - t0
        procs = {"router": server.pid, **_workers(server.pid)}
        for name, pid in procs.items():
            rss = _rss_mb(pid)
            if rss is not None:
                memory[name].append((now, rss))
                pids[name].add(pid)

    try:
        elapsed = asyncio.run(_drive(opts, target, http_url, tally, sample, log))
        held = asyncio.run(_held_blocks(target))
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()
    warmup = opts.warmup if opts.warmup is not None else 0.1 * elapsed
    by_code: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (kind, code), n in sorted(tally.answers.items()):
        by_code[kind][code] = n
    result = {
        "command": "python -m pdserve.bench.soak " + " ".join(sys.argv[1:] if argv is None
                                                              else argv),
        "duration_s": round(elapsed, 1), "streams": opts.streams,
        "requests": sum(tally.answers.values()),
        "served": sum(v for (k, c), v in tally.answers.items() if c in ("OK", "200")),
        "tokens": tally.tokens, "answers": by_code, "mismatches": tally.mismatches,
        "greedy_references": len(tally.reference),
        "worker_restarts": sum(len(v) - 1 for k, v in pids.items()
                               if k.startswith(("prefill", "decode"))),
        "blocks_held_at_end": held,
        "rss_mb": {name: {"after_warmup": _window(series, warmup, 0.1 * elapsed),
                          "end": _window(series, 0.9 * elapsed, elapsed),
                          "max": max(v for _, v in series),
                          "growth": round(_growth(series, warmup, elapsed), 4)}
                   for name, series in sorted(memory.items())},
        "memory_series": {k: [(round(t, 1), round(v, 1)) for t, v in s]
                          for k, s in memory.items()},
    }
    flat = all(v["growth"] < 0.05 for v in result["rss_mb"].values())
    result["memory_flat"] = flat
    print(json.dumps({k: v for k, v in result.items() if k != "memory_series"}, indent=2))
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(result, indent=1))
    if opts.plot:
        Path(opts.plot).parent.mkdir(parents=True, exist_ok=True)
        _plot(opts.plot, memory, warmup)
    return 0 if flat and not tally.mismatches else 1


def _window(series: list[tuple[float, float]], start: float, length: float) -> float:
    values = [v for t, v in series if start <= t <= start + length] or [series[-1][1]]
    return round(statistics.median(values), 1)


async def _held_blocks(target: str) -> dict[str, int]:
    """Each worker's referenced KV blocks once the load has stopped (after a short wait)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for _ in range(50):
            stats = await stub.GetStats(pb.GetStatsRequest(),
                                        metadata=[("authorization", f"Bearer {KEY}")])
            held = {w.worker_id: w.kv_blocks_used for w in stats.workers}
            if not any(held.values()):
                break
            await asyncio.sleep(0.2)
        return held


if __name__ == "__main__":
    sys.exit(main())
