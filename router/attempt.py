"""One attempt of a request on a decode worker and a prefill worker: the Ray calls it makes
(reserve, prefill) and how it lets go of both on every exit path.

An attempt's reservation is released AT ONCE whatever ends it (finish, client cancel,
deadline, disconnect, a failure, a worker dying): the prefill worker is asked to abort
first, and answers once none of the attempt's KV writes can still land; only then is the
decode worker told to free the blocks now (``writes_done``) instead of after the sender's
lease. When no prefill call was made, or it already answered, or the prefill worker died,
there is nothing to wait for. A reserve call cancelled in flight is aborted as well (the
decode worker remembers the id, so a reserve that arrives after its abort is refused).

Outcomes of a prefill call are sorted for the failover policy in ``Flow``: ``OK``,
``RETRY`` (a transfer failed: another worker may do better), ``DIED`` (the worker died:
counts toward the request's worker deaths), ``REQUEST`` (the request failed on its own:
never retried elsewhere), ``NO_WORKER`` (no prefill worker is alive: wait for one).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

import ray

from pdserve.engine.driver import EngineStoppedError
from pdserve.router.cluster import Cluster, WorkerHandle
from pdserve.router.errors import public_reason
from pdserve.worker.protocol import (
    PrefillRequest,
    PrefillResult,
    ReserveRequest,
    ReserveResult,
)

logger = logging.getLogger(__name__)

_ABORT_TIMEOUT_S = 5.0


class Outcome(enum.Enum):
    OK = "ok"
    RETRY = "retry"
    DIED = "died"
    REQUEST = "request"
    NO_WORKER = "no_worker"


@dataclass(slots=True)
class PrefillOutcome:
    kind: Outcome
    result: PrefillResult | None = None
    reason: str = ""


class RequestFailed(Exception):
    """A worker refused or failed the request itself (bad input the router let through, or
    a failure of its own); ``invalid`` says whether it is the input's fault."""

    def __init__(self, reason: str, invalid: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.invalid = invalid


class Attempt:
    """What one attempt holds. ``done``: it ended normally and holds nothing any more."""

    def __init__(self, attempt_id: str, decode: WorkerHandle, route: object) -> None:
        self.id = attempt_id
        self.decode = decode
        self.route = route  # the prompt's block hashes, computed once per attempt
        self.prefill: WorkerHandle | None = None
        self.prefill_answered = False  # the prefill call returned (its writes are over)
        self.reservation: ReserveResult | None = None
        self.reserved_at = 0.0  # time.time() when the reservation was confirmed
        self.decode_died = asyncio.Event()
        self.done = False
        self.priority = 0  # the request's (lower runs first under the priority policy)


def worker_broken(exc: BaseException) -> bool:
    """True if ``exc`` (from a call to a worker) says the worker, not the request, failed."""
    if isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        return True
    cause = getattr(exc, "cause", None)
    return isinstance(exc, EngineStoppedError) or isinstance(cause, EngineStoppedError)


class AttemptCalls:
    """The worker calls of attempts, for ``Flow``. Runs on the router's event loop."""

    def __init__(self, cluster: Cluster, on_stats: Callable[[], None] | None = None) -> None:
        self.cluster = cluster
        self.on_stats = on_stats
        """Called after a worker's stats were refreshed (the router updates its loads)."""
        self._releases: set[asyncio.Task[None]] = set()
        self._refreshing: set[str] = set()

    async def reserve(self, handle: WorkerHandle, req: ReserveRequest) -> ReserveResult | None:
        """The reservation, or None if the worker has no room now or failed (it is then
        reported dead if it died). ``RequestFailed`` if the worker refuses the request."""
        try:
            return await handle.actor.reserve.remote(req)
        except asyncio.CancelledError:
            # The reservation may be made after all: free it (or refuse it) at once.
            self._spawn(self._abort_call(handle, req.request_id, True))
            raise
        except ray.exceptions.RayError as exc:
            if worker_broken(exc):
                logger.warning("reserve on %s failed: %s", handle.worker_id, public_reason(exc))
                await self.cluster.report_dead(handle, exc)
                return None
            cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
            logger.warning("reserve of %s on %s refused: %r", req.request_id, handle.worker_id,
                           exc)
            raise RequestFailed(public_reason(exc, with_type=not isinstance(cause, ValueError)),
                                invalid=isinstance(cause, ValueError)) from None

    async def prefill(self, attempt: Attempt, handle: WorkerHandle, req: PrefillRequest
                      ) -> PrefillOutcome:
        """Run the prefill; stop waiting (and report ``DIED``) if the attempt's decode worker
        dies meanwhile."""
        attempt.prefill = handle
        call = asyncio.ensure_future(handle.actor.prefill.remote(req))
        died = asyncio.ensure_future(attempt.decode_died.wait())
        try:
            await asyncio.wait({call, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
        if not call.done():
            call.cancel()
            return PrefillOutcome(Outcome.DIED, reason="decode worker died")
        try:
            result = call.result()
        except ray.exceptions.RayError as exc:
            reason = public_reason(exc)
            logger.warning("prefill of %s on %s failed: %r", attempt.id, handle.worker_id, exc)
            if worker_broken(exc):
                attempt.prefill_answered = True  # a dead worker writes nothing more
                # Out of the pool before the retry chooses again, not at the next check.
                await self.cluster.report_dead(handle, exc)
                return PrefillOutcome(Outcome.DIED, reason=reason)
            attempt.prefill_answered = True
            return PrefillOutcome(Outcome.REQUEST, reason=reason)
        attempt.prefill_answered = True
        if result.ok:
            return PrefillOutcome(Outcome.OK, result)
        kind = Outcome.RETRY if result.retryable else Outcome.REQUEST
        return PrefillOutcome(kind, result, result.error[:200])

    def release(self, attempt: Attempt) -> None:
        """Let go of everything ``attempt`` holds on both workers, now (in the background:
        this is called from ``finally`` blocks of cancelled requests)."""
        if attempt.done:
            return
        attempt.done = True
        self._spawn(self._release(attempt))

    async def _release(self, attempt: Attempt) -> None:
        writes_done = attempt.prefill is None or attempt.prefill_answered
        prefill = attempt.prefill
        if prefill is not None and not attempt.prefill_answered:
            if prefill.alive:
                writes_done = await self._abort_call(prefill, attempt.id, False)
            else:
                writes_done = True  # out of the pool: killed, its process writes nothing
        if attempt.decode.alive:
            await self._abort_call(attempt.decode, attempt.id, writes_done)
            await self._refresh(attempt.decode)

    async def _refresh(self, handle: WorkerHandle) -> None:
        """Fresh stats of ``handle`` now (not at the next monitor round), so that the
        router's count of its blocks follows a release at once; one call at a time."""
        if handle.worker_id in self._refreshing:
            return
        self._refreshing.add(handle.worker_id)
        try:
            handle.stats = await asyncio.wait_for(handle.actor.stats.remote(), _ABORT_TIMEOUT_S)
            if self.on_stats is not None:
                self.on_stats()
        except (ray.exceptions.RayError, TimeoutError):
            pass  # the monitor deals with workers that do not answer
        finally:
            self._refreshing.discard(handle.worker_id)

    async def _abort_call(self, handle: WorkerHandle, attempt_id: str,
                          writes_done: bool) -> bool:
        """``abort`` on ``handle``; its answer (for a prefill worker: no write can still
        land), True if the worker is dead, False if it did not answer."""
        try:
            return bool(await asyncio.wait_for(
                handle.actor.abort.remote(attempt_id, writes_done), _ABORT_TIMEOUT_S))
        except ray.exceptions.RayError as exc:
            if worker_broken(exc):
                return True
            logger.warning("abort of %s on %s failed: %r", attempt_id, handle.worker_id, exc)
        except TimeoutError:
            logger.warning("abort of %s on %s: no answer in %.0f s", attempt_id,
                           handle.worker_id, _ABORT_TIMEOUT_S)
        return False

    def _spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def drain(self) -> None:
        """Wait for releases still under way (at shutdown)."""
        if self._releases:
            await asyncio.wait(set(self._releases), timeout=_ABORT_TIMEOUT_S)
