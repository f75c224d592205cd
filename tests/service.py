"""A real pdserve service (Ray actors, NIXL, gRPC on 127.0.0.1) run inside a test process.

The router's event loop runs on a background thread so that tests can drive it with the
blocking SDK and still reach the router's objects (to kill a worker, read its stats).
"""

from __future__ import annotations

import asyncio
import atexit
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray

from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.router.app import serve
from pdserve.router.flow import FlowConfig
from pdserve.router.pool_config import PoolConfig
from pdserve.router.server import Router, RouterConfig


class ServiceThread:
    """Starts ``serve`` on a thread; ``stop()`` drains it and removes its actors."""

    def __init__(self, model: str = "tiny", prefill: int = 1, decode: int = 1, *,
                 api_key: str | None = None, lease_s: float = 30.0,
                 max_num_batched_tokens: int = 256, num_blocks: int | None = 512,
                 scheduling_policy: str = "fcfs", priority_yield_s: float | None = None,
                 admission_timeout_s: float = 30.0, max_waiting: int = 256,
                 http: bool = False, served_model_names: tuple[str, ...] = (),
                 kv_transport: str = "nixl", ping_interval_s: float = 0.2,
                 prefill_tp: int | tuple[int, ...] = 1,
                 decode_tp: int | tuple[int, ...] = 1, pin_cpus: bool | None = None,
                 **router_options: Any) -> None:
        if not ray.is_initialized():
            # address="local": this process's own Ray, whatever else runs on the machine.
            ray.init(address="local", num_cpus=16, namespace="pdserve", include_dashboard=False,
                     log_to_driver=False,
                     runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        engine = EngineConfig(
            model=model, dtype="float32", device="cpu",
            cache=CacheConfig(block_size=16, num_blocks=num_blocks),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                                      policy=scheduling_policy,
                                      priority_yield_s=priority_yield_s),
        )
        self.config = RouterConfig(
            pools=PoolConfig(engine=engine, num_prefill=prefill, num_decode=decode,
                             lease_s=lease_s, ping_interval_s=ping_interval_s,
                             kv_transport=kv_transport, prefill_tp=prefill_tp,
                             decode_tp=decode_tp, pin_cpus=pin_cpus),
            port=0, api_key=api_key, http_port=0 if http else None,
            served_model_names=served_model_names,
            flow=FlowConfig(lease_s=lease_s, admission_timeout_s=admission_timeout_s,
                            max_waiting=max_waiting, scheduling_policy=scheduling_policy),
        )
        self.config = replace(self.config, **router_options)  # e.g. tls_cert, metrics_port
        self.router: Router | None = None
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._force: asyncio.Event | None = None
        self.stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(180) or self._error is not None:
            raise RuntimeError(f"service did not start: {self._error!r}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """Base URL of the OpenAI-compatible front (``http=True``), e.g. for ``/v1``."""
        assert self.router is not None and self.router.http_port is not None
        return f"{self.scheme}://127.0.0.1:{self.router.http_port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        def ready(router: Router, port: int) -> None:
            self.router, self.port = router, port
            self._ready.set()

        async def main() -> None:
            self._stop, self._force = asyncio.Event(), asyncio.Event()
            await serve(self.config, stop=self._stop, on_ready=ready, force=self._force)

        try:
            self._loop.run_until_complete(main())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
        finally:
            self.stopped.set()

    def call(self, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Run a coroutine function on the router's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(timeout)

    def worker_stats(self) -> dict[str, dict[str, Any]]:
        assert self.router is not None
        workers = list(self.router.cluster.workers.values())

        async def fetch() -> dict[str, dict[str, Any]]:
            return {h.worker_id: await h.actor.stats.remote() for h in workers if h.alive}

        return self.call(fetch)

    def wait_idle(self, timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        """Wait until every worker holds no referenced block; return their stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.worker_stats()
            busy = {w: s["num_used_blocks"] for w, s in stats.items() if s["num_used_blocks"]}
            if not busy or time.monotonic() > deadline:
                return stats
            time.sleep(0.1)

    @property
    def scheme(self) -> str:
        return "https" if self.config.tls_cert else "http"

    def begin_stop(self, force: bool = False) -> None:
        """Set the drain going (as a first Ctrl-C does), or cut it short (a second one)."""
        event = self._force if force else self._stop
        if event is not None:
            self._loop.call_soon_threadsafe(event.set)

    def stop(self) -> None:
        self.begin_stop()
        self._thread.join(90)


_SHARED: dict[tuple[object, ...], ServiceThread] = {}
SHARED_API_KEY = "shared-test-key"


def shared_service(model: str = "tiny", *, api_key: str | None = SHARED_API_KEY,
                   http: bool = True) -> ServiceThread:
    """One service per test process for these settings, stopped at exit: starting one costs
    tens of seconds on a 2-core machine, so the HTTP, metrics and bench tests share it (each
    test measures what it needs as before/after differences). It answers to ``model`` and
    to the alias ``<model>-alias`` (``--served-model-name``)."""
    key = (model, api_key, http)
    service = _SHARED.get(key)
    if service is None:
        service = _SHARED[key] = ServiceThread(model, 1, 1, api_key=api_key, http=http,
                                               served_model_names=(model, f"{model}-alias"))
        atexit.register(service.stop)
    return service


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (openssl CLI): (cert, key)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30)
    return cert, key


HARDENED_API_KEY = "hardened-test-key"


def hardened_service() -> ServiceThread:
    """One service per test process as a public endpoint runs it: TLS on both ports, an API
    key, /metrics on its own port, a 2 s liveness ping (so that what is seen faster than
    that is seen by other means). ``.cert`` is its certificate's path."""
    key = ("hardened",)
    service = _SHARED.get(key)
    if service is None:
        folder = Path(tempfile.mkdtemp(prefix="pdserve-tls-"))
        cert, tls_key = self_signed_cert(folder)
        service = _SHARED[key] = ServiceThread(
            "tiny", 1, 1, api_key=HARDENED_API_KEY, http=True, ping_interval_s=2.0,
            tls_cert=cert.read_bytes(), tls_key=tls_key.read_bytes(), metrics_port=0)
        service.cert = cert  # type: ignore[attr-defined]
        atexit.register(service.stop)
    return service
