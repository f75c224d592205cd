"""Disjoint cores for the workers of one host: the plan, and pinning a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pdserve.worker.affinity import plan_cpu_sets


def test_cores_are_split_evenly_and_disjointly_in_worker_order() -> None:
    ids = ["prefill-0", "decode-0"]
    assert plan_cpu_sets([0, 1], ids) == {"prefill-0": (0,), "decode-0": (1,)}
    sets = plan_cpu_sets(range(7), ["prefill-0", "prefill-1", "decode-0"])
    assert sets == {"prefill-0": (0, 1, 2), "prefill-1": (3, 4), "decode-0": (5, 6)}
    assert plan_cpu_sets([5, 3, 3, 9], ["a", "b"]) == {"a": (3, 5), "b": (9,)}


def test_fewer_cores_than_workers_means_no_pinning() -> None:
    assert plan_cpu_sets([0, 1], ["prefill-0", "prefill-1", "decode-0"]) == {}
    assert plan_cpu_sets([0, 1], []) == {}


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two cores")
def test_pin_process_binds_every_thread_and_sizes_torch() -> None:
    core = sorted(os.sched_getaffinity(0))[-1]
    script = textwrap.dedent(f"""
        import os, threading, torch
        torch.ones(1000).sum()  # torch's pool may exist already
        before = threading.Thread(target=lambda: None)
        from pdserve.worker.affinity import pin_process
        pin_process([{core}])
        later = {{}}
        t = threading.Thread(target=lambda: later.update(cpus=os.sched_getaffinity(0)))
        t.start(); t.join()
        tids = os.listdir("/proc/self/task")
        print(sorted({{tuple(sorted(os.sched_getaffinity(int(tid)))) for tid in tids}}),
              sorted(later["cpus"]), torch.get_num_threads())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"[({core},)] [{core}] 1"
