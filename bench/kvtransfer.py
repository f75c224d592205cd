"""KV transfer throughput and latency: the KV transports between two processes vs torch
copy vs TCP.

    python -m pdserve.bench.kvtransfer [--transports nixl,nccl] [--dtypes float32,bfloat16]
                                       [--json PATH]

One receiver process, the sender in this process, same run and machine for every row. Each
transport (``nixl``: NIXL/UCX; ``nccl``: torch.distributed pair groups, gloo on CPU) has one
connector per side around the same cache, and their writes alternate, repetition by
repetition, so that their ratio is measured side by side:

- ``<transport> blocks``: the KV of a ``--prompt-tokens`` prompt of the "small" checkpoint
  shape (``--layers/--kv-heads/--head-dim``), one write of shuffled, non-contiguous block ids;
- ``<transport> region``: ``--regions-mib`` contiguous regions (consecutive 1 MiB blocks);
- ``torch copy``: the same bytes copied in memory in one process (gather for block lists);
- ``tcp socket``: the same bytes over a loopback TCP socket (sendall + 1-byte ack);
- ``<transport> 1 block``: latency of one 16-token block write, write call to completion.

Times run from the call to the sender's completion (NIXL reports a WRITE done once the data
is in the receiver's memory; the nccl transport once the receiver acknowledged that the blocks
landed in its cache). UCX transports are read from UCX's protocol table (``UCX_PROTO_INFO``)
printed during the run. What this cannot measure (GPU to GPU) is modelled by
``python -m pdserve.bench.transfer_model``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import re
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pdserve.engine.config import KVCacheSpec
from pdserve.kvtransfer.auth import ChannelKey
from pdserve.kvtransfer.base import KVConnector
from pdserve.kvtransfer.factory import check_transport

MIB = 1 << 20
REGION_SPEC = dict(num_layers=2, num_kv_heads=16, head_dim=256, block_size=16, dtype="float32")
MODEL = "bench"
_KEY = ChannelKey.generate()  # the sender's; its secret goes to the receiver with "open"


@dataclass(frozen=True, slots=True)
class Row:
    case: str
    method: str
    dtype: str
    bytes: int
    descriptors: int
    median_ms: float
    p99_ms: float
    gb_per_s: float


def _row(case: str, method: str, dtype: str, nbytes: int, descs: int, times: list[float]) -> Row:
    t = np.asarray(times)
    median = float(np.median(t))
    return Row(
        case,
        method,
        dtype,
        nbytes,
        descs,
        median * 1e3,
        float(np.percentile(t, 99)) * 1e3,
        nbytes / median / 1e9,
    )


def _connector(
    transport: str, cache: torch.Tensor, spec: KVCacheSpec, progress: str, side: str,
    key: ChannelKey,
) -> KVConnector:
    name = f"bench-{transport}-{side}"
    if transport == "nccl":
        from pdserve.kvtransfer.nccl import NcclConfig, NcclConnector

        return NcclConnector(cache, spec, NcclConfig(model=MODEL, name=name, lease_s=600.0,
                                                     channel_key=key))
    from pdserve.kvtransfer.nixl import NixlConfig, NixlConnector

    config = NixlConfig(model=MODEL, name=name, progress_thread=progress in (side, "both"),
                        channel_key=key)
    return NixlConnector(cache, spec, config)


def _open(
    transports: list[str], cache: torch.Tensor, spec: KVCacheSpec, progress: str, side: str,
    key: ChannelKey = _KEY,
) -> dict[str, KVConnector]:
    """One connector per transport around the same ``cache``."""
    return {t: _connector(t, cache, spec, progress, side, key) for t in transports}


# -- receiver process ---------------------------------------------------------------------


def _receiver(conn: Any) -> None:
    connectors: dict[str, KVConnector] = {}
    cache: torch.Tensor | None = None
    while True:
        cmd, args = conn.recv()
        if cmd == "open":
            for c in connectors.values():
                c.close()
            spec, num_blocks, transports, progress, secret = KVCacheSpec(**args[0]), *args[1:]
            cache = torch.zeros(spec.shape(num_blocks), dtype=getattr(torch, spec.dtype))
            connectors = _open(transports, cache, spec, progress, "receiver", ChannelKey(secret))
            conn.send({t: c.describe() for t, c in connectors.items()})
        elif cmd == "expect":
            transport, pairs = args
            for rid, ids in pairs:
                connectors[transport].expect(rid, ids, 600.0)
            conn.send(None)
        elif cmd == "collect":  # wait until the named requests are all received
            transport, rids = args
            pending, deadline, failed = set(rids), time.monotonic() + 30, []
            while pending and time.monotonic() < deadline and not failed:
                result = connectors[transport].poll()
                pending -= {r.request_id for r in result.received}
                failed += result.failed
            conn.send((sorted(pending), [str(f) for f in failed]))
        elif cmd == "digest":
            assert cache is not None
            rows = cache.view(torch.uint8).reshape(cache.shape[0], -1)
            conn.send(hashlib.sha256(rows[list(args[0])].numpy().tobytes()).hexdigest())
        elif cmd == "tcp":
            size, rounds = args
            server = socket.create_server(("127.0.0.1", 0))
            threading.Thread(target=_tcp_sink, args=(server, size, rounds), daemon=True).start()
            conn.send(server.getsockname()[1])
        elif cmd == "stop":
            for c in connectors.values():
                c.close()
            conn.send(None)
            return


def _tcp_sink(server: socket.socket, size: int, rounds: int) -> None:
    sock, _ = server.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(size))
    for _ in range(rounds):
        got = 0
        while got < size:
            got += sock.recv_into(buf[got:], size - got)
        sock.sendall(b"k")
    sock.close()
    server.close()


class _Remote:
    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_receiver, args=(child,), daemon=True)
        self.proc.start()

    def call(self, cmd: str, *args: Any, timeout: float = 120.0) -> Any:
        self.conn.send((cmd, args))
        if not self.conn.poll(timeout):
            self.proc.kill()
            raise TimeoutError(f"receiver did not answer {cmd}")
        return self.conn.recv()


# -- measurements ---------------------------------------------------------------------------


def _timed_write(sender: KVConnector, target: Any, rid: str, src: Any, dst: Any) -> float:
    start = time.perf_counter()
    sender.write_blocks(target, rid, src, dst, last=True)
    while True:
        result = sender.poll()
        if result.failed:
            raise RuntimeError(f"transfer failed: {result.failed}")
        if rid in result.sent:
            return time.perf_counter() - start
        time.sleep(0)  # yield the GIL: the nccl transport's threads run in this process


def _interleaved_times(
    remote: _Remote,
    senders: dict[str, KVConnector],
    targets: dict[str, Any],
    src: list[int],
    dst: list[int],
    repeats: int,
    tag: str,
) -> dict[str, list[float]]:
    """Per transport, ``repeats`` timed writes of ``src`` into ``dst`` (after one untimed
    warm-up each), the transports taking turns. Like a decode worker, the receiver expects
    every request before it is written."""
    rids = {t: [f"{tag}-{t}-{i}" for i in range(repeats + 1)] for t in senders}
    times: dict[str, list[float]] = {t: [] for t in senders}
    for t, sender in senders.items():
        remote.call("expect", t, [(rid, dst) for rid in rids[t]])
        sender.connect(targets[t])  # type: ignore[attr-defined]
    for i in range(repeats + 1):
        for t, sender in senders.items():
            elapsed = _timed_write(sender, targets[t], rids[t][i], src, dst)
            if i:
                times[t].append(elapsed)
    for t in senders:
        pending, failed = remote.call("collect", t, rids[t])
        if pending or failed:
            raise RuntimeError(f"{t}: receiver did not get {pending}; failures: {failed}")
    return times


def _torch_times(fn: Any, repeats: int) -> list[float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _tcp_times(remote: _Remote, payload: memoryview, repeats: int) -> list[float]:
    port = remote.call("tcp", len(payload), repeats + 1)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            sock.sendall(payload)
            if sock.recv(1) != b"k":
                raise RuntimeError("TCP sink closed early")
            times.append(time.perf_counter() - start)
    return times[1:]


def _block_list_rows(args: argparse.Namespace, remote: _Remote, dtype: str) -> list[Row]:
    spec = KVCacheSpec(args.layers, args.kv_heads, args.head_dim, args.block_size, dtype)
    n = -(-args.prompt_tokens // args.block_size)
    num_blocks = 2 * n
    cache = torch.randn(spec.shape(num_blocks)).to(getattr(torch, dtype))
    targets = remote.call(
        "open", asdict(spec), num_blocks, args.transports, args.progress_thread, _KEY.secret
    )
    rng = np.random.default_rng(0)
    src = rng.permutation(num_blocks)[:n].tolist()
    dst = rng.permutation(num_blocks)[:n].tolist()
    nbytes = n * spec.block_bytes
    case = f"{args.prompt_tokens}-token KV, {n} blocks"
    rows: list[Row] = []
    senders = _open(args.transports, cache, spec, args.progress_thread, "sender")
    try:
        times = _interleaved_times(remote, senders, targets, src, dst, args.repeats, f"bl-{dtype}")
        rows += [_row(case, f"{t} blocks", dtype, nbytes, n, times[t]) for t in senders]
        rows_digest = cache.view(torch.uint8).reshape(num_blocks, -1)[src].numpy().tobytes()
        if remote.call("digest", dst) != hashlib.sha256(rows_digest).hexdigest():
            raise RuntimeError("received blocks differ from the sent ones")
        lat = _interleaved_times(
            remote, senders, targets, src[:1], dst[:1], args.latency_iters, f"lat-{dtype}"
        )
        rows += [
            _row("1 block (16 tokens)", f"{t} 1 block", dtype, spec.block_bytes, 1, lat[t])
            for t in senders
        ]
    finally:
        for sender in senders.values():
            sender.close()
    rows2d = cache.view(num_blocks, -1)  # one row per block, as the transfer sees it
    other = torch.empty_like(rows2d)
    src_t, dst_t = torch.tensor(src), torch.tensor(dst)
    rows.append(
        _row(
            case,
            "torch copy",
            dtype,
            nbytes,
            n,
            _torch_times(
                lambda: other.index_copy_(0, dst_t, rows2d.index_select(0, src_t)), args.repeats
            ),
        )
    )
    payload = cache[src_t].view(torch.uint8).numpy()
    rows.append(
        _row(
            case,
            "tcp socket",
            dtype,
            nbytes,
            1,
            _tcp_times(remote, memoryview(payload).cast("B"), args.repeats),
        )
    )
    return rows


def _region_rows(args: argparse.Namespace, remote: _Remote) -> list[Row]:
    spec = KVCacheSpec(**REGION_SPEC)
    assert spec.block_bytes == MIB
    num_blocks = max(args.regions_mib)
    cache = torch.randn(spec.shape(num_blocks))
    targets = remote.call(
        "open", asdict(spec), num_blocks, args.transports, args.progress_thread, _KEY.secret
    )
    rows = []
    senders = _open(args.transports, cache, spec, args.progress_thread, "sender")
    try:
        for mib in args.regions_mib:
            ids = list(range(mib))
            times = _interleaved_times(remote, senders, targets, ids, ids, args.repeats,
                                       f"rg-{mib}")
            rows += [
                _row(f"{mib} MiB region", f"{t} region", "float32", mib * MIB, mib, times[t])
                for t in senders
            ]
    finally:
        for sender in senders.values():
            sender.close()
    flat = cache.view(torch.uint8).reshape(-1)
    other = torch.empty_like(flat)
    for mib in args.regions_mib:
        size = mib * MIB
        rows.append(
            _row(
                f"{mib} MiB region",
                "torch copy",
                "float32",
                size,
                1,
                _torch_times(lambda size=size: other[:size].copy_(flat[:size]), args.repeats),
            )
        )
        payload = memoryview(flat[:size].numpy()).cast("B")
        rows.append(
            _row(
                f"{mib} MiB region",
                "tcp socket",
                "float32",
                size,
                1,
                _tcp_times(remote, payload, args.repeats),
            )
        )
    return rows


def _transports(proto_info: str) -> list[str]:
    """Transports of UCX's 'remote memory write' (put) protocol tables, e.g. 'cma/memory'."""
    found: list[str] = []
    lines = proto_info.splitlines()
    for i, line in enumerate(lines):
        if "remote memory write" not in line:
            continue
        for row in lines[i + 1 : i + 12]:
            cells = [c.strip() for c in row.split("|")]
            if len(cells) >= 4 and re.match(r"^\d", cells[1]):
                for tl in cells[3].split():
                    if "/" in tl and tl not in found:
                        found.append(tl)
    return found


def _print_table(rows: list[Row], out: Any) -> None:
    head = (
        f"{'case':<30} {'method':<13} {'dtype':<9} {'MiB':>8} {'descs':>5} "
        f"{'median ms':>10} {'p99 ms':>9} {'GB/s':>7}"
    )
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        print(
            f"{r.case:<30} {r.method:<13} {r.dtype:<9} {r.bytes / MIB:>8.2f} "
            f"{r.descriptors:>5} {r.median_ms:>10.3f} {r.p99_ms:>9.3f} {r.gb_per_s:>7.2f}",
            file=out,
        )


def _summary(args: argparse.Namespace, rows: list[Row], dtypes: list[str],
             transports: list[str]) -> tuple[dict[str, Any], list[str]]:
    by = {(r.case, r.method, r.dtype): r for r in rows}
    big = max(args.regions_mib)
    n = -(-args.prompt_tokens // args.block_size)
    blocks_case = f"{args.prompt_tokens}-token KV, {n} blocks"
    summary: dict[str, Any] = {
        "ucx_tls": os.environ.get("UCX_TLS", "(unset)"),
        "ucx_put_transports": transports,
    }
    lines = [f"UCX_TLS={summary['ucx_tls']}; UCX put transports: "
             f"{', '.join(transports) or 'unknown'}"]
    tcp_big = by[(f"{big} MiB region", "tcp socket", "float32")].gb_per_s
    for t in args.transports:
        t_big = by[(f"{big} MiB region", f"{t} region", "float32")].gb_per_s
        summary[f"{t}_vs_tcp_large_region"] = t_big / tcp_big
        summary[f"{t}_blocks_vs_large_region"] = {
            d: by[(blocks_case, f"{t} blocks", d)].gb_per_s / t_big for d in dtypes
        }
        lines.append(f"{t} / TCP ({big} MiB region): {t_big / tcp_big:.2f}x"
                     + (" (target >= 0.8x)" if t == "nixl" else ""))
        for d, ratio in summary[f"{t}_blocks_vs_large_region"].items():
            lines.append(f"{t} block list / {t} {big} MiB region ({d}): {ratio:.2f}x"
                         + (" (target >= 0.5x)" if t == "nixl" else ""))
    if {"nixl", "nccl"} <= set(args.transports):
        ratios: dict[str, float] = {}
        for d in dtypes:
            ratios[f"blocks {d}"] = (by[(blocks_case, "nccl blocks", d)].gb_per_s
                                     / by[(blocks_case, "nixl blocks", d)].gb_per_s)
            ratios[f"1 block latency {d}"] = (
                by[("1 block (16 tokens)", "nccl 1 block", d)].median_ms
                / by[("1 block (16 tokens)", "nixl 1 block", d)].median_ms)
        for mib in args.regions_mib:
            ratios[f"{mib} MiB region"] = (
                by[(f"{mib} MiB region", "nccl region", "float32")].gb_per_s
                / by[(f"{mib} MiB region", "nixl region", "float32")].gb_per_s)
        summary["nccl_vs_nixl"] = ratios
        for what, ratio in ratios.items():
            kind = "latency" if "latency" in what else "throughput"
            lines.append(f"nccl (gloo) / NIXL {kind}, {what}: {ratio:.2f}x")
    return summary, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transports", default="nixl,nccl",
                        help="KV transports to measure, side by side (nixl, nccl)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--regions-mib", default="64,512")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--latency-iters", type=int, default=301)
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument(
        "--progress-thread",
        choices=("none", "sender", "receiver", "both"),
        default="none",
        help="which side runs NIXL's busy-polling UCX thread",
    )
    args = parser.parse_args(argv)
    args.regions_mib = [int(x) for x in args.regions_mib.split(",") if x]
    args.transports = [check_transport(t) for t in args.transports.split(",") if t]
    dtypes = [d for d in args.dtypes.split(",") if d]

    remote = _Remote()  # started before UCX_PROTO_INFO is set: only our side prints tables
    os.environ.setdefault("UCX_PROTO_INFO", "y")
    real_stdout = os.fdopen(os.dup(1), "w")
    with tempfile.TemporaryFile("w+") as capture:
        sys.stdout.flush()
        os.dup2(capture.fileno(), 1)  # UCX prints its protocol tables on fd 1
        try:
            rows = [r for d in dtypes for r in _block_list_rows(args, remote, d)]
            rows += _region_rows(args, remote)
        finally:
            sys.stdout.flush()
            os.dup2(real_stdout.fileno(), 1)
            remote.call("stop")
        capture.seek(0)
        transports = _transports(capture.read())

    _print_table(rows, real_stdout)
    summary, lines = _summary(args, rows, dtypes, transports)
    print("\n" + "\n".join(lines), file=real_stdout)
    real_stdout.flush()
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows], "summary": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
