"""Who replaces dead workers when the directory is gone: the router that created a pool on
a Ray of its own keeps replacing them (another cluster publishing itself in the same Ray
replaces the directory; the pool is still this router's)."""

from __future__ import annotations

import time

import ray

from pdserve.router.cluster import NAMESPACE
from pdserve.router.directory import DIRECTORY_NAME
from pdserve_client import Client
from tests.service import ServiceThread


def test_the_creator_replaces_dead_workers_after_its_directory_is_gone() -> None:
    svc = ServiceThread("tiny", 1, 1)
    try:
        router = svc.router
        assert router is not None
        with Client(svc.target) as c:
            before = list(c.generate([5, 6, 7, 8], max_tokens=6, temperature=0.0,
                                     ignore_eos=True).token_ids)
        ray.kill(ray.get_actor(DIRECTORY_NAME, namespace=NAMESPACE), no_restart=True)
        time.sleep(1.0)  # the heartbeats (every 0.2 s here) see it gone
        (decode,) = router.cluster.pool("decode")
        ray.kill(decode.actor, no_restart=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pool = router.cluster.pool("decode")
            if pool and pool[0] is not decode:
                break
            time.sleep(0.1)
        assert router.cluster.supervising
        (fresh,) = router.cluster.pool("decode")
        assert fresh is not decode and fresh.generation == decode.generation + 1
        with Client(svc.target) as c:
            after = list(c.generate([5, 6, 7, 8], max_tokens=6, temperature=0.0,
                                    ignore_eos=True).token_ids)
        assert after == before
    finally:
        svc.stop()
