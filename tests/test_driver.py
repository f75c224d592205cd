"""The engine driver's loop accounting: the step counters the planner calibrates on."""

from __future__ import annotations

import threading
import time

from pdserve.engine import SamplingParams
from pdserve.engine.config import CacheConfig, EngineConfig
from pdserve.engine.driver import EngineDriver
from pdserve.engine.engine import Engine
from pdserve.engine.outputs import RequestOutput

HOOK_BUSY_S = 0.003


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def _tiny_engine() -> Engine:
    return Engine(EngineConfig(model="tiny", dtype="float32", device="cpu",
                               cache=CacheConfig(block_size=16, num_blocks=64)))


class _Ticks:
    """An ``on_tick`` hook that counts."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def test_driver_counts_steps_and_splits_their_cpu_from_the_loop_around_them() -> None:
    engine = _tiny_engine()
    done = threading.Event()
    hook_calls = 0

    def on_outputs(outputs: list[RequestOutput]) -> None:
        nonlocal hook_calls
        hook_calls += 1
        _spin(HOOK_BUSY_S)  # the worker's work after a step (KV writes, token pushes)
        if any(o.finished for o in outputs):
            done.set()

    driver = EngineDriver(engine, on_outputs=on_outputs)
    driver.start()
    try:
        time.sleep(0.05)  # idle turns: neither counted as steps nor as loop time
        assert (driver.steps, driver.hook_cpu_seconds, driver.step_cpu_seconds) == (0, 0.0, 0.0)
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        driver.call(lambda e: e.add_request("r", list(range(3, 40)), params)).result(10)
        assert done.wait(30)
    finally:
        driver.stop()
    assert driver.steps == hook_calls == 8  # one prefill step, then seven decode steps
    assert driver.step_cpu_seconds > 0
    assert driver.step_seconds >= driver.step_cpu_seconds - 0.002  # one thread: wall >= CPU
    # Every step's hook burned HOOK_BUSY_S of CPU; the loop's own turns add a little.
    assert 8 * HOOK_BUSY_S <= driver.hook_cpu_seconds < 8 * HOOK_BUSY_S + 0.05
    assert driver.hook_seconds >= driver.hook_cpu_seconds - 0.002


def test_a_held_turn_takes_no_step_but_still_ticks_and_answers_calls() -> None:
    engine = _tiny_engine()
    hold = threading.Event()
    hold.set()
    ticks = _Ticks()
    driver = EngineDriver(engine, on_tick=ticks, hold=hold.is_set)
    driver.start()
    try:
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        driver.call(lambda e: e.add_request("r", list(range(3, 40)), params)).result(10)
        time.sleep(0.1)
        ticks_held = ticks.count
        assert driver.steps == 0 and driver.held_turns > 0 and ticks_held > 0
        assert driver.call(lambda e: e.request_status("r")).result(10) == "waiting"
        hold.clear()
        deadline = time.monotonic() + 30
        while driver.call(lambda e: e.has_unfinished()).result(10):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        driver.stop()
    assert driver.steps == 4  # one prefill step, then three decode steps


def test_an_engine_built_by_the_driver_is_made_and_stepped_on_the_drivers_thread() -> None:
    made_on: list[int] = []
    stepped_on: list[int] = []

    def make() -> Engine:
        made_on.append(threading.get_ident())
        return _tiny_engine()

    done = threading.Event()

    def on_outputs(outputs: list[RequestOutput]) -> None:
        stepped_on.append(threading.get_ident())
        if any(o.finished for o in outputs):
            done.set()

    driver = EngineDriver(None, on_outputs=on_outputs)
    engine = driver.build(make)
    try:
        assert driver.engine is engine and made_on != [threading.get_ident()]
        assert driver.steps == 0  # it waits for start() before its first turn
        driver.start()
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        driver.call(lambda e: e.add_request("r", list(range(3, 20)), params)).result(10)
        assert done.wait(30)
    finally:
        driver.stop()
    assert set(stepped_on) == set(made_on) and len(made_on) == 1


def test_a_failed_build_raises_and_stopping_before_start_steps_nothing() -> None:
    def broken() -> Engine:
        raise ValueError("no such model")

    driver = EngineDriver(None)
    try:
        driver.build(broken)
    except ValueError as exc:
        assert "no such model" in str(exc)
    else:
        raise AssertionError("build() did not raise")
    driver.stop(timeout=5)
    assert not driver._thread.is_alive()

    idle = EngineDriver(None)
    idle.build(lambda: Engine(EngineConfig(model="tiny", dtype="float32", device="cpu",
                                           cache=CacheConfig(block_size=16, num_blocks=16))))
    idle.stop(timeout=5)  # never started: the thread ends without a turn
    assert not idle._thread.is_alive() and idle.steps == 0


def _count_ticks(quiet: bool, seconds: float) -> tuple[int, float]:
    """Ticks of an idle driver over ``seconds`` (its owner quiet or not), and how long a call
    made at the end of them took to be answered."""
    engine = _tiny_engine()
    ticks = _Ticks()
    driver = EngineDriver(engine, on_tick=ticks, quiet=lambda: quiet)
    driver.start()
    try:
        time.sleep(seconds)
        counted = ticks.count
        sent = time.monotonic()
        driver.call(lambda e: e.has_unfinished()).result(10)
        answered = time.monotonic() - sent
    finally:
        driver.stop()
    return counted, answered


def test_an_idle_loop_with_nothing_in_flight_ticks_rarely_and_still_answers_calls_at_once() -> None:
    quiet_ticks, quiet_answer = _count_ticks(quiet=True, seconds=0.5)
    busy_ticks, _ = _count_ticks(quiet=False, seconds=0.5)
    # The wait doubles from 2 ms to 50 ms: about 10 ticks in 0.5 s, against up to 250 while
    # something is in flight (fewer on a loaded machine, but many more than at rest).
    assert quiet_ticks <= 20, quiet_ticks
    assert busy_ticks > 3 * quiet_ticks, (busy_ticks, quiet_ticks)
    assert quiet_answer < 0.03  # a call wakes the 50 ms wait at once


def test_a_request_in_the_engine_keeps_the_loop_ticking_fast_whatever_its_owner_says() -> None:
    engine = _tiny_engine()
    ticks = _Ticks()
    hold = threading.Event()
    hold.set()  # the request stays in the engine, unstepped (as one awaiting its KV would)
    driver = EngineDriver(engine, on_tick=ticks, quiet=lambda: True, hold=hold.is_set)
    driver.start()
    try:
        time.sleep(0.3)  # at rest first: the wait grows to its cap
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        driver.call(lambda e: e.add_request("r", list(range(3, 40)), params)).result(10)
        before = ticks.count
        time.sleep(0.3)
        during = ticks.count - before
    finally:
        driver.stop()
    assert during > 30, during  # 2 ms turns: ~150, where the capped wait would give 6
