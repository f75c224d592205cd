"""First token by pulling a cached prefix from a busy worker vs by recomputing it.

    python -m pdserve.bench.pool_pull [--model tiny] [--prefix-len 1536] [--reps 5]

Starts the service in this process (2 prefill + 1 decode workers, CPU, ``--balancer
kv_pool``). Each repetition makes one prefill worker busy with a long prompt that starts
with a fresh prefix (``--prefix-len`` tokens, then ``--tail-len`` more), waits until the
router's index has that prefix confirmed on it, and sends a request made of the prefix and a
short suffix to the other, idle worker, which either pulls the prefix from the busy one
("pull": the ``kv_pool`` balancer's own choice) or computes it all ("recompute": that
repetition is routed by the ``least_loaded`` policy, which picks the idle worker and pulls
nothing). The two modes alternate, so the machine's noise
falls on both. A repetition counts only if the request went to the idle worker and did what
its mode says (read from the workers' counters). Printed: medians of the worker's prefill
time (arrival on the worker to its first token, the pull's wait included) and of the
router's time to first token, per mode, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from pdserve.bench.event_lag import _start
from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.hashing import hash_blocks
from pdserve.router.balancer import make_balancer
from pdserve.router.pool_config import PoolConfig
from pdserve.router.server import Router, RouterConfig

BS = 16


def _call(loop: Any, fn: Any) -> Any:
    import asyncio

    return asyncio.run_coroutine_threadsafe(fn(), loop).result(60)


def _stats(router: Router, loop: Any) -> dict[str, dict[str, Any]]:
    async def fetch() -> dict[str, dict[str, Any]]:
        return {h.worker_id: await h.actor.stats.remote()
                for h in router.cluster.workers.values() if h.alive}

    return _call(loop, fetch)


def _rep(router: Router, loop: Any, client: Any, rng: random.Random, pull: bool,
         prefix_len: int, tail_len: int) -> dict[str, Any] | None:
    vocab = router.model_config.vocab_size
    prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]
    long_prompt = prefix + [rng.randrange(3, vocab) for _ in range(tail_len)]
    prompt = prefix + [rng.randrange(3, vocab) for _ in range(9)]
    flow = router.flow
    assert flow is not None
    pool_balancer = flow.balancer
    if not pull:
        # Recompute where the pull would go: the least loaded worker, not the busy holder.
        flow.balancer = make_balancer("least_loaded", router.index)
    before = _stats(router, loop)
    try:
        busy = threading.Thread(target=lambda: client.generate(
            long_prompt, max_tokens=1, temperature=0), daemon=True)
        busy.start()
        hashes = hash_blocks(prefix, BS)

        async def holders() -> list[str]:
            idx = router.index
            return [w for w in idx.workers()
                    if idx.match(w, hashes, confirmed_only=True) == len(hashes)]

        while not (held := _call(loop, holders)):
            if not busy.is_alive():
                return None
            time.sleep(0.002)
        out = client.generate(prompt, max_tokens=4, temperature=0)
        busy.join(120)
    finally:
        flow.balancer = pool_balancer
    after = _stats(router, loop)
    holder = held[0]
    other = next(w for w in after if w.startswith("prefill") and w != holder)

    def delta(w: str, key: str) -> int:
        return int(after[w].get(key, 0) - before[w].get(key, 0))

    computed = delta(other, "prefill_tokens_computed")
    ok = (delta(other, "pool_pulled_tokens") == prefix_len and computed == 9) if pull else (
        computed == len(prompt))
    if not ok:
        return None
    return {"mode": "pull" if pull else "recompute", "prefill_s": out.timing.prefill_s,
            "first_token_s": out.timing.first_token_s}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prefix-len", type=int, default=1536)
    ap.add_argument("--tail-len", type=int, default=2400)
    ap.add_argument("--reps", type=int, default=5, help="repetitions per mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    from pdserve_client import Client

    engine = EngineConfig(model=args.model, dtype="float32", device="cpu",
                          cache=CacheConfig(block_size=BS, num_blocks=2048),
                          scheduler=SchedulerConfig(max_num_batched_tokens=256))
    config = RouterConfig(pools=PoolConfig(engine=engine, num_prefill=2, num_decode=1),
                          port=0, log_requests=False, balancer="kv_pool")
    router, port, loop, stop = _start(config)
    rng = random.Random(args.seed)
    rows: list[dict[str, Any]] = []
    skipped = 0
    with Client(f"127.0.0.1:{port}") as client:
        for i in range(2 * args.reps):
            row = _rep(router, loop, client, rng, i % 2 == 0, args.prefix_len, args.tail_len)
            if row is None:
                skipped += 1
            else:
                rows.append(row)
    result: dict[str, Any] = {"model": args.model, "prefix_len": args.prefix_len,
                              "skipped": skipped, "rows": rows}
    print(f"model {args.model}, prefix {args.prefix_len} tokens + 9, holder busy with "
          f"{args.prefix_len + args.tail_len} tokens; {skipped} repetitions skipped")
    print("| mode | reps | median worker prefill ms | median router TTFT ms |")
    print("|---|---|---|---|")
    medians = {}
    for mode in ("pull", "recompute"):
        mine = [r for r in rows if r["mode"] == mode]
        if not mine:
            continue
        p = statistics.median(r["prefill_s"] for r in mine)
        t = statistics.median(r["first_token_s"] for r in mine)
        medians[mode] = (p, t)
        print(f"| {mode} | {len(mine)} | {p * 1e3:.1f} | {t * 1e3:.1f} |")
    if len(medians) == 2:
        ratio = medians["recompute"][1] / medians["pull"][1]
        result["ttft_ratio_recompute_over_pull"] = ratio
        print(f"recompute / pull (router TTFT medians): {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    loop.call_soon_threadsafe(stop.set)
    time.sleep(3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
