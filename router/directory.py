"""How more routers find a running pdserve cluster: a named Ray actor, the directory.

The router that creates the pools (``pdserve serve``) also creates ``pdserve-directory`` in
the ``pdserve`` namespace of its Ray cluster. It holds what another router needs to serve
the same pools: the pool configuration (engine, lease, transport), the cluster's channel
key (it travels over Ray, whose own authentication guards that path, as it does for the
workers' actor arguments), the served model names and chat template, and the current
worker of each slot (its actor name and generation, updated as workers are replaced).
``pdserve router --ray-address ADDR`` looks it up by name (``fetch``) and then polls
``workers`` to follow replacements.

It is also where the routers agree on two things, each router calling ``heartbeat`` every
ping interval:

- **Who replaces dead workers** (the supervisor): the first candidate to ask holds a lease of
  ``ttl_s`` seconds, renewed by each of its heartbeats; a router that stops heartbeating (it
  died, or its loop stalled past the lease) loses it to the next candidate that asks. An
  election in the directory rather than a supervisor inside the directory actor: the
  routers already hold everything replacing a worker needs (the monitor, the ``watch``
  calls, the failover of what the dead worker held), so the duty moves between routers
  with no second implementation of it, and the directory stays a small passive record.
- **Who is the last router** (``leave``): a router that stops cleanly says so, and learns
  whether another router is still alive (heartbeated within its ``ttl_s``). The last one
  out tears the pool down, unless told to keep it.

Whether the pool outlives its routers is fixed by the first router (``ClusterInfo.detached``).
A pool on a Ray the first router started itself is not detached: the directory and the
workers belong to that router's driver and go with it (and so does that Ray); the other
routers never supervise. A pool on an existing Ray (``--ray-address``) is detached: the
directory and every worker are detached actors, which outlive any router, and the routers
elect a supervisor as above. A second ``pdserve serve`` on the same Ray replaces a
non-detached directory (the latest cluster is the one found), with a warning, but refuses to
start beside a detached pool (``pdserve router`` serves it; ``pdserve stop`` removes it).

Limits: the directory is one actor with no restart (a detached one is placed by Ray, a
non-detached one on the first router's node); if its node goes, the routers lose the
record and fail their workers over as dead. Two routers may both hold the duty for a moment
(one stalled past its lease, not yet told); ``set_worker`` keeps the first replacement of
a death that is ready and the other router drops its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
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
    detached: bool = False
    """The directory and the workers are detached actors: the pool outlives its routers."""
    extra: dict[str, Any] = field(default_factory=dict)


class Directory:
    """Ray actor body: the cluster's information and its worker slots."""

    def __init__(self, info: ClusterInfo,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._info = info
        self._clock = clock
        self._workers: dict[str, WorkerEntry] = {}
        self._routers: dict[str, float] = {}  # router -> when its heartbeat lapses
        self._supervisor = ""
        self._supervisor_until = 0.0

    def info(self) -> ClusterInfo:
        return self._info

    def set_worker(self, entry: WorkerEntry) -> bool:
        """The slot ``entry.worker_id`` is now served by ``entry``, unless the slot already
        has a newer generation or another actor of the same one (two supervisors raced to
        replace one death: the first to be ready wins); whether it was taken."""
        old = self._workers.get(entry.worker_id)
        if old is not None and (entry.generation < old.generation or (
                entry.generation == old.generation and entry.actor_name != old.actor_name)):
            return False
        self._workers[entry.worker_id] = entry
        return True

    def workers(self) -> list[WorkerEntry]:
        return sorted(self._workers.values(), key=lambda e: e.worker_id)

    def ping(self) -> str:
        return self._info.owner

    def heartbeat(self, router: str, ttl_s: float, candidate: bool) -> str:
        """``router`` is alive for ``ttl_s`` more seconds; a ``candidate`` takes the
        supervisor's lease when it is free or lapsed (and renews it when it holds it).
        Returns the supervisor ("" when none)."""
        now = self._clock()
        self._routers[router] = now + ttl_s
        if candidate and (self._supervisor in ("", router) or self._supervisor_until < now):
            if self._supervisor != router:
                logger.info("router %s now replaces dead workers (was %r)", router,
                            self._supervisor)
            self._supervisor, self._supervisor_until = router, now + ttl_s
        return self._supervisor

    def leave(self, router: str) -> list[str]:
        """``router`` stops (releasing the supervisor's lease if it held it); the routers
        still alive."""
        self._routers.pop(router, None)
        if self._supervisor == router:
            self._supervisor = ""
        now = self._clock()
        return sorted(r for r, until in self._routers.items() if until >= now)


def publish(info: ClusterInfo) -> Any:
    """Create the directory actor (replacing a non-detached one left by another router), a
    detached actor when ``info.detached``; its handle."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pdserve.router.cluster import NAMESPACE

    try:
        old = ray.get_actor(DIRECTORY_NAME, namespace=NAMESPACE)
    except ValueError:
        old = None
    if old is not None:
        check_no_detached_pool()  # (the first router checked before creating its workers)
        logger.warning("another pdserve cluster had published itself in this Ray; `pdserve "
                       "router` now attaches to this one")
        ray.kill(old, no_restart=True)
    # On this router's node: it lives as long as this router does, not as long as another.
    # A detached one outlives this router wherever it is, and goes where Ray places it.
    options: dict[str, Any] = {"lifetime": "detached"} if info.detached else {
        "scheduling_strategy": NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)}
    for attempt in range(50):
        try:
            return ray.remote(Directory).options(
                name=DIRECTORY_NAME, namespace=NAMESPACE, num_cpus=0, max_restarts=0,
                **options).remote(info)
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


class PoolExistsError(RuntimeError):
    """A detached pool already runs in this Ray (``pdserve serve`` refuses to start)."""


def check_no_detached_pool() -> None:
    """``PoolExistsError`` (saying what to do) when the connected Ray already holds a detached
    pdserve pool: a second ``pdserve serve`` must not orphan its workers."""
    import ray

    from pdserve.router.cluster import NAMESPACE

    try:
        handle = ray.get_actor(DIRECTORY_NAME, namespace=NAMESPACE)
        info = ray.get(handle.info.remote(), timeout=30.0)
    except (ValueError, ray.exceptions.RayError):
        return
    if info.detached:
        raise PoolExistsError(
            "a pdserve pool already runs in this Ray (its workers outlive their routers): "
            "serve it with `pdserve router --ray-address ...`, or remove it first with "
            "`pdserve stop --ray-address ...`")


def remove_pool() -> int:
    """Stop every pdserve actor of the connected Ray (``pdserve stop``, and the last router
    to leave a detached pool): each worker (its engine and KV agent first; its rank actors
    go with it) and the directory. Every named actor of the ``pdserve`` namespace, not only
    those the directory lists: a replacement still loading when its supervisor died is
    found too. How many actors were stopped (0: no pool there)."""
    import ray

    from pdserve.router.cluster import NAMESPACE

    actors = []
    for named in ray.util.list_named_actors(all_namespaces=True):
        if named["namespace"] != NAMESPACE or not named["name"].startswith("pdserve-"):
            continue
        try:
            actors.append((named["name"], ray.get_actor(named["name"], namespace=NAMESPACE)))
        except ValueError:  # gone meanwhile
            pass
    workers = [a for name, a in actors if name != DIRECTORY_NAME]
    if workers:
        ray.wait([a.shutdown.remote() for a in workers], num_returns=len(workers), timeout=5.0)
    for _, actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass
    return len(actors)
