"""The ``pdserve`` command.

``pdserve serve`` starts the service: Ray (embedded, or ``--ray-address``), the prefill and
decode pools, and the gRPC router (default 127.0.0.1:50051) with the OpenAI-compatible HTTP
front and ``/metrics`` beside it (default port 8000) and the built-in tiny model unless
``--model`` names a checkpoint. Ctrl-C (or SIGTERM) drains and exits.
``pdserve bench serve`` measures a running server (``pdserve.bench.serve``).
``pdserve generate "text"`` streams a completion from a running service through the SDK
(``--offline``: from an engine in this process). ``pdserve model NAME`` builds a built-in
checkpoint and prints its folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from pdserve import __version__


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny",
                   help="checkpoint folder (Hugging Face format) or built-in 'tiny' / 'small'")
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

    from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.router.app import serve
    from pdserve.router.cluster import PoolConfig
    from pdserve.router.flow import FlowConfig
    from pdserve.router.server import RouterConfig

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        engine = EngineConfig(
            model=args.model, dtype=args.dtype, device=device,
            cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_blocks,
                              cpu_cache_bytes=args.cpu_cache_mb << 20),
            scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                      max_num_seqs=args.max_num_seqs),
        )
        pools = PoolConfig(
            engine=engine, num_prefill=args.prefill_workers, num_decode=args.decode_workers,
            ray_address=args.ray_address or os.environ.get("RAY_ADDRESS") or None,
            gpus_per_worker=1.0 if device.startswith("cuda") else 0.0,
            prefill_resources=_resources(args.prefill_resource),
            decode_resources=_resources(args.decode_resource),
            kv_host=args.kv_host, lease_s=args.lease,
            pin_cpus={"auto": None, "on": True, "off": False}[args.pin_cpus],
        )
        tls_cert = _read(args.tls_cert)
        tls_key = _read(args.tls_key)
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        config = RouterConfig(
            pools=pools, host=args.host, port=args.port,
            api_key=args.api_key or os.environ.get("PDSERVE_API_KEY") or None,
            tls_cert=tls_cert, tls_key=tls_key, balancer=args.balancer,
            http_port=args.http_port or None,
            flow=FlowConfig(lease_s=args.lease),
        )
    except (ValueError, OSError) as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def handle_signals(*_: object) -> None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)

        handle_signals()
        # Again once serving: connecting to Ray replaces the SIGTERM handler with Ray's own,
        # which dumps a stack and kills the process undrained (`ray job stop`, Kubernetes).
        await serve(config, stop=stop, on_ready=handle_signals)

    asyncio.run(main())
    print("pdserve: stopped", file=sys.stderr)
    return 0


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


def _cmd_model(args: argparse.Namespace) -> int:
    from pdserve.engine.model.builtin import builtin_checkpoint

    print(builtin_checkpoint(args.name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"pdserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    srv = sub.add_parser("serve", help="run the disaggregated service")
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
    srv.add_argument("--tls-cert", help="PEM certificate chain file (enables TLS)")
    srv.add_argument("--tls-key", help="PEM private key file")
    srv.add_argument("--api-key", help="require 'authorization: Bearer KEY' (or "
                                       "$PDSERVE_API_KEY)")
    srv.add_argument("--balancer", default="prefix_aware",
                     choices=["prefix_aware", "least_loaded", "round_robin"])
    srv.add_argument("--num-blocks", type=int, default=None, help="KV blocks per worker")
    srv.add_argument("--cpu-cache-mb", type=int, default=512,
                     help="KV cache size per CPU worker when --num-blocks is not given")
    srv.add_argument("--max-num-seqs", type=int, default=128)
    srv.add_argument("--lease", type=float, default=30.0,
                     help="seconds a KV reservation or transfer may take before it fails")
    srv.add_argument("--kv-host", default="127.0.0.1",
                     help="address workers use for KV side channels and token streams; "
                          "'auto' = each node's own IP (multi-node clusters)")
    srv.add_argument("--prefill-resource", action="append",
                     help="Ray resource NAME=AMOUNT each prefill worker needs (repeatable)")
    srv.add_argument("--decode-resource", action="append",
                     help="Ray resource NAME=AMOUNT each decode worker needs (repeatable)")
    srv.add_argument("--pin-cpus", choices=["auto", "on", "off"], default="auto",
                     help="give each worker its own cores of this host ('auto': when "
                          "pdserve starts its own local Ray)")
    srv.set_defaults(func=_cmd_serve)

    gen = sub.add_parser("generate", help="stream a completion from a running service")
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

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bench_serve = bench_sub.add_parser(
        "serve", help="load-test a running server (pdserve gRPC or any OpenAI endpoint): "
                      "TTFT, TPOT, ITL, E2E, throughput, goodput")
    from pdserve.bench.serve import add_arguments as add_bench_serve_arguments

    add_bench_serve_arguments(bench_serve)
    bench_serve.set_defaults(func=_cmd_bench_serve)

    model = sub.add_parser("model", help="build a built-in checkpoint and print its folder")
    model.add_argument("name", choices=["tiny", "small"])
    model.set_defaults(func=_cmd_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
