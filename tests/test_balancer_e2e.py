"""The prefix-aware balancer in the real service: 3 prefill workers, KV events from their
block pools feeding the router's index, choices read back from the workers' own counters."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

from pdserve_client import Client
from tests.service import ServiceThread


def prefill_stats(svc: ServiceThread) -> dict[str, dict]:
    return {w: s for w, s in svc.worker_stats().items() if w.startswith("prefill")}


def test_shared_prefix_follows_its_holder_and_distinct_prompts_spread() -> None:
    svc = ServiceThread("tiny", 3, 1)
    try:
        rng = random.Random(7)
        prefix = [rng.randrange(3, 500) for _ in range(480)]  # 30 full blocks of 16
        with Client(svc.target) as client:
            client.generate(prefix + [7, 8, 9], max_tokens=2, temperature=0)
            time.sleep(1.0)  # the holder's BlockStored events reach the router's index
            before = prefill_stats(svc)
            holder = max(before, key=lambda w: before[w]["prefill_tokens_computed"])
            for i in range(6):
                suffix = [rng.randrange(3, 500) for _ in range(5 + i)]
                client.generate(prefix + suffix, max_tokens=2, temperature=0)
        after = prefill_stats(svc)
        hits = {w: after[w]["prefix_hit_tokens"] - before[w]["prefix_hit_tokens"] for w in after}
        assert hits[holder] == 6 * 480  # every follower reused the whole cached prefix there
        assert all(hits[w] == 0 for w in hits if w != holder)
        computed = {w: after[w]["prefill_tokens_computed"] - before[w]["prefill_tokens_computed"]
                    for w in after}
        assert all(computed[w] == 0 for w in computed if w != holder)

        prompts = [[rng.randrange(3, 500) for _ in range(200)] for _ in range(30)]

        def one(prompt: list[int]) -> int:
            with Client(svc.target) as c:
                return len(c.generate(prompt, max_tokens=2, temperature=0).token_ids)

        with ThreadPoolExecutor(30) as pool:
            assert list(pool.map(one, prompts)) == [2] * 30
        flood = prefill_stats(svc)
        spread = {w: flood[w]["prefill_tokens_computed"] - after[w]["prefill_tokens_computed"]
                  for w in flood}
        assert len(spread) == 3 and all(v >= 200 for v in spread.values()), spread
        assert sum(spread.values()) == 30 * 200
    finally:
        svc.stop()
