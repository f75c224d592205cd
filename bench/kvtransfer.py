"""KV transfer throughput and latency: NIXL between two processes vs torch copy vs TCP.

    python -m pdserve.bench.kvtransfer [--dtypes float32,bfloat16] [--json PATH]

One receiver process, the sender in this process, same run and machine for every row:

- ``nixl blocks``: the KV of a ``--prompt-tokens`` prompt of the "small" checkpoint shape
  (``--layers/--kv-heads/--head-dim``), one write of shuffled, non-contiguous block ids;
- ``nixl region``: ``--regions-mib`` contiguous regions (consecutive 1 MiB blocks);
- ``torch copy``: the same bytes copied in memory in one process (gather for block lists);
- ``tcp socket``: the same bytes over a loopback TCP socket (sendall + 1-byte ack);
- ``nixl 1 block``: latency of one 16-token block write, write call to completion.

Times run from the call to the sender's completion (NIXL reports a WRITE done once the data
is in the receiver's memory). UCX transports are read from UCX's protocol table
(``UCX_PROTO_INFO``) printed during the run.
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
from pdserve.kvtransfer.nixl import NixlConfig, NixlConnector

MIB = 1 << 20
REGION_SPEC = dict(num_layers=2, num_kv_heads=16, head_dim=256, block_size=16, dtype="float32")
MODEL = "bench"
_KEY = ChannelKey.generate()  # pickled into both processes' configs


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


def _config(args: argparse.Namespace, side: str) -> NixlConfig:
    progress = args.progress_thread in (side, "both")
    return NixlConfig(model=MODEL, name=f"bench-{side}", progress_thread=progress,
                      channel_key=_KEY)


# -- receiver process ---------------------------------------------------------------------


def _receiver(conn: Any) -> None:
    connector: NixlConnector | None = None
    cache: torch.Tensor | None = None
    while True:
        cmd, args = conn.recv()
        if cmd == "open":
            if connector is not None:
                connector.close()
            spec, num_blocks, config = KVCacheSpec(**args[0]), args[1], args[2]
            cache = torch.zeros(spec.shape(num_blocks), dtype=getattr(torch, spec.dtype))
            connector = NixlConnector(cache, spec, config)
            conn.send(connector.describe())
        elif cmd == "expect":
            assert connector is not None
            for rid, ids in args[0]:
                connector.expect(rid, ids, 600.0)
            conn.send(None)
        elif cmd == "collect":  # wait until the named requests are all received
            assert connector is not None
            pending, deadline, failed = set(args[0]), time.monotonic() + 30, []
            while pending and time.monotonic() < deadline and not failed:
                result = connector.poll()
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
            if connector is not None:
                connector.close()
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


def _timed_write(sender: NixlConnector, target: Any, rid: str, src: Any, dst: Any) -> float:
    start = time.perf_counter()
    sender.write_blocks(target, rid, src, dst, last=True)
    while True:
        result = sender.poll()
        if result.failed:
            raise RuntimeError(f"transfer failed: {result.failed}")
        if rid in result.sent:
            return time.perf_counter() - start


def _nixl_times(
    remote: _Remote,
    sender: NixlConnector,
    target: Any,
    src: list[int],
    dst: list[int],
    repeats: int,
    tag: str,
) -> list[float]:
    """Like a decode worker, the receiver expects every request before it is written."""
    rids = [f"{tag}-{i}" for i in range(repeats + 1)]
    remote.call("expect", [(rid, dst) for rid in rids])
    sender.connect(target)
    times = [_timed_write(sender, target, rid, src, dst) for rid in rids][1:]
    pending, failed = remote.call("collect", rids)
    if pending or failed:
        raise RuntimeError(f"receiver did not get {pending}; failures: {failed}")
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
    target = remote.call("open", asdict(spec), num_blocks, _config(args, "receiver"))
    rng = np.random.default_rng(0)
    src = rng.permutation(num_blocks)[:n].tolist()
    dst = rng.permutation(num_blocks)[:n].tolist()
    nbytes = n * spec.block_bytes
    case = f"{args.prompt_tokens}-token KV, {n} blocks"
    with NixlConnector(cache, spec, _config(args, "sender")) as sender:
        times = _nixl_times(remote, sender, target, src, dst, args.repeats, f"bl-{dtype}")
        rows = [_row(case, "nixl blocks", dtype, nbytes, n, times)]
        rows_digest = cache.view(torch.uint8).reshape(num_blocks, -1)[src].numpy().tobytes()
        if remote.call("digest", dst) != hashlib.sha256(rows_digest).hexdigest():
            raise RuntimeError("received blocks differ from the sent ones")
        lat = _nixl_times(
            remote, sender, target, src[:1], dst[:1], args.latency_iters, f"lat-{dtype}"
        )
        rows.append(_row("1 block (16 tokens)", "nixl 1 block", dtype, spec.block_bytes, 1, lat))
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
    target = remote.call("open", asdict(spec), num_blocks, _config(args, "receiver"))
    rows = []
    with NixlConnector(cache, spec, _config(args, "sender")) as sender:
        for mib in args.regions_mib:
            ids = list(range(mib))
            times = _nixl_times(remote, sender, target, ids, ids, args.repeats, f"rg-{mib}")
            rows.append(_row(f"{mib} MiB region", "nixl region", "float32", mib * MIB, mib, times))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    by = {(r.case, r.method, r.dtype): r for r in rows}
    big = max(args.regions_mib)
    nixl_big = by[(f"{big} MiB region", "nixl region", "float32")].gb_per_s
    tcp_big = by[(f"{big} MiB region", "tcp socket", "float32")].gb_per_s
    n = -(-args.prompt_tokens // args.block_size)
    summary = {
        "ucx_tls": os.environ.get("UCX_TLS", "(unset)"),
        "ucx_put_transports": transports,
        "nixl_vs_tcp_large_region": nixl_big / tcp_big,
        "blocks_vs_large_region": {
            d: by[(f"{args.prompt_tokens}-token KV, {n} blocks", "nixl blocks", d)].gb_per_s
            / nixl_big
            for d in dtypes
        },
    }
    print(
        f"\nUCX_TLS={summary['ucx_tls']}; UCX put transports: {', '.join(transports) or 'unknown'}",
        file=real_stdout,
    )
    print(
        f"NIXL / TCP ({big} MiB region): {summary['nixl_vs_tcp_large_region']:.2f}x "
        "(target >= 0.8x)",
        file=real_stdout,
    )
    for d, ratio in summary["blocks_vs_large_region"].items():
        print(
            f"NIXL block list / NIXL {big} MiB region ({d}): {ratio:.2f}x (target >= 0.5x)",
            file=real_stdout,
        )
    real_stdout.flush()
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows], "summary": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
