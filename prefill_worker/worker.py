"""The prefill worker: computes prompts' KV with chunked prefill and streams the blocks.

One ``Engine`` in the prefill role, driven by an ``EngineDriver`` thread, and one KV
connector. After every engine step, the blocks a request completed are written into the
decode worker's reserved blocks (so transfer overlaps the rest of the prefill); the first
sampled token travels with the last write. The request's blocks stay referenced until the
connector reports every write done (or failed): only then are they released, into this
worker's prefix cache. The ``prefill`` call answers when the decode side holds every block.
With ``stream_kv=False`` every block is written once, with the first token, after the last
chunk (no overlap; kept to measure what streaming saves, see ``bench/service.py``).

A prefill that names a ``PullSource`` (balancer ``kv_pool``) first gets the prompt's cached
prefix from the worker holding it (``pdserve.prefill_worker.pull``): the request enters the
engine once those blocks landed, or at once computing everything if the pull fails. The
blocks this worker lends to others go through ``EngineWorker.lend``.

A request that fails on its own in the engine (its sampling) answers a non-retryable
``PrefillResult``: the router fails it instead of trying another worker. ``abort`` answers
True once no write of the request can still land at the decode worker, so that the router
can tell the decode worker to free the reservation at once.

Used as a Ray actor (``pdserve.router.cluster`` wraps it); public methods are async.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import msgpack

from pdserve.engine.config import EngineConfig
from pdserve.engine.outputs import RequestOutput
from pdserve.kvtransfer.auth import ChannelKey
from pdserve.prefill_worker.pull import Puller
from pdserve.worker.base import EngineWorker
from pdserve.worker.idle_cores import CoreShare
from pdserve.worker.prefill_rate import PrefillRate
from pdserve.worker.protocol import (
    LendRequest,
    PrefillRequest,
    PrefillResult,
    PullSource,
    logprobs_to_wire,
    prompt_logprobs_to_wire,
    sampling_params,
)

if TYPE_CHECKING:
    from pdserve.engine.engine import Engine
    from pdserve.kvtransfer.base import PollResult


logger = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class _Job:
    req: PrefillRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[PrefillResult]
    arrival: float
    next_block: int
    num_blocks: int
    writes_started: bool = False
    first_token: int = -1
    first_logprobs: list[Any] | None = None
    num_cached_tokens: int = 0
    first_token_time: float = 0.0
    prompt_logprobs: list[Any] | None = None
    aborted: bool = False  # by the router: nobody waits for the result
    admitted: float = 0.0  # when it entered the engine (a pull waits for its prefix first)
    pulled_tokens: int = 0
    expired: bool = False  # missed its write deadline: the router should retry


class PrefillWorker(EngineWorker):
    """Ray actor body."""

    role = "prefill"

    def __init__(self, worker_id: str, config: EngineConfig, host: str = "127.0.0.1",
                 lease_s: float = 30.0, *, stream_kv: bool = True,
                 kv_transport: str = "nixl", channel_key: ChannelKey,
                 cpus: Sequence[int] | None = None, share: CoreShare | None = None,
                 **ranks: Any) -> None:
        super().__init__(worker_id, config, host, lease_s, kv_transport,
                         channel_key=channel_key, cpus=cpus, share=share,
                         **ranks)  # ranks: tensor parallelism
        self.stream_kv = stream_kv
        self._jobs: dict[str, _Job] = {}
        self.puller = Puller(worker_id, self.engine, self.connector)
        self._asks: set[asyncio.Task[None]] = set()
        self.rate = PrefillRate()
        self.start_driver()

    # ------------------------------------------------------------------ Ray methods

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        """Prefill ``req`` and write its KV into the target; answers when every block
        landed (ok) or the transfer failed (error). ValueError for a refused request."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[PrefillResult] = loop.create_future()
        lend = await asyncio.wrap_future(
            self.driver.call(lambda e: self._start(e, req, loop, fut)))
        if lend is not None and req.pull is not None:
            task = loop.create_task(self._ask_holder(req.request_id, req.pull, lend))
            self._asks.add(task)
            task.add_done_callback(self._asks.discard)
        try:
            return await fut
        except asyncio.CancelledError:
            self.driver.call(lambda e: self._abort(e, req.request_id))
            raise

    async def _ask_holder(self, rid: str, source: PullSource, lend: LendRequest) -> None:
        """Ask the holder to write the pulled blocks; on a refusal or a failure of the call,
        give the pull up at once (the request computes its prefix instead)."""
        import ray

        writes_done = True  # a refusal wrote nothing
        try:
            refusal = await asyncio.wait_for(source.holder.lend.remote(lend), source.timeout_s)
        except TimeoutError:
            refusal, writes_done = f"{source.worker_id} did not answer", False
        except ray.exceptions.ActorDiedError as exc:
            refusal = f"{source.worker_id} died: {type(exc).__name__}"  # it writes nothing more
        except Exception as exc:
            refusal, writes_done = f"{source.worker_id} failed: {type(exc).__name__}", False
        if refusal:
            self.driver.call(lambda e: self.puller.fail(rid, refusal, writes_done))

    def _role_quiet(self) -> bool:
        return not self._jobs and self.puller.idle()

    def _extra_stats(self) -> dict[str, Any]:
        pending = sum(len(j.req.prompt_token_ids) - j.pulled_tokens
                      for j in list(self._jobs.values()) if j.first_token < 0)
        return {"pending_jobs": len(self._jobs), "prefill_tokens_per_s": self.rate.tokens_per_s,
                "pending_prefill_tokens": pending, **self.puller.stats()}

    # ------------------------------------------------------------------ driver thread

    def _start(self, engine: Engine, req: PrefillRequest, loop: asyncio.AbstractEventLoop,
               fut: asyncio.Future[PrefillResult]) -> LendRequest | None:
        """Take the job; with a pull, the lend to ask the holder for (the request enters
        the engine once its prefix landed or the pull failed)."""
        rid = req.request_id
        if rid in self.tombstones:  # aborted before it arrived
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(PrefillResult(
                rid, False, error="aborted", retryable=False)))
            return None
        bs = engine.kv_spec.block_size
        num_blocks = -(-len(req.prompt_token_ids) // bs)
        if len(req.dst_block_ids) < num_blocks:
            raise ValueError(f"{rid}: {num_blocks} destination blocks needed, "
                             f"{len(req.dst_block_ids)} given")
        job = _Job(req, loop, fut, time.monotonic(), req.skip_blocks, num_blocks)
        lend = self.puller.begin(req) if req.pull is not None else None
        if lend is None:
            self._add(engine, job)  # ValueError: refused, answered to the caller
        self._jobs[rid] = job
        return lend

    def _add(self, engine: Engine, job: _Job) -> None:
        params = replace(sampling_params(job.req.sampling), max_tokens=1)
        engine.add_request(job.req.request_id, job.req.prompt_token_ids, params,
                           prefill_only=True, priority=job.req.priority)
        job.admitted = time.monotonic()

    def _admit_after_pull(self, rid: str, pulled_tokens: int, blocks: list[int]) -> None:
        """The pull of ``rid`` landed (``pulled_tokens`` in ``blocks``, the prompt's first
        blocks) or failed (0): into the engine. Streaming, the landed blocks go on to the
        decode worker at once, while the rest of the prompt is computed."""
        job = self._jobs.get(rid)
        if job is None or job.aborted:
            self.puller.finish(rid)
            return
        job.pulled_tokens = pulled_tokens
        try:
            self._add(self.engine, job)
        except ValueError as exc:
            self.puller.finish(rid)
            self._resolve(job, PrefillResult(rid, False, error=str(exc)[:500],
                                             retryable=False))
            return
        upto = min(len(blocks), job.num_blocks - 1)  # the last write carries the last block
        if self.stream_kv and upto > job.next_block and time.time() <= job.req.write_deadline:
            self.connector.write_blocks(job.req.target, rid, blocks[job.next_block:upto],
                                        job.req.dst_block_ids[job.next_block:upto])
            job.writes_started = True
            job.next_block = upto

    def _abort(self, engine: Engine, rid: str, writes_done: bool) -> bool:
        """True once no write of ``rid`` can still land at its decode worker."""
        job = self._jobs.get(rid)
        if job is None:
            if not engine.abort(rid):
                self.tombstones.add(rid)  # a prefill still on its way is refused
            return not self.connector.writes_pending(rid)
        job.aborted = True
        if job.writes_started:
            self.connector.abort(rid)  # source blocks are released when poll reports it
        else:
            if rid in self.puller:
                self.puller.fail(rid, "aborted", writes_done=False)
            engine.abort(rid)
            self.puller.finish(rid)
            self._resolve(job, PrefillResult(rid, False, error="aborted", retryable=False))
        return not self.connector.writes_pending(rid)

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        bs = self.engine.kv_spec.block_size
        now = time.monotonic()
        for out in outputs:
            job = self._jobs.get(out.request_id)
            if job is None or job.aborted or job.expired:
                continue
            if out.error is not None:
                self._fail_job(job, out.error)
                continue
            if not (out.finished or self.stream_kv):
                continue  # not streaming: every block goes with the last write
            upto = job.num_blocks if out.finished else out.num_computed_tokens // bs
            payload = b""
            if out.finished:
                job.first_token = out.token_ids[0]
                wire = logprobs_to_wire(out.logprobs)
                job.first_logprobs = wire[0] if wire else None
                if job.req.sampling.prompt_logprobs is not None:
                    job.prompt_logprobs = prompt_logprobs_to_wire(out.prompt_logprobs)
                job.num_cached_tokens = out.num_cached_tokens
                job.first_token_time = now
                # The rate of computing: a pull's wait is not part of it.
                self.rate.record(len(job.req.prompt_token_ids) - out.num_cached_tokens,
                                 now - job.admitted)
                payload = msgpack.packb([job.first_token, job.first_logprobs])
            if upto <= job.next_block and not out.finished:
                continue
            if time.time() > job.req.write_deadline:
                self._expire(job)
                continue
            src = out.block_ids[job.next_block:upto]
            dst = job.req.dst_block_ids[job.next_block:upto]
            self.connector.write_blocks(job.req.target, out.request_id, src, dst,
                                        last=out.finished, payload=payload)
            job.writes_started = True
            job.next_block = max(job.next_block, upto)

    def _fail_job(self, job: _Job, error: str) -> None:
        """The request failed on its own: write nothing more, answer a final failure."""
        rid = job.req.request_id
        job.aborted = True  # the failure answered here is the one the router sees
        if job.writes_started:
            self.connector.abort(rid)  # blocks released when poll reports it
        else:
            self._release(rid)
        self._resolve(job, PrefillResult(rid, False, error=error[:500], retryable=False))

    def _expire(self, job: _Job) -> None:
        """The decode side's lease is over: write nothing more, fail the job."""
        rid = job.req.request_id
        logger.warning("%s: %s missed its write deadline; not writing", self.worker_id, rid)
        job.expired = True
        if job.writes_started:
            self.connector.abort(rid)  # released when poll reports the failure
            return
        self._release(rid)
        self._resolve(job, PrefillResult(rid, False, error="timeout: reservation lease over"))

    def _on_tick(self, result: PollResult) -> None:
        landed, failed = self.puller.take(result)
        for rid, tokens, blocks in landed:
            self._admit_after_pull(rid, tokens, blocks)
        for rid in failed:
            self._admit_after_pull(rid, 0, [])
        now = time.monotonic()
        for rid in result.sent:
            job = self._jobs.get(rid)
            self._release(rid)
            if job is not None:
                self._resolve(job, PrefillResult(
                    rid, True, job.first_token, job.first_logprobs, job.num_cached_tokens,
                    pulled_tokens=job.pulled_tokens,
                    prefill_s=job.first_token_time - job.arrival,
                    transfer_tail_s=now - job.first_token_time,
                    prompt_logprobs=job.prompt_logprobs,
                ))
        for failure in result.failed:
            rid = failure.request_id
            job = self._jobs.get(rid)
            self._release(rid)
            if job is not None:
                if not job.aborted:  # an aborted job's failure is the abort itself
                    logger.warning("%s: KV transfer of %s failed: %s", self.worker_id, rid,
                                   failure.message)
                self._resolve(job, PrefillResult(
                    rid, False, error=f"{failure.kind.value}: {failure.message}",
                    retryable=job.expired or not job.aborted,
                ))

    def _release(self, rid: str) -> None:
        """Free what ``rid`` holds (its blocks may be read by no write any more): its
        request's blocks and its pulled prefix's."""
        self.engine.release(rid)
        self.puller.finish(rid)

    def _resolve(self, job: _Job, result: PrefillResult) -> None:
        self._jobs.pop(job.req.request_id, None)

        def settle() -> None:
            if not job.future.done():
                job.future.set_result(result)

        job.loop.call_soon_threadsafe(settle)
