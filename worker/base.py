"""What both worker roles are made of: one ``Engine`` on its own ``EngineDriver`` thread,
one NIXL connector around the engine's KV cache, and the Ray methods every worker answers
(``ping``, ``info``, ``abort``, ``stats``, ``shutdown``).

A role subclasses ``EngineWorker``, sets up its own state, then calls ``start_driver``;
it provides the driver hooks ``_on_outputs`` / ``_on_tick`` and ``_abort`` (all run on the
driver thread) and may add fields to ``stats`` through ``_extra_stats``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from pdserve.engine.config import EngineConfig
from pdserve.engine.driver import EngineDriver
from pdserve.engine.outputs import RequestOutput
from pdserve.worker.affinity import pin_process
from pdserve.worker.protocol import resolve_host

if TYPE_CHECKING:
    from pdserve.engine.engine import Engine
    from pdserve.kvtransfer.nixl import NixlConnector

logger = logging.getLogger(__name__)


class EngineWorker:
    """Base of ``PrefillWorker`` and ``DecodeWorker`` (Ray actor bodies)."""

    role = "worker"

    def __init__(self, worker_id: str, config: EngineConfig, host: str = "127.0.0.1",
                 lease_s: float = 30.0, cpus: Sequence[int] | None = None) -> None:
        # Imported here, in the worker's process: the router imports this module to create
        # the actors and must not load torch or NIXL.
        from pdserve.engine.engine import Engine
        from pdserve.kvtransfer.nixl import NixlConfig, NixlConnector

        if cpus:  # this worker's own cores (router.cluster plans them per host)
            pin_process(cpus)

        self.worker_id = worker_id
        self.engine: Engine = Engine(replace(config, detokenize=False))
        self.connector: NixlConnector = NixlConnector(
            self.engine.runner.kv_cache, self.engine.kv_spec,
            NixlConfig(model=str(self.engine.model_config.architecture),
                       host=resolve_host(host), name=worker_id, lease_s=lease_s),
        )
        self.driver: EngineDriver | None = None

    def start_driver(self) -> None:
        self.driver = EngineDriver(self.engine, self._on_outputs, self._on_tick,
                                   name=f"{self.worker_id}-loop")
        self.driver.start()
        logger.info("%s ready (pid %d), kv agent %s", self.worker_id, os.getpid(),
                    self.connector.agent_name)

    @property
    def _driver(self) -> EngineDriver:
        if self.driver is None:
            raise RuntimeError(f"{self.worker_id}: engine loop not started")
        return self.driver

    # ------------------------------------------------------------------ hooks

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        raise NotImplementedError

    def _on_tick(self) -> None:
        raise NotImplementedError

    def _abort(self, engine: Engine, request_id: str) -> bool:
        raise NotImplementedError

    def _extra_stats(self) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ Ray methods

    async def ping(self) -> str:
        driver = self._driver
        if not driver.alive:
            raise RuntimeError(f"{self.worker_id}: engine loop stopped: {driver.error!r}")
        return self.worker_id

    async def info(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "pid": os.getpid(),
                "block_size": self.engine.kv_spec.block_size,
                "num_blocks": self.engine.num_blocks,
                "max_model_len": self.engine.max_model_len,
                "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else None}

    async def abort(self, request_id: str) -> bool:
        return await asyncio.wrap_future(
            self._driver.call(lambda e: self._abort(e, request_id)))

    async def stats(self) -> dict[str, Any]:
        s = await asyncio.wrap_future(self._driver.call(lambda e: e.stats()))
        return {"worker_id": self.worker_id, "role": self.role, "steps": self._driver.steps,
                **self._extra_stats(), **asdict(s)}

    async def shutdown(self) -> None:
        self._driver.stop()
        self.connector.close()
