"""The ranks of a tensor-parallel worker as Ray actors, placed together.

A worker of tensor-parallel size N is N processes: rank 0 is the worker itself (it owns the
scheduler, the driver thread and the Ray methods the router calls), ranks 1..N-1 are
``RankActor``s that hold their shard of the model and of every KV block and follow rank 0's
step plans (``pdserve.engine.tp_runner``). ``RankGroup`` creates them in a Ray placement
group of N bundles (``STRICT_PACK``: one node, by default; one GPU per bundle on CUDA,
``cpus_per_rank`` CPUs and as many torch threads per rank on CPU) and is what rank 0 holds.

One unit: a rank actor that dies makes rank 0's next step fail (its collectives raise within
the group's timeout), and ``RankGroup.check()`` (called by rank 0 on every loop turn) notices
a finished rank actor at once, so the worker's engine loop stops and the router replaces the
whole worker. Rank actors are owned by rank 0's process: Ray ends them when it ends, and
``RankGroup.close()`` ends them (and the placement group) when the worker shuts down.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pdserve.engine.config import EngineConfig
from pdserve.worker.affinity import pin_process

logger = logging.getLogger(__name__)


class RankError(RuntimeError):
    """A rank of this tensor-parallel worker stopped: the worker must go down as one unit."""


class RankActor:
    """Ray actor body of one rank other than 0."""

    def __init__(self, config: EngineConfig, address: Any, rank: int, threads: int,
                 kv: dict[str, Any] | None = None, cpus: Sequence[int] | None = None) -> None:
        import torch

        from pdserve.engine.engine import Engine
        from pdserve.engine.tp_group import TPGroup

        if cpus:  # this rank's share of the worker's cores
            pin_process(cpus)
        else:
            torch.set_num_threads(threads)
        if config.device.startswith("cuda") or (config.device == "auto"
                                                and torch.cuda.is_available()):
            config = replace(config, device="cuda:0")  # the bundle's one GPU
        self.rank = rank
        self._done = threading.Event()
        self.error: str | None = None
        group = TPGroup(address, rank, torch.device(
            "cuda:0" if config.device.startswith("cuda") else config.device))
        self.engine = Engine(replace(config, detokenize=False), tp=group)
        self.kv = None
        if kv is not None:  # this rank's own KV connector, driven by rank 0
            from pdserve.worker.tp_connector import RankKV

            self.kv = RankKV(rank_connector(self.engine, rank=rank, **kv), rank)
        self._thread = threading.Thread(target=self._follow, name=f"tp-rank-{rank}",
                                        daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            self.engine.follow(self.kv.handle if self.kv is not None else None)
        except BaseException as e:
            self.error = f"{type(e).__name__}: {e}"
            logger.error("tensor-parallel rank %d stopped: %s", self.rank, self.error)
        finally:
            self.engine.close()
            if self.kv is not None:
                self.kv.connector.close()
            self._done.set()

    def ready(self) -> int:
        return self.rank

    def pid(self) -> int:
        return os.getpid()

    def wait(self) -> str:
        """Answers when this rank stopped following, with why ('' when rank 0 stopped it)."""
        self._done.wait()
        return self.error or ""


def rank_connector(engine: Any, *, rank: int, transport: str, host: str, name: str,
                   lease_s: float, channel_key: Any) -> Any:
    """The KV connector of one rank (any rank, 0 included) around its engine's cache: it
    holds this rank's KV heads of the model's."""
    from pdserve.engine.tp_layout import TPLayout
    from pdserve.kvtransfer.factory import make_connector

    mc = engine.model_config
    world = 1 if engine.tp is None else engine.tp.world
    lay = TPLayout(rank, world, mc.num_heads, mc.num_kv_heads, mc.head_dim,
                   mc.intermediate_size, mc.vocab_size)
    heads = lay.kv_heads()
    return make_connector(
        transport, engine.runner.kv_cache, engine.kv_spec, model=str(mc.architecture),
        host=host, name=name if rank == 0 else f"{name}-r{rank}", lease_s=lease_s,
        channel_key=channel_key, kv_heads=(heads.start, heads.stop) if world > 1 else None,
        total_kv_heads=mc.num_kv_heads if world > 1 else None,
    )


class RankGroup:
    """Ranks 1..N-1 of a worker, created by rank 0. Not thread-safe: rank 0's driver thread
    calls ``check``; ``close`` is called once, at shutdown."""

    def __init__(self, config: EngineConfig, world: int, *, cpus_per_rank: float = 1.0,
                 gpus_per_rank: float = 0.0, strategy: str = "STRICT_PACK",
                 host: str = "127.0.0.1", timeout_s: float = 60.0, name: str = "worker",
                 ready_timeout_s: float = 300.0, kv: dict[str, Any] | None = None,
                 cpus: Sequence[Sequence[int]] | None = None) -> None:
        """``kv``: ``rank_connector``'s keyword arguments (the worker's KV transport), for
        a connector on every rank; None: no KV transfer (an engine alone). ``cpus``: the
        cores of ranks 1..N-1 (each pins itself to its own); None: not pinned."""
        from pdserve.engine.ports import free_port
        from pdserve.engine.tp_group import TPAddress

        self.world = world
        bundle: dict[str, float] = {"CPU": cpus_per_rank}
        if gpus_per_rank:
            bundle["GPU"] = gpus_per_rank
        if strategy == "STRICT_PACK":  # on rank 0's node, beside it
            bundle[f"node:{ray.util.get_node_ip_address()}"] = 0.001
        self.placement = placement_group([bundle] * (world - 1), strategy=strategy,
                                         name=f"pdserve-{name}-tp-{uuid.uuid4().hex[:6]}")
        try:
            ray.get(self.placement.ready(), timeout=ready_timeout_s)
        except Exception:
            remove_placement_group(self.placement)
            raise RuntimeError(
                f"{name}: Ray could not place {world - 1} more ranks of {bundle} "
                f"({strategy}) within {ready_timeout_s:.0f} s; is the cluster big enough "
                f"for tensor-parallel size {world}?") from None
        self.address = TPAddress(host, free_port(host), uuid.uuid4().hex, world, timeout_s,
                                 join_timeout_s=ready_timeout_s)
        threads = max(1, int(cpus_per_rank))
        self.actors = [
            ray.remote(RankActor).options(
                num_cpus=cpus_per_rank, num_gpus=gpus_per_rank, max_restarts=0,
                max_concurrency=4,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.placement, placement_group_bundle_index=rank - 1),
            ).remote(config, self.address, rank, threads, kv,
                     tuple(cpus[rank - 1]) if cpus else None)
            for rank in range(1, world)
        ]
        self._waits = [a.wait.remote() for a in self.actors]
        logger.info("%s: %d tensor-parallel rank actors placed (%s)", name, world - 1, strategy)

    def check(self) -> None:
        """Raise ``RankError`` if a rank actor stopped (died, or its loop failed)."""
        done, _ = ray.wait(self._waits, num_returns=1, timeout=0)
        if not done:
            return
        rank = self._waits.index(done[0]) + 1
        try:
            why = ray.get(done[0]) or "stopped"
        except Exception as e:  # the actor's process died
            why = f"died ({type(e).__name__})"
        raise RankError(f"tensor-parallel rank {rank} of {self.world}: {why}")

    def close(self) -> None:
        """End every rank actor and free the placement group."""
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        try:
            remove_placement_group(self.placement)
        except Exception:
            logger.debug("removing the placement group failed", exc_info=True)
