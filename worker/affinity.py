"""Disjoint CPU cores for the workers of one host.

Prefill and decode workers on one machine otherwise run their torch thread pools over the
same cores: each pool's parallel regions wait for threads the other pool has descheduled,
and both slow down far more than their share. ``plan_cpu_sets`` splits the cores (pure
logic: the router calls it without loading torch); each worker calls ``pin_process`` with
its set before it builds its engine. A worker with nothing to do lends its cores to a
partner of the other role (``pdserve.worker.idle_cores``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

logger = logging.getLogger(__name__)


def plan_cpu_sets(cores: Sequence[int], worker_ids: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Contiguous, disjoint core sets for ``worker_ids`` in order, as even as the cores
    allow (the first ``len(cores) % len(worker_ids)`` workers get one more). Empty when
    there are fewer cores than workers: sharing a core is left to the OS scheduler."""
    ordered = sorted(set(cores))
    n = len(worker_ids)
    if n == 0 or len(ordered) < n:
        return {}
    base, extra = divmod(len(ordered), n)
    sets: dict[str, tuple[int, ...]] = {}
    start = 0
    for i, worker_id in enumerate(worker_ids):
        size = base + (1 if i < extra else 0)
        sets[worker_id] = tuple(ordered[start : start + size])
        start += size
    return sets


def split_cpus(cpus: Sequence[int], ranks: int) -> list[tuple[int, ...]]:
    """A worker's cores divided between its ``ranks`` processes (tensor parallelism), rank
    0 first; every rank gets all of them when there are fewer cores than ranks (left to the
    OS scheduler, as ``plan_cpu_sets`` does)."""
    sets = plan_cpu_sets(cpus, [str(r) for r in range(ranks)])
    if not sets:
        return [tuple(sorted(set(cpus)))] * ranks
    return [sets[str(r)] for r in range(ranks)]


def pin_process(cpus: Sequence[int]) -> None:
    """Bind every thread of this process (and threads it starts later) to ``cpus``, and
    size torch's intra-op pool to them. Linux only; elsewhere a logged no-op."""
    if not hasattr(os, "sched_setaffinity"):
        logger.warning("cannot pin threads to cores %s on this platform", list(cpus))
        return
    target = set(cpus)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, target)
        except OSError:  # a thread that ended meanwhile
            pass
    import torch

    torch.set_num_threads(len(target))
    logger.info("pinned to cores %s, %d torch threads", sorted(target), len(target))
