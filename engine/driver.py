"""Runs an engine's step loop on its own thread, so that a server can talk to it.

The engine is not thread-safe; the driver's thread is its only user. Other threads hand it
work with ``call(fn)`` (``fn(engine)`` runs between two steps; the result comes back in a
``concurrent.futures.Future``). After every step the driver passes the outputs to
``on_outputs``, and on every turn of the loop, busy or idle, it calls ``on_tick`` (where a
worker polls its KV transfers). A busy turn whose ``hold`` hook answers True takes no step:
the loop waits for calls as on an idle turn (``idle_wait_s`` at most) and ticks again (a
decode worker yields the CPU to a better request's prefill that way). ``on_busy`` hears, on
every turn, whether the loop is about to take a step (a worker's busy flag, with which it
lends its cores while idle: ``pdserve.worker.idle_cores``). The hooks run on the driver's
thread. While the engine holds no work and the ``quiet`` hook says its owner waits for
nothing either (no KV in flight, no reservation), the idle turns' wait doubles up to
``max_idle_wait_s``: a worker at rest ticks 20 times a second instead of 500 (each idle
tick cost a worker 9% of a core). A call still wakes the loop at once; one that brings work
(a request, a reservation) ends the long waits. An exception in a hook or a step is logged
and stops the driver: ``error`` then holds it and every pending and later ``call`` fails
with it, so nothing waits forever on a dead loop, and ``on_stop`` is called (on the
driver's thread, last) so that its owner can tell others at once. A request that fails on
its own does not stop the loop: the engine ends that request alone
(``RequestOutput.error``).

``build(factory)`` makes the engine on the driver's thread, before ``start``: OpenMP keeps
one pool of threads per thread that starts parallel work, and an engine loaded (weights
packed, caches allocated) on one thread and stepped on another leaves two pools on the
cores; with more threads than cores OpenMP's threads then sleep between parallel regions
instead of spinning, and each of a step's few hundred regions waits for its threads to wake
(SmolLM2-135M bfloat16, decode at batch 16 on 2 cores: 51 ms a step against 34 ms stepped
by the thread that built it).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from pdserve.engine.outputs import RequestOutput

if TYPE_CHECKING:
    from pdserve.engine.engine import Engine


logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineStoppedError(RuntimeError):
    """The engine loop has stopped: the engine (and its owner) can serve nothing more."""


class EngineDriver:
    """Owns ``engine`` from ``start()`` until ``stop()``."""

    def __init__(
        self,
        engine: Engine | None,
        on_outputs: Callable[[list[RequestOutput]], None] | None = None,
        on_tick: Callable[[], None] | None = None,
        idle_wait_s: float = 0.002,
        name: str = "engine-driver",
        on_stop: Callable[[BaseException | None], None] | None = None,
        hold: Callable[[], bool] | None = None,
        on_busy: Callable[[bool], None] | None = None,
        quiet: Callable[[], bool] | None = None,
        max_idle_wait_s: float = 0.05,
    ) -> None:
        self._engine = engine
        self._on_outputs = on_outputs
        self._on_tick = on_tick
        self._on_stop = on_stop
        self._hold = hold
        self._on_busy = on_busy
        self._quiet = quiet
        self._idle_wait_s = idle_wait_s
        self._max_idle_wait_s = max(idle_wait_s, max_idle_wait_s)
        self._calls: queue.SimpleQueue[tuple[Callable[[Engine], Any], Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._stop = threading.Event()
        self._go = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._factory: Callable[[], Engine] | None = None
        self._built: Future[Engine] = Future()
        self.error: BaseException | None = None
        self.steps = 0
        self.step_seconds = 0.0
        """Wall-clock seconds spent in ``engine.step()``, summed over the steps."""
        self.step_cpu_seconds = 0.0
        """The same steps in CPU time of the driver's thread (``time.thread_time``): below
        ``step_seconds`` when other work kept the thread off its core."""
        self.hook_seconds = 0.0
        """Wall-clock seconds of the busy turns spent outside the step: the hooks (KV
        writes, polling, event pushes) and the calls, summed over the turns that stepped."""
        self.hook_cpu_seconds = 0.0
        """The same in CPU time of the driver's thread: what a step costs the worker beyond
        the engine's, on a core of its own."""
        self.held_turns = 0
        """Busy turns that took no step because ``hold`` said so."""
        self.turns = 0
        """Turns of the loop, busy or idle (each one ticks once)."""

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the driver has no engine yet (build it first)")
        return self._engine

    def build(self, factory: Callable[[], Engine]) -> Engine:
        """Start the driver's thread and make the engine there with ``factory()`` (see the
        module docstring); returns it, or raises what ``factory`` raised. The thread then
        waits for ``start`` (or ``stop``) before its first turn."""
        if self._engine is not None or self._thread.is_alive():
            raise RuntimeError("the driver already has an engine")
        self._factory = factory
        self._thread.start()
        self._engine = self._built.result()
        return self._engine

    def start(self) -> None:
        if self._engine is None:
            raise RuntimeError("the driver has no engine (pass one, or build it)")
        self._go.set()
        if not self._thread.is_alive() and self._factory is None:
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._go.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def call(self, fn: Callable[[Engine], T]) -> Future[T]:
        """Run ``fn(engine)`` on the driver thread between steps."""
        fut: Future[T] = Future()
        if self.error is not None:
            fut.set_exception(EngineStoppedError(f"engine loop stopped: {self.error!r}"))
            return fut
        self._calls.put((fn, fut))
        return fut

    def _held(self) -> bool:
        return self._hold is not None and self._hold()

    def _run_calls(self, wait_s: float | None) -> None:
        """Run the queued calls, first waiting up to ``wait_s`` for one (None: no wait)."""
        try:
            item = self._calls.get_nowait() if wait_s is None else self._calls.get(timeout=wait_s)
        except queue.Empty:
            return
        while True:
            fn, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine))
                except BaseException as exc:  # the caller gets it; the loop goes on
                    fut.set_exception(exc)
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return

    def _make(self) -> bool:
        """On the driver's thread: build the engine if asked, then wait for ``start``.
        False if the loop must not run (the build failed, or ``stop`` came first)."""
        if self._factory is not None:
            try:
                self._built.set_result(self._factory())
            except BaseException as exc:
                self._built.set_exception(exc)
                return False
            self._go.wait()
        return not self._stop.is_set()

    def _run(self) -> None:
        if not self._make():
            return
        try:
            clock, cpu = time.perf_counter, time.thread_time
            wait_s = self._idle_wait_s
            while not self._stop.is_set():
                self.turns += 1
                t0, c0 = clock(), cpu()
                # The tick first: calls see what it brought in (a request whose KV landed is
                # running by then, so a reservation may preempt it instead of finding its
                # blocks still held for KV in flight).
                if self._on_tick is not None:
                    self._on_tick()
                busy = self.engine.has_unfinished()
                held = busy and self._held()
                if busy and not held:  # an idle turn's blocking wait for calls is not a cost
                    self._run_calls(None)
                    t1 = clock()
                    wait_s = self._idle_wait_s
                else:
                    self._run_calls(wait_s)
                    t0 = t1 = clock()
                    c0 = cpu()
                    wait_s = self._next_wait(wait_s, busy)
                # Calls may have brought work, or a reason to hold (a reservation granted).
                stepping = not held and self.engine.has_unfinished() and not self._held()
                if self._on_busy is not None:
                    self._on_busy(stepping)
                if held:
                    self.held_turns += 1
                    continue
                if stepping:
                    c1 = cpu()
                    outputs = self.engine.step()
                    t2, c2 = clock(), cpu()
                    self.steps += 1
                    if self._on_busy is not None and not self.engine.has_unfinished():
                        # Idle from this step on: say so before its last outputs go out, so
                        # that the next request (sent when they arrive) finds it idle.
                        self._on_busy(False)
                    if outputs and self._on_outputs is not None:
                        self._on_outputs(outputs)
                    self.step_seconds += t2 - t1
                    self.step_cpu_seconds += c2 - c1
                    self.hook_seconds += (t1 - t0) + (clock() - t2)
                    self.hook_cpu_seconds += (c1 - c0) + (cpu() - c2)
        except BaseException as exc:
            logger.exception("engine loop failed")
            self.error = exc
        finally:
            self._fail_pending()
            if self._on_stop is not None:
                try:
                    self._on_stop(self.error)
                except Exception:
                    logger.exception("on_stop hook failed")

    def _next_wait(self, wait_s: float, busy: bool) -> float:
        """The next idle turn's wait: doubled (up to the cap) while the engine holds no
        request and the owner has nothing in flight (after this turn's calls: one that
        brought work ends the rest at once; a read of the stats does not); the shortest
        otherwise."""
        if busy or self.engine.holds_requests() or self._quiet is None or not self._quiet():
            return self._idle_wait_s
        return min(2 * wait_s, self._max_idle_wait_s)

    def _fail_pending(self) -> None:
        reason = self.error or RuntimeError("engine loop stopped")
        while True:
            try:
                _, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineStoppedError(f"engine loop stopped: {reason!r}"))
