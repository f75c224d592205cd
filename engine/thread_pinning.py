"""One core for each thread of torch's intra-op pool on the CPU.

Left unbound, the pool's threads move with the OS scheduler, and while another process keeps
a core busy two of them can share the other core: every parallel region (several per layer)
then waits at its barrier for a thread descheduled behind its sibling. Measured on 2 cores
with one other busy process, SmolLM2-135M bfloat16 decode steps at batch 1 / 16 / 64 took
245-680 / 375-670 / 400-525 ms unbound and 49-50 / 86-91 / 99-101 ms bound (idle: 22 / 41 / 49 ms
both ways). vLLM's CPU worker binds its threads for the same reason.

OpenMP keeps one pool per thread that starts parallel regions, so the binding is made by
the thread that runs the model, on its first step, and again if that thread or the pool's
size changes (``PoolPinning.bound``). The pool's other threads keep their cores; the
calling thread is bound to the first core only while a step runs and gets the process's
cores back after it, so that threads it starts (a grammar compiler, a transfer's helper)
do not inherit one core. ``PDSERVE_PIN_THREADS=0`` turns it off; it
is also off with one thread, or when the process may use fewer cores than torch has
threads (oversubscribed on purpose: left to the OS scheduler). Tensor-parallel ranks in
processes that may all use the same cores take disjoint slices of them, rank by rank.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ENV = "PDSERVE_PIN_THREADS"


def spread(cpus: Sequence[int], n: int) -> list[int]:
    """``n`` of ``cpus``, distinct physical cores first (hyperthread siblings last), in
    order within each round."""
    def core(cpu: int) -> tuple[str, str]:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            return ((topo / "physical_package_id").read_text().strip(),
                    (topo / "core_id").read_text().strip())
        except OSError:
            return ("", str(cpu))
    rounds: list[list[int]] = []
    seen: dict[tuple[str, str], int] = {}
    for cpu in sorted(cpus):
        key = core(cpu)
        k = seen.get(key, 0)
        seen[key] = k + 1
        while len(rounds) <= k:
            rounds.append([])
        rounds[k].append(cpu)
    return [cpu for r in rounds for cpu in r][:n]


class PoolPinning:
    """Binds torch's pool of the calling thread to one core per thread, once per (thread,
    pool size). A no-op off the CPU, without the CPU kernels, or when disabled."""

    def __init__(self, device: torch.device, rank: int = 0, world: int = 1) -> None:
        self.enabled = device.type == "cpu" and os.environ.get(ENV, "1") != "0"
        self.rank, self.world = rank, world
        self._key: tuple[int, int, tuple[int, ...]] | None = None
        self._allowed: list[int] | None = None
        self.cores: list[int] = []
        self.cores_for_step: Callable[[], list[int]] | None = None
        """Where set, the cores each step runs on (one torch thread each, the calling
        thread's first): a worker that borrows its partner's idle cores."""
        self._chosen: list[int] = []

    @contextlib.contextmanager
    def bound(self) -> Iterator[None]:
        """Run a step with the pool bound (the calling thread on the first core)."""
        if self.cores_for_step is not None and self.enabled and self._can_pin():
            chosen = self.cores_for_step()
            if chosen != self._chosen:
                self._chosen = chosen
                torch.set_num_threads(len(chosen))
        self._ensure()
        if not self.cores:
            yield
            return
        os.sched_setaffinity(0, self.cores[:1])
        try:
            yield
        finally:
            os.sched_setaffinity(0, self._allowed or self.cores)

    def _can_pin(self) -> bool:
        """The native op that binds the pool is there (else pinning turns itself off)."""
        from pdserve.engine import cpu_kernels

        if not cpu_kernels.available():
            self.enabled = False
        return self.enabled

    def _ensure(self) -> None:
        if not self.enabled:
            return
        key = (threading.get_ident(), torch.get_num_threads(), tuple(self._chosen))
        if key == self._key:
            return
        self._key = key
        threads = key[1]
        if self._allowed is None:
            self._allowed = sorted(os.sched_getaffinity(0)) if hasattr(
                os, "sched_getaffinity") else []
        allowed = self._allowed
        if self._chosen:  # chosen per step (own cores first)
            cores = self._chosen[:threads]
        elif len(allowed) >= threads * self.world:  # shared by the ranks: this rank's slice
            cores = spread(allowed, threads * self.world)[self.rank * threads:][:threads]
        elif len(allowed) == threads:  # this process's own cores (a worker pinned to them)
            cores = spread(allowed, threads)
        else:
            cores = []
        if threads < 2 or not cores:
            self.cores = []
            return
        if not self._can_pin():
            return
        bound = torch.ops.pdserve_cpu.pin_threads(cores, allowed)
        self.cores = cores if bound == threads else []
        (logger.debug if self._chosen else logger.info)(
            "torch's %d threads bound to cores %s (%d bound)", threads, cores, bound)
