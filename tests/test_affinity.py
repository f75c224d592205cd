"""Disjoint cores for the workers of one host: the plan, and pinning a real process."""

from __future__ import annotations

import json
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


def test_spread_takes_distinct_cores_before_siblings() -> None:
    from pdserve.engine.thread_pinning import spread

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    picked = spread(cpus, len(cpus))
    assert sorted(picked) == cpus  # all of them, each once
    assert spread(cpus, 1) == picked[:1]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two cores")
@pytest.mark.parametrize("enabled", ["1", "0"])
def test_an_engine_step_binds_torchs_pool_one_thread_per_core(enabled: str) -> None:
    """After a step, torch's pool threads of the stepping thread sit on distinct cores and
    the stepping thread has the process's cores back; ``PDSERVE_PIN_THREADS=0`` binds none."""
    script = textwrap.dedent("""
        import json, os, torch
        torch.set_num_threads(2)
        from pdserve.engine import LLM, SamplingParams
        allowed = sorted(os.sched_getaffinity(0))
        llm = LLM("tiny", dtype="float32", device="cpu", num_blocks=64)
        llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=3, temperature=0.0))
        masks = [sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")]
        print(json.dumps({"cores": llm.engine.runner.pinning.cores,
                          "single": sorted({m[0] for m in masks if len(m) == 1}),
                          "restored": sorted(os.sched_getaffinity(0)) == allowed}))
    """)
    env = {**os.environ, "PDSERVE_PIN_THREADS": enabled}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=180, env=env)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["restored"]
    if enabled == "0":
        assert got == {"cores": [], "single": [], "restored": True}
    else:
        assert len(set(got["cores"])) == 2
        # The pool's other thread keeps its own core (the stepping thread has all back).
        assert got["single"] == [got["cores"][1]]
