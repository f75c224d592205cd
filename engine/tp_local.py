"""Tensor parallelism on one machine without Ray: the offline ``LLM``'s ranks.

The calling process is rank 0; ranks 1..N-1 are spawned processes that build their shard of
the engine and follow rank 0's steps (``Engine.follow``) until it closes. On CUDA rank ``r``
uses ``cuda:r``; on CPU the torch threads are divided between the ranks (the caller's own
count too: it runs rank 0). Followers are daemon processes: they end with the caller.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import uuid
from multiprocessing.process import BaseProcess

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.ports import free_port
from pdserve.engine.tp_group import TPAddress, TPGroup

logger = logging.getLogger(__name__)


def rank_device(config: EngineConfig, rank: int) -> str:
    """The device rank ``rank`` uses: ``cuda:rank`` on CUDA, else the config's."""
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return f"cuda:{rank}" if device.startswith("cuda") else device


def threads_per_rank(world: int, total: int | None = None) -> int:
    """The CPU threads each of ``world`` ranks gets out of ``total`` (default: torch's)."""
    return max(1, (total or torch.get_num_threads()) // world)


def _follower(config: EngineConfig, address: TPAddress, rank: int, threads: int) -> None:
    from pdserve.engine.engine import Engine

    torch.set_num_threads(threads)
    config = dataclasses.replace(config, device=rank_device(config, rank))
    group = TPGroup(address, rank, torch.device(config.device))
    engine = Engine(config, tp=group)
    try:
        engine.follow()
    finally:
        engine.close()


@dataclasses.dataclass(slots=True)
class LocalRanks:
    """Rank 0's group and the processes of the other ranks."""

    group: TPGroup
    config: EngineConfig
    processes: list[BaseProcess]

    def join(self, timeout_s: float = 10.0) -> None:
        """Wait for the followers to exit (after rank 0's ``Engine.close``), killing the
        ones that do not."""
        for p in self.processes:
            p.join(timeout_s)
            if p.is_alive():
                logger.warning("tensor-parallel rank process %s did not stop; killing it", p.pid)
                p.kill()
                p.join(timeout_s)


def start_local_ranks(config: EngineConfig, world: int, timeout_s: float = 120.0) -> LocalRanks:
    """Spawn ranks 1..world-1 and join the group as rank 0 (blocks until every rank joined,
    or raises after ``timeout_s``). Build rank 0's engine with the returned ``config``
    (its device) and ``group``."""
    if world < 2:
        raise ValueError(f"local ranks are for tensor-parallel sizes of 2 or more, got {world}")
    if rank_device(config, 0).startswith("cuda") and torch.cuda.device_count() < world:
        raise ValueError(f"tensor_parallel_size={world} needs {world} GPUs; "
                         f"{torch.cuda.device_count()} visible")
    address = TPAddress("127.0.0.1", free_port(), uuid.uuid4().hex, world, timeout_s)
    threads = threads_per_rank(world, os.cpu_count() if torch.get_num_threads() < 1 else None)
    ctx = multiprocessing.get_context("spawn")
    procs: list[BaseProcess] = []
    for rank in range(1, world):
        p = ctx.Process(target=_follower, args=(config, address, rank, threads), daemon=True,
                        name=f"pdserve-tp-rank-{rank}")
        p.start()
        procs.append(p)
    torch.set_num_threads(threads)

    def watch() -> None:
        dead = [p for p in procs if p.exitcode is not None]
        if dead:
            raise RuntimeError(
                f"tensor-parallel rank process {dead[0].name} exited with code "
                f"{dead[0].exitcode} before joining (see its error above; scripts that build "
                "an LLM with tensor_parallel_size > 1 need an `if __name__ == \"__main__\":` "
                "guard, as with any spawned multiprocessing)")

    try:
        group = TPGroup(address, 0, torch.device(rank_device(config, 0)), watch)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return LocalRanks(group, dataclasses.replace(config, device=rank_device(config, 0)), procs)
