"""One router process: the ``Router``, its gRPC server (with the standard health service and
reflection) and, when configured, the OpenAI-compatible HTTP front, started and drained
together. ``serve`` is what ``pdserve serve`` runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.protos.pdserve.v1 import generation_pb2 as pb
from pdserve.protos.pdserve.v1 import generation_pb2_grpc as pb_grpc
from pdserve.router.http import HttpFront
from pdserve.router.server import Router, RouterConfig


async def serve(config: RouterConfig, stop: asyncio.Event | None = None,
                on_ready: Callable[[Router, int], None] | None = None) -> None:
    """Start the pools, the gRPC server and (``config.http_port`` not None) the HTTP front;
    run until ``stop`` is set, then drain. ``on_ready(router, port)`` is called once both
    accept requests (``router.http_port`` is the HTTP front's port)."""
    started = time.monotonic()
    router = Router(config)
    await router.start()
    http: HttpFront | None = None
    server = grpc.aio.server()
    pb_grpc.add_GenerationServicer_to_server(router, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (pb.DESCRIPTOR.services_by_name["Generation"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert and config.tls_key:
        creds = grpc.ssl_server_credentials([(config.tls_key, config.tls_cert)])
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    await server.start()
    if config.http_port is not None:
        http = HttpFront(router)
        router.http_port = await http.start(config.host, config.http_port)
    for name in ("", names[0]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    front = f", OpenAI HTTP on {config.host}:{router.http_port}" if http is not None else ""
    print(f"pdserve: serving {router.model_name!r} on {config.host}:{bound}{front} "
          f"({config.pools.num_prefill} prefill + {config.pools.num_decode} decode workers, "
          f"ready in {time.monotonic() - started:.1f} s)", flush=True)
    if on_ready is not None:
        on_ready(router, bound)
    try:
        if stop is None:
            await server.wait_for_termination()
        else:
            await stop.wait()
    finally:
        for name in ("", names[0]):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if http is not None:
            await http.stop()
        await server.stop(grace=10.0)
        await router.stop()
