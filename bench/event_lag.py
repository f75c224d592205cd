"""How far the routers' view of the workers' KV caches lags the engines (pushed KV events).

    python -m pdserve.bench.event_lag [--requests 200] [--concurrency 8] [--routers 2]

Starts the service with the "tiny" model (1 prefill + 1 decode worker, CPU) and, with
``--routers 2``, a second router attached to the same workers (as ``pdserve router`` does),
both in this process; a child process sends ``--requests`` greedy requests (random prompts
of ``--prompt-len`` tokens, ``--output-len`` tokens) at ``--concurrency`` streams, spread
over the routers. Every event message a worker publishes carries the wall-clock time its
events were taken from the engine (right after the engine step that made them); each router
records, for every message with events, the time from that stamp to the events being
applied to its prefix index. Printed: messages, percentiles of that lag per router, gaps
and resyncs. On one machine the clocks are the same clock, so the figure is the lag itself.

``--probe`` adds a reference row: a bare subscriber in a process of its own (no router, no
event loop: a blocking ``recv``, then the same opening and decoding) connected to the same
workers. What it sees is the floor set by the workers and the machine (the worker's ZMQ
thread, the kernel, the scheduler on a loaded host); the routers' rows above it are what the
routers add.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.router.app import serve
from pdserve.router.events import endpoint_of
from pdserve.router.pool_config import PoolConfig
from pdserve.router.server import Router, RouterConfig


def _start(config: RouterConfig) -> tuple[Router, int, asyncio.AbstractEventLoop, asyncio.Event]:
    """``serve`` on a thread of its own; (router, port, its loop, its stop event)."""
    loop = asyncio.new_event_loop()
    out: dict[str, Any] = {}
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def main() -> None:
            out["stop"] = asyncio.Event()

            def on_ready(router: Router, port: int) -> None:
                out["router"], out["port"] = router, port
                ready.set()

            await serve(config, stop=out["stop"], on_ready=on_ready)

        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # reported by the waiter
            out["error"] = exc
            ready.set()

    threading.Thread(target=run, daemon=True).start()
    if not ready.wait(300) or "error" in out:
        raise RuntimeError(f"the service did not start: {out.get('error')!r}")
    return out["router"], out["port"], loop, out["stop"]


def _load(targets: list[str], requests: int, concurrency: int, prompt_len: int,
          output_len: int, seed: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from pdserve_client import Client

    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 500) for _ in range(prompt_len)] for _ in range(requests)]
    clients = [Client(t) for t in targets]

    def one(i: int) -> None:
        clients[i % len(clients)].generate(prompts[i], max_tokens=output_len, temperature=0.0,
                                           ignore_eos=True)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))


def _probe(endpoints: list[str], key: Any, out: Any) -> None:
    """The ``--probe`` subscriber (its own process): lags of messages with events until
    none came for 1.5 s after the first, put on ``out``."""
    import zmq

    from pdserve.worker.events import EVENT_CHANNEL, decode_message

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    for endpoint in endpoints:
        sock.connect(endpoint)
    opener = key.opener(EVENT_CHANNEL, max_senders=65536)
    lags: list[float] = []
    last = time.monotonic()
    while sock.poll(5000):
        try:
            msg = decode_message(opener.open(sock.recv()))
        except ValueError:
            continue
        if msg.events:
            lags.append(time.time() - msg.stamp)
            last = time.monotonic()
        elif lags and time.monotonic() - last > 1.5:
            break
    out.put(lags)
    sock.close(linger=0)


def percentiles(values: Sequence[float]) -> dict[str, float]:
    data = sorted(values)
    if not data:
        return {}
    pick = lambda q: data[min(len(data) - 1, int(q * len(data)))]  # noqa: E731
    return {"p50_ms": pick(0.5) * 1e3, "p90_ms": pick(0.9) * 1e3, "p99_ms": pick(0.99) * 1e3,
            "max_ms": data[-1] * 1e3, "n": float(len(data))}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--output-len", type=int, default=8)
    ap.add_argument("--routers", type=int, default=2, choices=[1, 2])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the figures here ('-': stdout)")
    ap.add_argument("--probe", action="store_true",
                    help="also measure a bare subscriber in its own process (the floor)")
    args = ap.parse_args(argv)
    engine = EngineConfig(model="tiny", dtype="float32", device="cpu",
                          cache=CacheConfig(block_size=16, num_blocks=512),
                          scheduler=SchedulerConfig(max_num_batched_tokens=256))
    config = RouterConfig(pools=PoolConfig(engine=engine), port=0, log_requests=False)
    started = [_start(config)]
    if args.routers == 2:
        started.append(_start(replace(config, pools=replace(config.pools, attach=True))))
    routers = [s[0] for s in started]
    for r in routers:
        r.events.lag.clear()
    probe_out = None
    if args.probe:
        ctx = mp.get_context("spawn")
        probe_out = ctx.Queue()
        endpoints = [e for e in (endpoint_of(h.info) for h in routers[0].cluster.workers.values())
                     if e]
        ctx.Process(target=_probe, args=(endpoints, routers[0].cluster.channel_key, probe_out),
                    daemon=True).start()
        time.sleep(2)  # its subscriptions take effect
    t0 = time.monotonic()
    child = mp.get_context("spawn").Process(target=_load, args=(
        [f"127.0.0.1:{s[1]}" for s in started], args.requests, args.concurrency,
        args.prompt_len, args.output_len, args.seed))
    child.start()
    child.join()
    wall = time.monotonic() - t0
    result: dict[str, Any] = {"requests": args.requests, "wall_s": wall, "routers": []}
    for i, r in enumerate(routers):
        ev = r.events
        result["routers"].append({"router": i, "messages": ev.messages, "gaps": ev.gaps,
                                  "resyncs": ev.resyncs, "refused": ev.refused,
                                  **percentiles(list(ev.lag))})
    print(f"{args.requests} requests in {wall:.1f} s; lag from a worker taking its KV events "
          "from its engine to a router applying them:")
    print("| router | messages | p50 ms | p90 ms | p99 ms | max ms | gaps | resyncs |")
    print("|---|---|---|---|---|---|---|---|")
    for row in result["routers"]:
        print(f"| {row['router']} | {row['messages']} | {row.get('p50_ms', 0):.2f} | "
              f"{row.get('p90_ms', 0):.2f} | {row.get('p99_ms', 0):.2f} | "
              f"{row.get('max_ms', 0):.2f} | {row['gaps']} | {row['resyncs']} |")
    if probe_out is not None:
        probe = percentiles(probe_out.get(timeout=60))
        result["probe"] = probe
        print(f"| probe (own process) | {int(probe.get('n', 0))} | {probe.get('p50_ms', 0):.2f} | "
              f"{probe.get('p90_ms', 0):.2f} | {probe.get('p99_ms', 0):.2f} | "
              f"{probe.get('max_ms', 0):.2f} | - | - |")
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    for s in reversed(started):
        s[2].call_soon_threadsafe(s[3].set)
    time.sleep(3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
