"""Several routers on one cluster (real Ray, NIXL, gRPC, ZMQ on 127.0.0.1).

A serves the pools it created (1 prefill + 2 decode workers); B attaches to them in this
process (as `pdserve router` does), after A served traffic, so B's first pushed event
messages are a gap it repairs from a snapshot; C is a real `pdserve router` process that
is killed with SIGKILL mid-stream. The model is "small": its decode steps (tens of ms on one
core) keep C's long request running well past the lease, so that the decode worker, not the
request's own end, is what frees its blocks (the "tiny" model finishes 3,000 tokens in ~2 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
import ray

from pdserve.engine.llm import LLM
from pdserve.engine.ports import free_port
from pdserve.engine.sampling import SamplingParams
from pdserve.router.balancer import WorkerLoad
from pdserve.router.validation import SamplingArgs
from pdserve.worker.protocol import ReserveRequest, SamplingSpec
from pdserve_client import Client, Unavailable
from tests.service import ServiceThread

MODEL = "small"
LEASE_S = 4.0
NUM_BLOCKS = 256
PROMPTS = ["The quick brown fox", "Several routers serve one cluster of workers",
           "A prefix shared by many requests: " * 6]


@pytest.fixture(scope="module")
def routers():
    a = ServiceThread(MODEL, 1, 2, lease_s=LEASE_S, num_blocks=NUM_BLOCKS)
    with Client(a.target) as c:  # traffic before B joins: B's first messages are a gap
        for p in PROMPTS:
            c.generate(p, max_tokens=4, temperature=0.0)
    b = ServiceThread(MODEL, 1, 2, lease_s=LEASE_S, num_blocks=NUM_BLOCKS,
                      pools=replace(a.config.pools, attach=True))
    yield a, b
    b.stop()
    a.stop()


@pytest.fixture(scope="module")
def ref_llm() -> LLM:
    return LLM(model=MODEL, dtype="float32", device="cpu")


def reference(llm: LLM, prompt: str, n: int) -> list[int]:
    return llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0,
                                                 ignore_eos=True))[0].token_ids


def test_two_routers_serve_exact_tokens_with_their_own_pushed_views(routers, ref_llm) -> None:
    a, b = routers
    with Client(a.target) as ca, Client(b.target) as cb:
        for p in PROMPTS:
            ref = reference(ref_llm, p, 12)
            assert list(ca.generate(p, max_tokens=12, temperature=0.0,
                                    ignore_eos=True).token_ids) == ref
            assert list(cb.generate(p, max_tokens=12, temperature=0.0,
                                    ignore_eos=True).token_ids) == ref
    assert b.router.cluster.config.attach and b.router.cluster.instance != a.router.cluster.instance
    # Each router holds its own index, fed by pushes only; both equal the worker's cache.
    handle = a.router.cluster.workers["prefill-0"]
    deadline = time.monotonic() + 5
    while True:
        _, _, hashes, _ = ray.get(handle.actor.kv_snapshot.remote())
        views = [r.router.index.stored_hashes("prefill-0") for r in (a, b)]
        if all(v == frozenset(hashes) for v in views) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert hashes and views == [frozenset(hashes)] * 2
    # B joined late: it saw a gap and resynced from a snapshot.
    assert b.router.events.gaps >= 1 and b.router.events.resyncs >= 1
    for r in (a, b):
        assert r.router.events.refused == 0
        lags = sorted(r.router.events.lag)
        assert lags and lags[len(lags) // 2] < 0.05, lags[-10:]


def test_the_decode_worker_refuses_a_double_booking(routers, ref_llm) -> None:
    """The decode worker is the authority: a reservation it cannot hold is refused (B's view
    said there was room), and B retries on the other decode worker at once."""
    a, b = routers
    d0 = a.router.cluster.workers["decode-0"].actor
    spec = SamplingSpec(max_tokens=1, temperature=0.0)
    hog = ReserveRequest("hog", [7] * ((NUM_BLOCKS - 4) * 16), spec, "tcp://127.0.0.1:9",
                         LEASE_S)
    assert ray.get(d0.reserve.remote(hog)) is not None
    with pytest.raises(ray.exceptions.RayTaskError, match="already in use"):
        ray.get(d0.reserve.remote(hog))  # the same id twice: never two bookings
    assert ray.get(d0.reserve.remote(replace(hog, request_id="hog2"))) is None  # no room
    prompt = PROMPTS[2]
    router = b.router

    async def admit_on_a_stale_view() -> tuple[list[int], str]:
        prepared = await router.prepare(MODEL, prompt, SamplingArgs(
            max_tokens=12, temperature=0.0, ignore_eos=True))
        view = router.flow.loads.decode_view
        # What B would believe before d0's push arrives: d0 all free, d1 half full.
        view.set_one(WorkerLoad("decode-0", free_blocks=NUM_BLOCKS, total_blocks=NUM_BLOCKS,
                                max_running_seqs=128))
        view.set_one(WorkerLoad("decode-1", free_blocks=NUM_BLOCKS // 2, total_blocks=NUM_BLOCKS,
                                max_running_seqs=128))
        tokens: list[int] = []
        worker = ""
        async for delta in router.run("double", prepared, time.monotonic()):
            tokens += delta.token_ids
            worker = delta.decode_worker or worker
        return tokens, worker

    refused = router.flow.refused_reservations
    try:
        tokens, worker = b.call(admit_on_a_stale_view)
    finally:
        ray.get(d0.abort.remote("hog", True))
    assert router.flow.refused_reservations == refused + 1
    assert worker == "decode-1"
    assert tokens == reference(ref_llm, prompt, 12)
    stats = a.wait_idle()
    assert all(s["num_used_blocks"] == 0 for s in stats.values())


def test_killing_a_router(routers, ref_llm) -> None:
    """A `pdserve router` process killed mid-stream: its stream fails UNAVAILABLE, the other
    routers keep serving, and what it held on the workers is freed within the lease."""
    a, b = routers
    port = free_port()
    gcs = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve.cli", "router", "--ray-address", gcs, "--port",
         str(port), "--http-port", "0", "--disable-log-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("pdserve: serving"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(120), "".join(lines[-30:])
        got: list[int] = []
        with Client(f"127.0.0.1:{port}", retries=0) as c:
            with pytest.raises(Unavailable):
                for chunk in c.stream(PROMPTS[0], max_tokens=3000, temperature=0.0,
                                      ignore_eos=True):
                    if not got:
                        os.kill(proc.pid, signal.SIGKILL)
                    got += chunk.token_ids
        assert got and len(got) < 3000
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    with Client(a.target) as ca, Client(b.target) as cb:  # the others keep serving
        for c in (ca, cb):
            assert list(c.generate(PROMPTS[1], max_tokens=8, temperature=0.0,
                                   ignore_eos=True).token_ids) == reference(ref_llm,
                                                                            PROMPTS[1], 8)
    stats = a.wait_idle(timeout=LEASE_S + 10)  # the dead router's request: ended by its lease
    assert all(s["num_used_blocks"] == 0 for s in stats.values()), stats
    assert sum(s.get("orphans_ended", 0) for s in stats.values()) >= 1
