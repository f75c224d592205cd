"""How more routers find a running pdserve cluster: a named Ray actor, the directory.

The router that creates the pools (``pdserve serve``) also creates ``pdserve-directory`` in
the ``pdserve`` namespace of its Ray cluster. It holds what another router needs to serve
the same pools: the pool configuration (engine, lease, transport), the cluster's channel
key (it travels over Ray, whose own authentication guards that path, as it does for the
workers' actor arguments), the served model names and chat template, and the current
worker of each slot (its actor name and generation, updated as workers are replaced).
``pdserve router --ray-address ADDR`` looks it up by name (``fetch``) and then polls
``workers`` to follow replacements.

The directory is not detached: it belongs to the first router's driver, like the workers,
and goes with them. A second ``pdserve serve`` on the same Ray replaces it (the latest
cluster is the one found), with a warning.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

DIRECTORY_NAME = "pdserve-directory"


@dataclass(frozen=True, slots=True)
class WorkerEntry:
    """One worker slot's current actor."""

    worker_id: str
    role: str
    actor_name: str
    generation: int


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """What a router needs to serve a cluster another router started."""

    pools: Any  # PoolConfig (kept untyped: no import of the cluster module here)
    channel_key: Any  # ChannelKey
    served_model_names: tuple[str, ...] = ()
    chat_template: str | None = None
    owner: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Directory:
    """Ray actor body: the cluster's information and its worker slots."""

    def __init__(self, info: ClusterInfo) -> None:
        self._info = info
        self._workers: dict[str, WorkerEntry] = {}
        self._routers: dict[str, float] = {}

    def info(self) -> ClusterInfo:
        return self._info

    def set_worker(self, entry: WorkerEntry) -> None:
        """The slot ``entry.worker_id`` is now served by ``entry`` (a newer generation)."""
        old = self._workers.get(entry.worker_id)
        if old is None or entry.generation >= old.generation:
            self._workers[entry.worker_id] = entry

    def workers(self) -> list[WorkerEntry]:
        return sorted(self._workers.values(), key=lambda e: e.worker_id)

    def ping(self) -> str:
        return self._info.owner


def publish(info: ClusterInfo) -> Any:
    """Create the directory actor (replacing one left by another router); its handle."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pdserve.router.cluster import NAMESPACE

    try:
        old = ray.get_actor(DIRECTORY_NAME, namespace=NAMESPACE)
    except ValueError:
        old = None
    if old is not None:
        logger.warning("another pdserve cluster had published itself in this Ray; `pdserve "
                       "router` now attaches to this one")
        ray.kill(old, no_restart=True)
    # On this router's node: it lives as long as this router does, not as long as another.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    for attempt in range(50):
        try:
            return ray.remote(Directory).options(
                name=DIRECTORY_NAME, namespace=NAMESPACE, num_cpus=0, max_restarts=0,
                scheduling_strategy=here).remote(info)
        except ValueError:  # the killed one's name is not released yet
            if attempt == 49:
                raise
            time.sleep(0.1)


def fetch(timeout_s: float = 30.0) -> tuple[Any, ClusterInfo]:
    """(directory handle, its ``ClusterInfo``) of the cluster of the connected Ray;
    LookupError (saying what to do) when no pdserve cluster runs there."""
    import ray

    from pdserve.router.cluster import NAMESPACE

    try:
        handle = ray.get_actor(DIRECTORY_NAME, namespace=NAMESPACE)
    except ValueError:
        raise LookupError(
            f"no pdserve cluster in this Ray (no actor {DIRECTORY_NAME!r} in namespace "
            f"{NAMESPACE!r}): start one with `pdserve serve --ray-address ...` first") from None
    return handle, ray.get(handle.info.remote(), timeout=timeout_s)
