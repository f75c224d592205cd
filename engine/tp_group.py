"""The torch.distributed group of one tensor-parallel worker's ranks.

No global state: the group is built from c10d backend objects (``ProcessGroupGloo`` /
``ProcessGroupNCCL``) over a ``TCPStore`` that rank 0 hosts, never through
``init_process_group``, so a process may hold it beside other groups (its KV transfer
pairs). NCCL on CUDA and gloo on CPU run the same calls; a second, gloo group carries the
step plans (Python objects) on CUDA too, as vLLM's CPU group does.

Every operation is bounded by the group's timeout: a rank that died makes its siblings'
next collective raise (``TPGroupError``) instead of waiting forever, and the worker then
goes down as one unit. One thread per process uses the group.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class TPGroupError(RuntimeError):
    """A collective of the tensor-parallel group failed (a rank died or timed out)."""


@dataclass(frozen=True, slots=True)
class TPAddress:
    """Where rank 0's rendezvous store listens, and the group's name in it."""

    host: str
    port: int
    name: str
    world: int
    timeout_s: float = 60.0
    join_timeout_s: float = 300.0  # ranks start processes and load weights: slower than ops


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def _new_pg(store: Any, backend: str, rank: int, world: int, host: str, timeout_s: float) -> Any:
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._timeout = _timedelta(timeout_s)
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(store, rank, world, options)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = _timedelta(timeout_s)
    # A dead sibling must fail the survivors' collectives, not tear their processes down.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    return dist.ProcessGroupNCCL(store, rank, world, options)


class TPGroup:
    """Rank ``rank`` of a ``world``-rank tensor-parallel group on ``device``."""

    def __init__(self, address: TPAddress, rank: int, device: torch.device,
                 watch: Callable[[], None] | None = None) -> None:
        """Join the group (blocks until every rank joined). Rank 0 hosts the store and, while
        it waits, calls ``watch()`` every 0.1 s: raising there (a rank's process died) ends
        the wait at once instead of at the timeout."""
        if not 0 <= rank < address.world:
            raise ValueError(f"rank {rank} is not in [0, {address.world})")
        self.rank, self.world, self.device = rank, address.world, device
        self.timeout_s = address.timeout_s
        self.join_timeout_s = max(address.join_timeout_s, address.timeout_s)
        self._store = dist.TCPStore(
            address.host, address.port, None, rank == 0, _timedelta(self.join_timeout_s),
            wait_for_workers=False, use_libuv=True,
        )
        prefixed = dist.PrefixStore(f"tp/{address.name}/", self._store)
        prefixed.set(f"joined/{rank}", "1")
        if rank == 0:
            self._await_ranks(prefixed, watch)
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self._pg = _new_pg(dist.PrefixStore("dev/", prefixed), self.backend, rank,
                           self.world, address.host, address.timeout_s)
        self._cpu = self._pg if self.backend == "gloo" else _new_pg(
            dist.PrefixStore("cpu/", prefixed), "gloo", rank, self.world, address.host,
            address.timeout_s)
        logger.info("tensor-parallel group %s: rank %d of %d, %s on %s", address.name, rank,
                    self.world, self.backend, device)

    def _await_ranks(self, store: Any, watch: Callable[[], None] | None) -> None:
        keys = [f"joined/{r}" for r in range(self.world)]
        deadline = time.monotonic() + self.join_timeout_s
        while not store.check(keys):
            if watch is not None:
                watch()
            if time.monotonic() > deadline:
                missing = [r for r in range(self.world) if not store.check([keys[r]])]
                raise TPGroupError(f"tensor-parallel rank(s) {missing} did not join within "
                                   f"{self.join_timeout_s:.0f} s")
            time.sleep(0.1)

    def _wait(self, work: Any, what: str) -> None:
        try:
            work.wait()
        except Exception as e:
            raise TPGroupError(f"tensor-parallel {what} failed on rank {self.rank} of "
                               f"{self.world}: {e}") from e

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place; returns it."""
        if self._pg is None:
            raise TPGroupError("tensor-parallel group is closed")
        self._wait(self._pg.allreduce([t]), "all-reduce")
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape on each), in rank order."""
        if self._pg is None:
            raise TPGroupError("tensor-parallel group is closed")
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        self._wait(self._pg.allgather([out], [t]), "all-gather")
        return out

    def broadcast_json(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` (JSON-encodable: no pickle crosses the group), on every rank.
        Others pass nothing."""
        if self._cpu is None:
            raise TPGroupError("tensor-parallel group is closed")
        if self.rank == 0:
            payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
            size = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self._wait(self._cpu.broadcast([size], dist.BroadcastOptions()), "broadcast")
        if self.rank != 0:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self._wait(self._cpu.broadcast([payload], dist.BroadcastOptions()), "broadcast")
        return obj if self.rank == 0 else json.loads(payload.numpy().tobytes())

    def gather_json(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (JSON-encodable), in rank order, on every rank."""
        if self._cpu is None:
            raise TPGroupError("tensor-parallel group is closed")
        data = json.dumps(obj).encode()
        size = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        self._wait(self._cpu.allgather([sizes], [size]), "all-gather")
        width = max(int(s.item()) for s in sizes)
        buf = torch.zeros(width, dtype=torch.uint8)
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out = [torch.empty(width, dtype=torch.uint8) for _ in range(self.world)]
        self._wait(self._cpu.allgather([out], [buf]), "all-gather")
        return [json.loads(o[: int(n.item())].numpy().tobytes())
                for o, n in zip(out, sizes, strict=True)]

    def min_int(self, value: int) -> int:
        """The smallest of the ranks' ``value``s."""
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        if self._cpu is None:
            raise TPGroupError("tensor-parallel group is closed")
        self._wait(self._cpu.allreduce([t], opts), "all-reduce")
        return int(t.item())

    def close(self) -> None:
        """Abort the group: a collective still pending on it fails instead of waiting."""
        for pg in {id(p): p for p in (self._pg, self._cpu) if p is not None}.values():
            for name in ("abort", "shutdown"):
                fn = getattr(pg, name, None)
                if fn is None:
                    continue
                try:
                    fn()
                    break
                except Exception:
                    logger.debug("%s of the tensor-parallel group failed", name, exc_info=True)
        self._pg = self._cpu = None
        self._store = None
