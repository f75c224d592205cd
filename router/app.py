"""One router process: the ``Router``, its gRPC server (with the standard health service and
reflection) and, when configured, the OpenAI-compatible HTTP front, started and drained
together. ``serve`` is what ``pdserve serve`` runs.

Lifecycle: the gRPC port is bound before any worker starts (a port in use fails at once);
``stop`` set during start-up cancels it and removes what was created. Once serving, the
health service says SERVING only while both pools have a live worker (NOT_SERVING
otherwise, and from the moment the drain begins). ``stop`` drains: no new requests, those in
flight get up to ``config.drain_timeout_s`` to finish on both fronts; ``force`` set during
the drain (a second Ctrl-C) cuts it short and kills the workers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.protos.pdserve.v1 import generation_pb2 as pb
from pdserve.router.grpc_service import add_generation_service
from pdserve.router.http import HttpFront
from pdserve.router.server import Router, RouterConfig

HEALTH_INTERVAL_S = 0.25


async def serve(config: RouterConfig, stop: asyncio.Event | None = None,
                on_ready: Callable[[Router, int], None] | None = None, *,
                force: asyncio.Event | None = None,
                on_connected: Callable[[], None] | None = None) -> None:
    """Start the pools, the gRPC server and (``config.http_port`` not None) the HTTP front;
    run until ``stop`` is set, then drain (cut short when ``force`` is set).
    ``on_ready(router, port)`` is called once both accept requests (``router.http_port`` is
    the HTTP front's port); ``on_connected()`` once Ray is connected (which replaces the
    process's SIGTERM handler: reinstall yours there)."""
    started_at = time.monotonic()
    stop = stop or asyncio.Event()
    force = force or asyncio.Event()
    router = Router(config)
    health_servicer = health.aio.HealthServicer()
    names = (pb.DESCRIPTOR.services_by_name["Generation"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME)
    server: grpc.aio.Server | None = None
    http: HttpFront | None = None
    health_task: asyncio.Task[None] | None = None
    started = False
    try:
        # Ray before the gRPC server: a local Ray start forks its processes (GCS, raylet),
        # and a fork while gRPC's threads run has hung the child before it ran the GCS.
        if not await _unless(router.start(on_connected), stop):
            return
        server, bound = _grpc_server(router, config, health_servicer, names)
        await server.start()
        started = True
        if config.http_port is not None:
            http = HttpFront(router)
            router.http_port = await http.start(config.host, config.http_port)
            router.metrics_port = http.metrics_port
        health_task = asyncio.get_running_loop().create_task(
            _report_health(router, health_servicer, (names[0],)))
        front = f", OpenAI HTTP on {config.host}:{router.http_port}" if http else ""
        print(f"pdserve: serving {router.model_name!r} on {config.host}:{bound}{front} "
              f"({config.pools.num_prefill} prefill + {config.pools.num_decode} decode "
              f"workers, ready in {time.monotonic() - started_at:.1f} s)", flush=True)
        if on_ready is not None:
            on_ready(router, bound)
        await stop.wait()
    finally:
        if health_task is not None:
            health_task.cancel()
        for name in ("", names[0]):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if started and server is not None:
            drain = asyncio.ensure_future(_drain(server, http, config.drain_timeout_s))
            if not await _unless(drain, force):
                router.cluster.kill_all()
                await server.stop(grace=None)
        await router.stop()


def _grpc_server(router: Router, config: RouterConfig, health_servicer: health.aio.HealthServicer,
                 names: tuple[str, ...]) -> tuple[grpc.aio.Server, int]:
    """The gRPC server with its services, bound to ``config``'s address; its port."""
    max_message = max(4 << 20, router.validator.max_prompt_bytes + (1 << 20))
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message)])
    add_generation_service(router, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(names, server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert and config.tls_key:
        creds = grpc.ssl_server_credentials([(config.tls_key, config.tls_cert)])
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    if not bound and config.port:
        raise OSError(f"cannot listen on {address} (in use?)")
    return server, bound


async def _unless(work: object, event: asyncio.Event) -> bool:
    """Run ``work`` (a coroutine or task) unless ``event`` is set first, in which case it
    is cancelled; True if it finished."""
    task = asyncio.ensure_future(work)  # type: ignore[arg-type]
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return False


async def _drain(server: grpc.aio.Server, http: HttpFront | None, grace_s: float) -> None:
    """Both fronts stop accepting; requests in flight get ``grace_s`` to finish."""
    work = [server.stop(grace=grace_s)]
    if http is not None:
        work.append(http.stop())
    await asyncio.gather(*work)


async def _report_health(router: Router, servicer: health.aio.HealthServicer,
                         services: tuple[str, ...]) -> None:
    """SERVING while both pools have a live worker, NOT_SERVING otherwise."""
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    last = None
    while True:
        status = serving if router.healthy() else not_serving
        if status != last:
            for name in ("", *services):
                await servicer.set(name, status)
            last = status
        await asyncio.sleep(HEALTH_INTERVAL_S)
