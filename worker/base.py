"""What both worker roles are made of: one ``Engine`` on its own ``EngineDriver`` thread,
one KV connector around the engine's KV cache (``kv_transport``: NIXL, or torch.distributed
with "nccl"), and the Ray methods every worker answers
(``ping``, ``watch``, ``info``, ``abort``, ``stats``, ``kv_snapshot``, ``lend``,
``shutdown``). Either role may lend its cached blocks to a prefill worker that pulls them
(``lend``, the cluster-wide prefix pool: ``pdserve.worker.lending``).

Every worker pushes its KV events and load to the routers as they happen
(``pdserve.worker.events``: a sealed ZMQ PUB socket, numbered messages, published on the
driver thread after every engine step and tick); ``kv_snapshot`` is what a router that lost
messages resyncs from. ``ping(router=endpoint)`` doubles as each router's lease renewal: the
decode role ends the requests of a router silent for longer than the lease (it died), so
nothing a dead router held stays on the workers.

A role subclasses ``EngineWorker``, sets up its own state, then calls ``start_driver``;
it provides the driver hooks ``_on_outputs`` / ``_on_tick`` and ``_abort`` (all run on the
driver thread) and may add fields to ``stats`` through ``_extra_stats``.

``channel_key`` is the cluster's secret (``pdserve.kvtransfer.auth``): every message this
worker sends or accepts on a side channel (KV handshakes, token batches) is sealed with it.
An abort names request ids it has not seen yet too: such ids are remembered for
``2 * lease_s`` (``Tombstones``) and a late reserve or prefill of one is refused, so a
cancel that overtakes its request never leaves blocks behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from pdserve.engine.config import EngineConfig
from pdserve.engine.driver import EngineDriver, EngineStoppedError
from pdserve.engine.outputs import RequestOutput
from pdserve.kvtransfer.auth import ChannelKey
from pdserve.worker.affinity import pin_process, split_cpus
from pdserve.worker.events import LOAD_FIELDS, EventPublisher
from pdserve.worker.idle_cores import CoreBorrower, CoreShare, open_flag
from pdserve.worker.lending import Lender
from pdserve.worker.protocol import LendRequest, resolve_host

if TYPE_CHECKING:
    from pdserve.engine.engine import Engine
    from pdserve.kvtransfer.base import KVConnector, PollResult
    from pdserve.worker.tp_ranks import RankGroup

logger = logging.getLogger(__name__)


LOG_LEVEL_ENV = "PDSERVE_LOG_LEVEL"
"""The router's log level, passed to its workers (their lines reach the router's output)."""


def _log_like_the_router() -> None:
    """Send this process's ``pdserve.*`` records to stderr at the router's level, once."""
    level = os.environ.get(LOG_LEVEL_ENV)
    root = logging.getLogger("pdserve")
    if not level or root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


class EngineWorker:
    """Base of ``PrefillWorker`` and ``DecodeWorker`` (Ray actor bodies)."""

    role = "worker"

    def __init__(self, worker_id: str, config: EngineConfig, host: str = "127.0.0.1",
                 lease_s: float = 30.0, kv_transport: str = "nixl", *,
                 channel_key: ChannelKey, cpus: Sequence[int] | None = None,
                 share: CoreShare | None = None, tensor_parallel_size: int = 1,
                 cpus_per_rank: float = 1.0, gpus_per_rank: float = 0.0) -> None:
        # Imported here, in the worker's process: the router imports this module to create
        # the actors and must not load torch or NIXL.
        from pdserve.engine.engine import Engine
        from pdserve.worker.tp_connector import RankedConnector
        from pdserve.worker.tp_ranks import rank_connector

        _log_like_the_router()
        rank_cpus = split_cpus(cpus, tensor_parallel_size) if cpus else None
        if rank_cpus:  # this worker's own cores (router.cluster plans them per host)
            pin_process(rank_cpus[0])
        self.worker_id = worker_id
        self.kv_transport = kv_transport
        self.channel_key = channel_key
        self.lease_s = lease_s
        config = replace(config, detokenize=False)
        kv = {"transport": kv_transport, "host": resolve_host(host), "name": worker_id,
              "lease_s": lease_s, "channel_key": channel_key}
        self.ranks: RankGroup | None = None
        self._ranks_checked = 0.0
        # Idle cores lent and borrowed (pdserve.worker.idle_cores): pinned single-rank workers.
        share = share if rank_cpus and tensor_parallel_size == 1 else None
        self.busy_flag = open_flag(share.flag) if share and share.flag else None
        # The engine is made on the thread that will step it (see pdserve.engine.driver).
        self.driver = EngineDriver(None, self._outputs_then_publish, self._tick_then_publish,
                                   name=f"{worker_id}-loop", on_stop=self._on_stop,
                                   hold=self._hold, quiet=self._quiet,
                                   on_busy=self.busy_flag.set if self.busy_flag else None)
        """Steps the engine from ``start_driver`` on (the role's own state is set up by then)."""

        def make() -> Engine:
            if tensor_parallel_size == 1:
                return Engine(config)
            engine, self.ranks = self._start_ranks(config, tensor_parallel_size, kv,
                                                   cpus_per_rank, gpus_per_rank, rank_cpus)
            return engine

        self.engine = self.driver.build(make)
        self.borrower: CoreBorrower | None = None
        if share and share.borrow and rank_cpus:
            self.borrower = CoreBorrower(rank_cpus[0], share.borrow)
            self.engine.runner.pinning.cores_for_step = self.borrower.cores
        local = rank_connector(self.engine, rank=0, **kv)
        self.connector: KVConnector = RankedConnector(
            local, tensor_parallel_size,
            getattr(self.engine.runner, "call_ranks", None),
            self.engine.model_config.num_kv_heads, kv_transport)
        self.agent_name = self.connector.describe().agent_name  # new per worker process
        self.lender = Lender(worker_id, self.engine, self.connector)
        self.events = EventPublisher(worker_id, self.agent_name, channel_key, resolve_host(host))
        self.routers_seen: dict[str, float] = {}
        """Router inbox endpoint -> ``time.monotonic()`` of its last ping (lease renewal)."""
        self.tombstones = Tombstones(2 * lease_s)
        self._stopping = False
        self._stopped = threading.Event()
        self._watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._watch_lock = threading.Lock()

    def _start_ranks(self, config: EngineConfig, world: int, kv: dict[str, Any],
                     cpus_per_rank: float, gpus_per_rank: float,
                     rank_cpus: list[tuple[int, ...]] | None,
                     ) -> tuple[Engine, RankGroup]:
        """Place ranks 1..world-1 beside this process (rank 0) and build rank 0's engine
        (``rank_cpus``: each rank's cores, rank 0's already pinned; None: not pinned)."""
        import torch

        from pdserve.engine.engine import Engine, resolve_device
        from pdserve.engine.tp_group import TPGroup
        from pdserve.worker.tp_ranks import RankGroup

        device = resolve_device(config.device)
        if device.type == "cuda":
            device = torch.device("cuda:0")  # this actor's one GPU
            config = replace(config, device="cuda:0")
        if rank_cpus is None:
            torch.set_num_threads(max(1, int(cpus_per_rank)))
        ranks = RankGroup(config, world, cpus_per_rank=cpus_per_rank,
                          gpus_per_rank=gpus_per_rank, name=self.worker_id,
                          timeout_s=self.lease_s, kv=kv,
                          cpus=rank_cpus[1:] if rank_cpus else None)
        try:
            group = TPGroup(ranks.address, 0, device, watch=ranks.check)
            return Engine(config, tp=group), ranks
        except BaseException:
            ranks.close()
            raise

    def _check_ranks(self) -> None:
        """Raise ``RankError`` when a rank of this worker stopped (checked every 0.1 s): a
        rank that stopped stops this worker's loop, so the worker goes down as one unit."""
        now = time.monotonic()
        if self.ranks is not None and now - self._ranks_checked > 0.1:
            self._ranks_checked = now
            self.ranks.check()

    def start_driver(self) -> None:
        self.driver.start()
        logger.info("%s ready (pid %d), kv agent %s over %s", self.worker_id, os.getpid(),
                    self.agent_name, self.kv_transport)

    # ------------------------------------------------------------------ hooks

    def _outputs_then_publish(self, outputs: list[RequestOutput]) -> None:
        self._on_outputs(outputs)
        self._publish()

    def _tick_then_publish(self) -> None:
        self._check_ranks()
        result = self.connector.poll()
        self.lender.take(result)  # blocks lent to pullers: given back here
        self._on_tick(result)
        self._publish()

    def _load(self) -> dict[str, float]:
        """The load figures pushed with the events (driver thread)."""
        s = asdict(self.engine.stats())
        s.update(self._extra_stats())
        return {k: float(s[k]) for k in LOAD_FIELDS if k in s}

    def _publish(self) -> None:
        """Push the engine's KV events and load, if anything changed (driver thread)."""
        self.events.maybe_publish(self.engine.take_kv_events(), self._load())

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        raise NotImplementedError

    def _on_tick(self, result: PollResult) -> None:
        """Every turn of the loop, with what the connector reported since the last one
        (less the transfers of blocks this worker lent)."""
        raise NotImplementedError

    def _abort(self, engine: Engine, request_id: str, writes_done: bool) -> bool:
        raise NotImplementedError

    def _extra_stats(self) -> dict[str, Any]:
        return {}

    def _quiet(self) -> bool:
        """Whether nothing this worker started is in flight: no blocks lent, and nothing
        of the role's own (driver thread; the engine's requests are checked apart). The
        loop ticks less often while idle and quiet (see ``EngineDriver``)."""
        return self.lender.idle() and self._role_quiet()

    def _role_quiet(self) -> bool:
        raise NotImplementedError

    def _hold(self) -> bool:
        """Whether the loop skips this busy turn's step (driver thread; see
        ``EngineDriver``)."""
        return False

    # ------------------------------------------------------------------ Ray methods

    async def ping(self, router: str | None = None) -> str:
        """Liveness; ``router`` (its token inbox endpoint) renews that router's lease."""
        if router is not None:
            self.routers_seen[router] = time.monotonic()
        driver = self.driver
        if not driver.alive:
            raise EngineStoppedError(f"{self.worker_id}: engine loop stopped: {driver.error!r}")
        return self.worker_id

    async def watch(self) -> str:
        """Answers only when the engine loop has stopped, with why. The router keeps one
        call open per worker: a loop that stops is seen at once (and a dead process fails
        the call at once), not at the next liveness check."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._watch_lock:
            if not self._stopped.is_set():
                self._watchers.append((loop, fut))
                waiting = True
            else:
                waiting = False
        if waiting:
            await fut
        if self._stopping:
            return "shutdown"
        error = self.driver.error
        return f"engine loop stopped: {type(error).__name__ if error else 'no error'}"

    def _on_stop(self, error: BaseException | None) -> None:
        """Driver thread, last thing it does."""
        with self._watch_lock:
            self._stopped.set()
            watchers, self._watchers = self._watchers, []
        for loop, fut in watchers:
            loop.call_soon_threadsafe(lambda f=fut: f.done() or f.set_result(None))

    async def info(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "pid": os.getpid(),
                "block_size": self.engine.kv_spec.block_size,
                "num_blocks": self.engine.num_blocks,
                "max_model_len": self.engine.max_model_len,
                "events_endpoint": self.events.endpoint, "incarnation": self.agent_name,
                "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else None,
                "lends_cores": self.busy_flag is not None,
                "borrows": [c for _, cores in self.borrower.lenders for c in cores]
                if self.borrower else []}

    async def lend(self, req: LendRequest) -> str:
        """Prefix pool: write this worker's cached blocks of a prompt into a puller's
        reserved blocks (``pdserve.worker.lending``). Answers "" once the writes are posted
        (the transfer's outcome reaches the puller through its own connector), else why
        nothing was written."""
        return await asyncio.wrap_future(self.driver.call(lambda e: self.lender.lend(req)))

    async def kv_snapshot(self) -> tuple[str, int, list[int], dict[str, float]]:
        """(incarnation, seq, every cached block hash, load) as of event message ``seq``
        (-1: before the first): what a router resyncs from after a gap."""
        def take(engine: Engine) -> tuple[str, int, list[int], dict[str, float]]:
            self._publish()  # events not yet pushed are covered by the snapshot's seq
            return (self.agent_name, self.events.last_seq, engine.pool.cached_hashes(),
                    self._load())

        return await asyncio.wrap_future(self.driver.call(take))

    async def abort(self, request_id: str, writes_done: bool = False) -> bool:
        """Drop ``request_id`` and free what it holds. ``writes_done``: the caller knows no
        KV write into its reserved blocks can still land (decode role: free them now, not
        after the sender's lease). Returns the role's answer (see ``_abort``)."""
        return await asyncio.wrap_future(
            self.driver.call(lambda e: self._abort(e, request_id, writes_done)))

    async def stats(self) -> dict[str, Any]:
        def take(engine: Engine) -> tuple[Any, dict[str, Any]]:
            kv_stats = getattr(self.connector, "stats", None)  # the nccl transport's groups
            kv = {f"kv_{k}": v for k, v in kv_stats().items()} if kv_stats else {}
            return engine.stats(), {**kv, **self.lender.stats()}

        s, kv = await asyncio.wrap_future(self.driver.call(take))
        return {"worker_id": self.worker_id, "role": self.role, "steps": self.driver.steps,
                "step_seconds": self.driver.step_seconds,
                "step_cpu_seconds": self.driver.step_cpu_seconds,
                "hook_seconds": self.driver.hook_seconds,
                "hook_cpu_seconds": self.driver.hook_cpu_seconds,
                "held_turns": self.driver.held_turns, "loop_turns": self.driver.turns,
                "borrowed_core_steps": self.borrower.borrowed_steps if self.borrower else 0,
                "process_cpu_seconds": time.process_time(),
                "kv_transport": self.kv_transport, "tensor_parallel_size": self.tp_size,
                **kv, **self._extra_stats(), **asdict(s)}

    @property
    def tp_size(self) -> int:
        return 1 if self.ranks is None else self.ranks.world

    async def rank_pids(self) -> list[int]:
        """The process ids of this worker's ranks, rank 0 (this process) first."""
        if self.ranks is None:
            return [os.getpid()]
        pids = await asyncio.gather(*(a.pid.remote() for a in self.ranks.actors))
        return [os.getpid(), *pids]

    async def shutdown(self) -> None:
        self._stopping = True
        self.driver.stop()
        self.engine.close()  # stops the other ranks' loops (tensor parallelism)
        self.connector.close()
        self.events.close()
        if self.ranks is not None:
            self.ranks.close()


class Tombstones:
    """Request ids aborted before they were seen, kept ``ttl_s`` (then a request with that
    id cannot be in flight any more: its reservation lease is over). Driver thread only."""

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._ids: dict[str, float] = {}

    def add(self, request_id: str) -> None:
        now = time.monotonic()
        self._ids[request_id] = now
        if len(self._ids) > 1024:
            self._ids = {r: t for r, t in self._ids.items() if now - t < self._ttl_s}

    def __contains__(self, request_id: str) -> bool:
        seen = self._ids.get(request_id)
        return seen is not None and time.monotonic() - seen < self._ttl_s
