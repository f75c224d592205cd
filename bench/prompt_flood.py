"""Does text work on huge prompts delay other requests' tokens?

Starts ``pdserve serve`` (tiny model, ``--max-prompt-bytes 2000000``) in its own process,
then, for ``--rounds`` rounds, measures one greedy stream sharing its decode steps with
``--background`` streams, three ways, side by side:

- ``alone``: nothing else;
- ``tokenized``: while 1 MB prompts arrive back to back over HTTPS-less HTTP (they pass the
  byte bound, are tokenized in the router's tokenizer process, and are refused as too many
  tokens);
- ``refused by size``: while 3 MB prompts arrive (over the bound: refused before any
  tokenizing).

Reports each stream's median and largest inter-token gap and their ratio (the acceptance
bound is a largest gap under 10x the median), medians over the rounds, and the machine's
CPU pressure (``/proc/pressure/cpu``, the share of time runnable tasks waited for a CPU).

    python -m pdserve.bench.prompt_flood --rounds 5 --json bench/results/prompt_flood.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from pdserve.bench.common import Progress, markdown_table, start_server
from pdserve.protos.pdserve.v1 import generation_pb2 as pb
from pdserve.protos.pdserve.v1 import generation_pb2_grpc as pb_grpc

KEY = "flood-key"
FLOOD = """
import http.client, json, sys, time
size = int(sys.argv[2])
body = json.dumps({"prompt": ("the quick brown fox jumps over the lazy dog. " * (size // 40 + 1))
                   [:size], "max_tokens": 2}).encode()
end = time.time() + float(sys.argv[3])
while time.time() < end:
    conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=120)
    conn.request("POST", "/v1/completions", body=body,
                 headers={"Authorization": "Bearer " + sys.argv[4]})
    print(conn.getresponse().status, flush=True)
"""


def cpu_pressure() -> float | None:
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


async def stream_gaps(target: str, background: int, tokens: int) -> list[float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        md = [("authorization", f"Bearer {KEY}")]

        def request(text: str, n: int) -> pb.GenerateRequest:
            return pb.GenerateRequest(text=text, sampling=pb.SamplingParams(
                max_tokens=n, temperature=0.0, ignore_eos=True))

        async def other() -> None:
            async for _ in stub.Generate(request("in the background", tokens + 50), metadata=md):
                pass

        tasks = [asyncio.create_task(other()) for _ in range(background)]
        await asyncio.sleep(0.5)
        gaps: list[float] = []
        last = None
        async for reply in stub.Generate(request("Once upon a time", tokens), metadata=md):
            now = time.perf_counter()
            if last is not None and reply.token_ids:
                gaps.append(now - last)
            last = now
        for task in tasks:
            task.cancel()
        return gaps


def measure(opts: argparse.Namespace, target: str, http_port: int,
            flood_bytes: int | None) -> dict[str, Any]:
    flood = None
    if flood_bytes is not None:
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(http_port), str(flood_bytes),
                                  "600", KEY], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
    pressure = cpu_pressure()
    try:
        gaps = asyncio.run(stream_gaps(target, opts.background, opts.tokens))
    finally:
        codes: list[str] = []
        if flood is not None:
            flood.terminate()
            codes = flood.communicate()[0].split()
    median, worst = statistics.median(gaps), max(gaps)
    return {"median_ms": 1e3 * median, "max_ms": 1e3 * worst, "ratio": worst / median,
            "flood_answers": len(codes), "flood_codes": sorted(set(codes)),
            "cpu_pressure_pct": pressure}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--background", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--port", type=int, default=50093)
    parser.add_argument("--http-port", type=int, default=8093)
    parser.add_argument("--json")
    opts = parser.parse_args(argv)
    log = Progress("prompt_flood")
    cmd = [sys.executable, "-m", "pdserve", "serve", "--model", "tiny", "--device", "cpu",
           "--port", str(opts.port), "--http-port", str(opts.http_port), "--api-key", KEY,
           "--max-prompt-bytes", "2000000"]
    server = start_server(cmd, log)
    target = f"127.0.0.1:{opts.port}"
    cases = {"alone": None, "tokenized (1 MB)": 1_000_000, "refused by size (3 MB)": 3_000_000}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
    try:
        measure(opts, target, opts.http_port, 1_000_000)  # starts the tokenizer process
        for r in range(opts.rounds):
            for name, size in cases.items():
                rows[name].append(measure(opts, target, opts.http_port, size))
                log(f"round {r + 1} {name}: {rows[name][-1]}")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(120)
    table = [[name, f"{statistics.median(x['median_ms'] for x in rs):.1f}",
              f"{statistics.median(x['max_ms'] for x in rs):.0f}",
              f"{statistics.median(x['ratio'] for x in rs):.1f}",
              f"{sum(x['ratio'] < 10 for x in rs)} of {len(rs)}",
              f"{statistics.median(x['flood_answers'] for x in rs):.0f}",
              f"{statistics.median(x['cpu_pressure_pct'] or 0 for x in rs):.0f}%"]
             for name, rs in rows.items()]
    print(markdown_table(["while", "median gap ms", "largest gap ms", "largest / median",
                          "rounds under 10x", "flood answers", "CPU pressure"], table))
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps({"command": " ".join(sys.argv), "rounds": rows},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
