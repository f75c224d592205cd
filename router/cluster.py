"""Start or attach Ray, create the prefill and decode pools, watch them, replace the dead.

Workers are named Ray actors (``pdserve-prefill-0``, ``pdserve-decode-1`` in the
``pdserve`` namespace). The monitor pings every worker; one that does not answer is marked
dead (its in-flight requests are failed over by the router through ``on_death``) and a new
actor with a new KV agent takes its place. Each live worker also holds one ``watch`` call
open: it answers when the worker's engine loop stops and fails when its process dies, so
either is acted on at once, not at the next ping. The router's only state here is soft:
handles, liveness and the latest stats.

Several routers may serve one cluster. The one that creates the pools publishes a directory
(``pdserve.router.directory``); a router started with ``PoolConfig.attach`` creates no
pool: it reads the pools and the channel key from the directory and follows the workers it
lists, replacements included. Every router renews its lease on each worker with its pings
(``ping(router=inbox endpoint)``): a router that dies stops renewing, and the decode workers
end its requests once the lease is over.

Who replaces the dead, and what outlives whom, depends on the Ray the pool runs on:

- On a Ray the first router started itself (no ``--ray-address``), nothing outlives that
  router: the workers and the directory are its driver's actors, and it alone replaces dead
  workers. Stopping it stops the pool (and that Ray).
- On an existing Ray (``ray_address``: ``ray start --head``, KubeRay), the pool is
  *detached*: the workers and the directory are detached actors, so the death of any router,
  the first included, leaves the pool serving the others. Every router runs the monitor and
  fails over its own requests, but only the supervisor (elected through the directory with
  a heartbeat lease, ``supervisor_lease_s``) replaces the dead; when it dies, another
  router takes the lease within that time and replaces what died meanwhile. A router that
  stops cleanly leaves the pool to the routers still alive; the last one removes it (its
  workers and the directory), unless ``keep_pool`` is set (then ``pdserve stop`` removes
  it).

The cluster's ``ChannelKey`` (created here, or read from ``$PDSERVE_CHANNEL_SECRET``) goes
to every worker as an actor argument: it seals their side channels (KV handshakes, token
batches to the router's inbox).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import ray

from pdserve.decode_worker.worker import DecodeWorker
from pdserve.kvtransfer.auth import ChannelKey
from pdserve.prefill_worker.worker import PrefillWorker
from pdserve.router.pool_config import PoolConfig, plan_worker_cpus
from pdserve.worker.base import LOG_LEVEL_ENV
from pdserve.worker.idle_cores import CoreShare, make_flag, make_flag_dir, plan_lending

logger = logging.getLogger(__name__)

NAMESPACE = "pdserve"


@dataclass(slots=True, eq=False)
class WorkerHandle:
    """The router's view of one worker (one incarnation of it)."""

    worker_id: str
    role: str
    actor: Any
    generation: int = 0
    alive: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


class Superseded(Exception):
    """Another router's replacement of the same dead worker reached the directory first."""


DeathCallback = Callable[[WorkerHandle], Awaitable[None]]
ReadyCallback = Callable[[WorkerHandle], None]


class Cluster:
    """Owns the worker pools of one router process."""

    def __init__(self, config: PoolConfig, channel_key: ChannelKey | None = None) -> None:
        self.config = config
        self.workers: dict[str, WorkerHandle] = {}
        self._started_ray = False
        self.detached = False
        """The workers and the directory outlive this router (a pool on an existing Ray)."""
        self.supervising = not config.attach
        """This router replaces dead workers (the pool's creator until the directory says
        otherwise)."""
        self._dead: set[str] = set()  # slots whose worker died and is not replaced yet
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._on_death: DeathCallback | None = None
        self._replacing: set[str] = set()
        self._watches: set[asyncio.Task[None]] = set()
        self._closing = False
        self.channel_key = channel_key or ChannelKey.from_env()
        self.router_endpoint: str | None = None
        """This router's token inbox: sent with every ping to renew its lease on workers."""
        self.on_ready: list[ReadyCallback] = []
        """Called (on the loop) with each worker that becomes ready, replacements included."""
        self.directory: Any = None
        self._follower: asyncio.Task[None] | None = None
        self.instance = uuid.uuid4().hex[:6]  # keeps actor names unique per router
        self._cpu_sets: dict[str, tuple[int, ...]] = {}
        self._sharing: dict[str, CoreShare] = {}
        self._flag_dir: str | None = None
        self.restarts = 0
        """Workers replaced since start (each death counts once)."""

    # ------------------------------------------------------------------ lifecycle

    def connect(self) -> None:
        """Attach to ``ray_address`` (or RAY_ADDRESS), else start a local Ray."""
        if ray.is_initialized():
            return
        address = self.config.ray_address or os.environ.get("RAY_ADDRESS")
        level = logging.getLevelName(logging.getLogger("pdserve").getEffectiveLevel())
        env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", LOG_LEVEL_ENV: level}}
        if address:
            ray.init(address=address, namespace=NAMESPACE, runtime_env=env,
                     log_to_driver=True)
        else:
            cfg = self.config
            logical_cpus = max(os.cpu_count() or 1,
                               int(cfg.total_ranks() * cfg.cpus_per_worker) + 1)
            # Ray gives its GCS 30 s to bind a port; a loaded machine (a CI runner, a node busy
            # starting other processes) may need longer. (The start-up timeouts once seen in
            # CI were a hung fork, which serve() now avoids by starting Ray before gRPC.)
            os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
            # address="local": a new Ray of our own even when a `ray start` head runs on
            # this machine (ray.init() would attach to it and refuse num_cpus).
            ray.init(address="local", num_cpus=logical_cpus, namespace=NAMESPACE,
                     runtime_env=env, include_dashboard=False, log_to_driver=True)
            self._started_ray = True
            logger.info("Ray: this cluster's address is %s (`pdserve router --ray-address "
                        "%s` adds a router)", ray.get_runtime_context().gcs_address,
                        ray.get_runtime_context().gcs_address)

    async def start(self, on_connected: Callable[[], None] | None = None) -> None:
        """Create every worker and wait until all are ready (``on_connected()`` once Ray is
        connected). Cancelling it leaves the workers created so far to ``shutdown``."""
        started = time.monotonic()
        self.connect()
        logger.info("Ray: %s in %.1f s", "started a local instance" if self._started_ray
                    else f"attached to {self.config.ray_address or os.environ.get('RAY_ADDRESS')}",
                    time.monotonic() - started)
        if on_connected is not None:
            on_connected()
        started = time.monotonic()
        if self.config.attach:
            await self._attach()
            return
        cfg = self.config
        self.detached = not self._started_ray and bool(
            cfg.ray_address or os.environ.get("RAY_ADDRESS"))
        if self.detached:
            from pdserve.router.directory import check_no_detached_pool

            await asyncio.to_thread(check_no_detached_pool)
        if cfg.pin_cpus or (cfg.pin_cpus is None and self._started_ray):
            self._cpu_sets = plan_worker_cpus(sorted(os.sched_getaffinity(0)), cfg)
            logger.info("worker cores: %s", self._cpu_sets or "shared (fewer cores than workers)")
            if cfg.share_idle_cores and self._cpu_sets:
                self._share_idle_cores()
        handles = [self._create("prefill", i) for i in range(self.config.num_prefill)]
        handles += [self._create("decode", i) for i in range(self.config.num_decode)]
        await asyncio.gather(*(self._wait_ready(h) for h in handles))
        logger.info("%d prefill + %d decode workers loaded the model and are ready in %.1f s",
                    self.config.num_prefill, self.config.num_decode, time.monotonic() - started)

    async def _attach(self) -> None:
        """Follow the workers the directory lists (``attach`` mode)."""
        from pdserve.router.directory import fetch

        self.directory, info = await asyncio.to_thread(fetch)
        self.channel_key = info.channel_key
        self.detached = info.detached
        entries = await self.directory.workers.remote()
        await asyncio.gather(*(self._wait_ready(self._handle_of(e)) for e in entries))
        logger.info("attached to %d workers of a running cluster%s", len(entries),
                    " (detached: any router may replace dead workers)" if self.detached else "")
        self._follow_directory()

    def _follow_directory(self) -> None:
        loop = asyncio.get_running_loop()
        self._follower = loop.create_task(self._follow())
        if self.detached or not self.config.attach:
            self._heartbeat_task = loop.create_task(self._heartbeat())

    def _handle_of(self, entry: Any) -> WorkerHandle:
        actor = ray.get_actor(entry.actor_name, namespace=NAMESPACE)
        handle = WorkerHandle(entry.worker_id, entry.role, actor, entry.generation)
        self.workers[entry.worker_id] = handle
        return handle

    async def _follow(self) -> None:
        """Pick up the replacements another router (the supervisor) creates."""
        while not self._closing:
            await asyncio.sleep(self.config.ping_interval_s)
            try:
                entries = await self.directory.workers.remote()
            except ray.exceptions.RayError as exc:
                if self._closing or not (self.config.attach or self.detached):
                    return  # another `pdserve serve` replaced it; this pool is ours
                logger.error("the cluster's directory is gone (the pool was stopped?): %r", exc)
                for handle in list(self.workers.values()):
                    await self.report_dead(handle, "the cluster's directory is gone")
                return
            for entry in entries:
                known = self.workers.get(entry.worker_id)
                if known is not None and known.generation >= entry.generation:
                    continue
                if known is not None and known.alive:
                    await self.report_dead(known, "replaced by the cluster's supervisor")
                try:
                    await self._wait_ready(self._handle_of(entry))
                except Exception as exc:  # gone: the supervisor replaces it
                    logger.warning("worker %s (generation %d) not reachable: %r",
                                   entry.worker_id, entry.generation, exc)
                    self._dead.add(entry.worker_id)

    async def _heartbeat(self) -> None:
        """Tell the directory this router is alive; stand for supervisor (any router of a
        detached pool, else the creator alone); as supervisor, replace the workers whose
        death was seen while another router held the duty."""
        candidate = self.detached or not self.config.attach
        # The creator of a pool that is not detached is its only supervisor, directory or
        # not (another cluster publishing itself in the same Ray replaces the directory).
        sole = candidate and not self.detached
        ttl = self.config.supervisor_lease_s
        while not self._closing and self.directory is not None:
            try:
                holder = await asyncio.wait_for(
                    self.directory.heartbeat.remote(self.instance, ttl, candidate), ttl)
            except ray.exceptions.ActorDiedError as exc:  # for good: say it once
                if not self._closing:
                    logger.error("the cluster's directory is gone (the pool was stopped, or "
                                 "another cluster replaced it); no more heartbeats: %r", exc)
                self.supervising = sole
                if sole:
                    self.directory = None  # replacements are not published any more
                return
            except (TimeoutError, ray.exceptions.RayError) as exc:
                logger.warning("heartbeat to the cluster's directory failed: %r", exc)
                holder = self.instance if sole else ""
            if (holder == self.instance) != self.supervising:
                logger.info("this router %s replaces dead workers",
                            "now" if holder == self.instance else "no longer")
            self.supervising = holder == self.instance
            if self.supervising:
                for worker_id in sorted(self._dead - self._replacing):
                    asyncio.get_running_loop().create_task(
                        self._replace(self.workers[worker_id]))
            await asyncio.sleep(self.config.ping_interval_s)

    def publish(self, info: Any) -> None:
        """Owner: publish the directory other routers attach with (``ClusterInfo``)."""
        from pdserve.router.directory import WorkerEntry, publish

        self.directory = publish(replace(info, detached=self.detached))
        for h in self.workers.values():
            self.directory.set_worker.remote(WorkerEntry(h.worker_id, h.role,
                                                         self._actor_name(h), h.generation))
        self._follow_directory()

    def _actor_name(self, handle: WorkerHandle) -> str:
        return f"pdserve-{self.instance}-{handle.worker_id}-g{handle.generation}"

    def _create(self, role: str, index: int, generation: int = 0) -> WorkerHandle:
        cfg = self.config
        worker_id = f"{role}-{index}"
        cls = PrefillWorker if role == "prefill" else DecodeWorker
        resources = cfg.prefill_resources if role == "prefill" else cfg.decode_resources
        actor_cls = ray.remote(cls).options(
            name=f"pdserve-{self.instance}-{worker_id}-g{generation}",
            namespace=NAMESPACE,
            num_cpus=cfg.cpus_per_worker,
            num_gpus=cfg.gpus_per_worker,
            resources=dict(resources) or None,
            max_restarts=0,
            max_concurrency=1000,
            **({"lifetime": "detached"} if self.detached else {}),
        )
        extra: dict[str, Any] = {"kv_transport": cfg.kv_transport}
        if cfg.tp(role, index) > 1:  # ranks 1..N-1: Ray actors the worker places beside it
            extra.update(tensor_parallel_size=cfg.tp(role, index),
                         cpus_per_rank=cfg.cpus_per_worker,
                         gpus_per_rank=cfg.gpus_per_worker)
        if role == "prefill":
            extra["stream_kv"] = cfg.stream_kv
        if worker_id in self._cpu_sets:
            extra["cpus"] = self._cpu_sets[worker_id]
        if worker_id in self._sharing:
            extra["share"] = self._sharing[worker_id]
        actor = actor_cls.remote(worker_id, cfg.engine, cfg.kv_host, cfg.lease_s,
                                 channel_key=self.channel_key, **extra)
        handle = WorkerHandle(worker_id, role, actor, generation)
        self.workers[worker_id] = handle
        return handle

    async def _wait_ready(self, handle: WorkerHandle, publish: bool = False) -> None:
        """Wait until ``handle``'s worker is ready and serve it; ``publish``: it is this
        router's replacement, which the directory must take first (``Superseded`` when
        another supervisor's replacement of the same death got there first)."""
        handle.info = await asyncio.wait_for(handle.actor.info.remote(),
                                             self.config.start_timeout_s)
        if publish and self.directory is not None:
            from pdserve.router.directory import WorkerEntry

            try:
                taken = await self.directory.set_worker.remote(WorkerEntry(
                    handle.worker_id, handle.role, self._actor_name(handle),
                    handle.generation))
            except ray.exceptions.ActorDiedError:
                if self.detached:
                    raise
                taken, self.directory = True, None  # gone (replaced): the pool is still ours
            if not taken:
                raise Superseded(handle.worker_id)
        handle.alive = True
        self._dead.discard(handle.worker_id)
        logger.info("worker %s (generation %d) ready: %s", handle.worker_id,
                    handle.generation, handle.info)
        for callback in self.on_ready:
            callback(handle)
        if not self._closing:
            task = asyncio.get_running_loop().create_task(self._watch_one(handle))
            self._watches.add(task)
            task.add_done_callback(self._watches.discard)

    async def _watch_one(self, handle: WorkerHandle) -> None:
        """One open ``watch`` call per live worker: its answer (loop stopped) or its failure
        (process gone) reports the worker dead at once."""
        try:
            why: object = await handle.actor.watch.remote()
        except ray.exceptions.RayError as exc:
            why = exc
        if why == "shutdown" or self._closing:
            return
        await self.report_dead(handle, why)

    def run_monitor(self, on_death: DeathCallback) -> None:
        self._on_death = on_death
        self._monitor = asyncio.get_running_loop().create_task(self._watch())

    async def report_dead(self, handle: WorkerHandle, why: object) -> None:
        """``handle``'s actor is gone (a call to it raised ``ActorDiedError``, or it failed
        its liveness check): take it out of its pool now, fail over what it held, and start
        a replacement. Later reports of the same death do nothing."""
        if not handle.alive or self._closing:
            return
        handle.alive = False
        self._dead.add(handle.worker_id)
        self.restarts += 1
        logger.error("worker %s died (%r); failing over%s", handle.worker_id, why,
                     " and replacing it" if self.supervising else "")
        if self._on_death is not None:
            await self._on_death(handle)
        if self.supervising:
            asyncio.get_running_loop().create_task(self._replace(handle))

    async def shutdown(self) -> None:
        """Stop the monitor and every worker; leave no pdserve actor behind."""
        self._closing = True
        if self._monitor is not None:
            self._monitor.cancel()
        for task in list(self._watches):
            task.cancel()
        if self._follower is not None:
            self._follower.cancel()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        if self.detached and self.directory is not None:
            await self._leave()
            return
        if self.config.attach:  # the workers belong to the cluster's first router
            return

        async def stop(handle: WorkerHandle) -> None:
            try:
                await asyncio.wait_for(handle.actor.shutdown.remote(), 5.0)
            except Exception:  # dying anyway
                pass
            ray.kill(handle.actor, no_restart=True)
            handle.alive = False

        await asyncio.gather(*(stop(h) for h in self.workers.values()))
        if self._flag_dir is not None:
            shutil.rmtree(self._flag_dir, ignore_errors=True)
        if self._started_ray:
            ray.shutdown()

    def _share_idle_cores(self) -> None:
        """Plan the pinned workers' lending of idle cores and make their busy flags."""
        cfg = self.config
        prefill = [f"prefill-{i}" for i in range(cfg.num_prefill) if cfg.tp("prefill", i) == 1]
        decode = [f"decode-{i}" for i in range(cfg.num_decode) if cfg.tp("decode", i) == 1]
        self._flag_dir = make_flag_dir()
        self._sharing = plan_lending(self._cpu_sets, prefill, decode, self._flag_dir)
        for share in self._sharing.values():
            if share.flag is not None:
                make_flag(share.flag)
        logger.info("idle cores lent: %s", {w: [c for _, cores in s.borrow for c in cores]
                                            for w, s in self._sharing.items()})

    # ------------------------------------------------------------------ queries

    def pool(self, role: str) -> list[WorkerHandle]:
        return [h for h in self.workers.values() if h.role == role and h.alive]

    @property
    def block_size(self) -> int:
        return self.config.engine.cache.block_size

    def max_model_len(self) -> int:
        lens = [h.info.get("max_model_len", 0) for h in self.workers.values() if h.info]
        return min(lens) if lens else 0

    # ------------------------------------------------------------------ monitoring

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.ping_interval_s)
            checks = [h for h in self.workers.values() if h.alive]
            results = await asyncio.gather(*(self._probe(h) for h in checks))
            for handle, ok in zip(checks, results, strict=True):
                if not ok:
                    await self.report_dead(handle, "liveness check failed")

    async def _probe(self, handle: WorkerHandle) -> bool:
        """Liveness from ``ping`` (answered by the actor's event loop, never queued behind
        an engine step), then fresh stats if they come in time: a worker slow to report
        under load keeps its last stats instead of being declared dead."""
        try:
            await asyncio.wait_for(handle.actor.ping.remote(self.router_endpoint),
                                   self.config.ping_timeout_s)
        except (TimeoutError, ray.exceptions.RayError, RuntimeError) as exc:
            logger.warning("worker %s failed its liveness check: %r", handle.worker_id, exc)
            return False
        try:
            handle.stats = await asyncio.wait_for(handle.actor.stats.remote(),
                                                  self.config.ping_timeout_s)
        except TimeoutError:
            logger.info("worker %s: stats late; keeping the last ones", handle.worker_id)
        except ray.exceptions.RayError as exc:
            logger.warning("worker %s failed to report stats: %r", handle.worker_id, exc)
            return False
        return True

    async def _leave(self) -> None:
        """Detached pool: leave it to the routers still alive, else remove it (unless
        ``keep_pool``)."""
        from pdserve.router.directory import remove_pool

        try:
            others = await asyncio.wait_for(self.directory.leave.remote(self.instance), 10.0)
        except (TimeoutError, ray.exceptions.RayError) as exc:
            logger.warning("could not tell the cluster's directory this router stops: %r", exc)
            return
        if others:
            logger.info("the pool stays with %d other router(s)", len(others))
        elif self.config.keep_pool:
            logger.info("last router: the pool stays (--keep-pool); `pdserve stop` removes it")
        else:
            logger.info("last router: removing the pool")
            await asyncio.to_thread(remove_pool)

    def kill_all(self) -> None:
        """Kill every worker now, without draining (a second Ctrl-C). A detached pool is
        left to ``shutdown`` (removed only by the last router)."""
        self._closing = True
        for handle in self.workers.values():
            handle.alive = False
            if self.config.attach or self.detached:
                continue
            try:
                ray.kill(handle.actor, no_restart=True)
            except Exception:  # already gone
                pass

    async def _replace(self, dead: WorkerHandle) -> None:
        if dead.worker_id in self._replacing or self._closing:
            return
        self._replacing.add(dead.worker_id)
        first = dead
        try:
            try:
                ray.kill(dead.actor, no_restart=True)
            except Exception:  # already gone
                pass
            index = int(dead.worker_id.rsplit("-", 1)[1])
            while not self._closing:
                handle = self._create(dead.role, index, dead.generation + 1)
                try:
                    await self._wait_ready(handle, publish=True)
                    return
                except Superseded:
                    logger.info("%s was replaced by another router first", dead.worker_id)
                    ray.kill(handle.actor, no_restart=True)
                    self.workers[dead.worker_id] = first  # `_follow` takes the winner
                    self._dead.discard(dead.worker_id)
                    return
                except Exception as exc:
                    logger.error("replacing %s failed: %r; retrying", dead.worker_id, exc)
                    ray.kill(handle.actor, no_restart=True)
                    dead = handle
                    await asyncio.sleep(1.0)
        finally:
            self._replacing.discard(dead.worker_id)
