"""Two-rank torch.distributed process groups, one per (sender, receiver) connector pair.

No global state: groups are built directly from c10d backend objects
(``ProcessGroupGloo`` / ``ProcessGroupNCCL``) over a ``TCPStore``, never through
``init_process_group``, so a process may hold any number of them beside (or without) a
default group of its own (e.g. its tensor-parallel ranks). The receiving connector runs the
store (``StoreServer``, bound to its KV host); each pair rendezvous under its own prefix.

Security: ``TCPStore`` has no authentication, and neither have the connections gloo and NCCL
open between the two ranks. pdserve limits what that exposes: the store listens on the KV host
only, on a random port that a sender learns from the sealed handshake
(``pdserve.kvtransfer.nccl_wire``); each pair's prefix is derived from the cluster's secret
and the link's random group name, and never sent, so a process without the secret that
reaches the store can neither find nor join a pair's rendezvous. It can still connect to the
store and to the ranks' sockets (and so disturb, not read or forge, a transfer, which then
fails within its timeouts). Keep the KV host on a network only the cluster reaches (a private
interface, a Kubernetes NetworkPolicy), as for NIXL's UCX data path.

NCCL on CUDA, gloo on CPU: the same calls. Every group has a timeout bounding each operation;
``PairGroup.close`` aborts the group so that an operation still pending on it returns with an
error instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_ENV_LOCK = threading.Lock()


def backend_for(device: torch.device) -> str:
    """'nccl' for CUDA tensors, 'gloo' for CPU tensors (ValueError when it is not built in)."""
    if device.type == "cuda":
        if not dist.is_nccl_available():
            raise ValueError("the nccl KV transport on CUDA needs a torch built with NCCL")
        return "nccl"
    if device.type == "cpu":
        if not dist.is_gloo_available():
            raise ValueError("the nccl KV transport on CPU needs a torch built with gloo")
        return "gloo"
    raise ValueError(f"the nccl KV transport does not support {device.type} tensors")


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def _listen(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


class StoreServer:
    """The rendezvous store of a receiving connector, listening on ``host`` only (a random
    port). Unauthenticated (see the module docstring): pairs rendezvous under prefixes that
    only holders of the cluster's secret can compute."""

    def __init__(self, host: str, timeout_s: float) -> None:
        sock = _listen(host)
        self.host, self.port = host, sock.getsockname()[1]
        # The store takes over the socket we bound, so it listens on ``host`` alone (its own
        # listener would bind every interface).
        self.store: Any = dist.TCPStore(
            host, self.port, None, True, _timedelta(timeout_s), wait_for_workers=False,
            master_listen_fd=sock.detach(), use_libuv=True,
        )

    def close(self) -> None:
        self.store = None


def store_client(host: str, port: int, timeout_s: float) -> Any:
    """A client of the ``StoreServer`` at ``host:port`` (raises if it does not answer)."""
    return dist.TCPStore(host, port, None, False, _timedelta(timeout_s), use_libuv=True)


@contextlib.contextmanager
def _nccl_error_handling() -> Iterator[None]:
    """NCCL's watchdog defaults to tearing down the whole process when an operation times
    out; a dead KV peer must fail a transfer, not kill the surviving worker. Mode 2
    ("clean up only") aborts the communicator and leaves the process running. Read by
    ProcessGroupNCCL's constructor, so it is set around that call only (an explicit setting
    in the environment wins)."""
    name = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
    with _ENV_LOCK:
        before = os.environ.get(name)
        if before is None:
            os.environ[name] = "2"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(name, None)


@dataclass(slots=True, eq=False)
class PairGroup:
    """One side (``rank`` 0 = sender, 1 = receiver) of a two-rank group. One thread uses it."""

    key: str
    backend: str
    rank: int
    device: torch.device
    pg: Any
    stream: Any = None  # the CUDA stream this side's operations run on

    @property
    def peer(self) -> int:
        return 1 - self.rank

    def scope(self) -> contextlib.AbstractContextManager[Any]:
        """Make this group's CUDA stream current (no-op on CPU): the copies into and out of a
        transfer buffer and the transfer itself must run inside it, in that order."""
        if self.stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.stream)

    def send(self, tensor: torch.Tensor) -> None:
        """Send ``tensor`` (contiguous) to the peer; returns once it left this side. Call
        inside ``scope()``."""
        work = self.pg.send([tensor], self.peer, 0)
        work.wait()
        if self.stream is not None:
            self.stream.synchronize()

    def recv(self, tensor: torch.Tensor) -> None:
        """Receive the peer's next send into ``tensor`` (same shape and dtype); returns once it
        landed. Call inside ``scope()``."""
        work = self.pg.recv([tensor], self.peer, 0)
        work.wait()
        if self.stream is not None:
            self.stream.synchronize()

    def close(self) -> None:
        """Abort the group: pending operations on either side fail instead of waiting."""
        for name in ("abort", "shutdown"):
            fn = getattr(self.pg, name, None)
            if fn is None:
                continue
            try:
                fn()
                break
            except Exception:  # teardown goes on; the group is dropped either way
                logger.debug("%s of KV pair group %s failed", name, self.key, exc_info=True)
        self.pg = None


def open_pair_group(
    store: Any, key: str, rank: int, device: torch.device, host: str, timeout_s: float, *,
    prefix: str,
) -> PairGroup:
    """Join the two-rank group ``key`` as ``rank``, rendezvousing under ``prefix`` in
    ``store``; blocks until the peer joins too (or ``timeout_s`` passes). ``host`` is the local
    interface the group's own connections use (gloo; NCCL picks its interfaces from
    ``NCCL_SOCKET_IFNAME``)."""
    backend = backend_for(device)
    prefixed = dist.PrefixStore(prefix, store)
    timeout = _timedelta(timeout_s)
    stream = None
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        pg = dist.ProcessGroupGloo(prefixed, rank, 2, options)
    else:
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        options.is_high_priority_stream = False
        with _nccl_error_handling():
            pg = dist.ProcessGroupNCCL(prefixed, rank, 2, options)
        stream = torch.cuda.Stream(device)
    logger.info("KV pair group %s: %s, rank %d of 2 on %s", key, backend, rank, device)
    return PairGroup(key, backend, rank, device, pg, stream)
