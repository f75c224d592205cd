"""Idle cores lent between the pinned workers of one host: the plan, the shared busy flag
between processes, the driver raising it, a step on borrowed cores, and a served cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pdserve.worker.idle_cores import (
    FLAG_DIR_PREFIX,
    BusyFlag,
    CoreBorrower,
    make_flag,
    make_flag_dir,
    plan_lending,
)

TWO_CORES = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and two cores")


def _flag(tmp: Path, worker: str) -> str:
    return str(tmp / f"{worker}.busy")


def test_each_worker_lends_to_one_partner_of_the_other_role(tmp_path: Path) -> None:
    plan = plan_lending({"prefill-0": (0,), "decode-0": (1,)}, ["prefill-0"], ["decode-0"],
                        tmp_path)
    assert plan["prefill-0"].flag == _flag(tmp_path, "prefill-0")
    assert plan["prefill-0"].borrow == ((_flag(tmp_path, "decode-0"), (1,)),)
    assert plan["decode-0"].borrow == ((_flag(tmp_path, "prefill-0"), (0,)),)

    # Two prefill workers: the decode worker may borrow both, and lends to the first.
    sets = {"prefill-0": (0, 1), "prefill-1": (2,), "decode-0": (3,)}
    plan = plan_lending(sets, ["prefill-0", "prefill-1"], ["decode-0"], tmp_path)
    assert plan["decode-0"].borrow == ((_flag(tmp_path, "prefill-0"), (0, 1)),
                                       (_flag(tmp_path, "prefill-1"), (2,)))
    assert plan["prefill-0"].borrow == ((_flag(tmp_path, "decode-0"), (3,)),)
    assert plan["prefill-1"].borrow == ()
    assert plan["prefill-1"].flag == _flag(tmp_path, "prefill-1")

    # Two decode workers: each lends to the one prefill worker, which lends to the first.
    sets = {"prefill-0": (0,), "decode-0": (1,), "decode-1": (2,)}
    plan = plan_lending(sets, ["prefill-0"], ["decode-0", "decode-1"], tmp_path)
    assert [p for p, _ in plan["prefill-0"].borrow] == [_flag(tmp_path, "decode-0"),
                                                          _flag(tmp_path, "decode-1")]
    assert plan["decode-0"].borrow == ((_flag(tmp_path, "prefill-0"), (0,)),)
    assert plan["decode-1"].borrow == ()


def test_workers_without_cores_of_their_own_take_no_part(tmp_path: Path) -> None:
    assert plan_lending({}, ["prefill-0"], ["decode-0"], tmp_path) == {}
    assert plan_lending({"prefill-0": (0,)}, ["prefill-0"], ["decode-0"], tmp_path) == {}
    plan = plan_lending({"prefill-0": (0,), "decode-0": (1,)}, ["prefill-0", "prefill-1"],
                        ["decode-0"], tmp_path)
    assert set(plan) == {"prefill-0", "decode-0"}


def test_a_flag_set_in_one_process_moves_the_borrowers_cores_in_another(tmp_path: Path) -> None:
    path = tmp_path / "prefill-0.busy"
    make_flag(path)
    borrower = CoreBorrower([1], [(str(path), (0,))])
    assert borrower.cores() == [1, 0]  # a new flag is idle
    script = textwrap.dedent(f"""
        import sys
        from pdserve.worker.idle_cores import BusyFlag
        flag = BusyFlag({str(path)!r})
        for line in sys.stdin:
            flag.set(line.strip() == "busy")
            print("ok", flush=True)
    """)
    lender = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert lender.stdin is not None and lender.stdout is not None
    try:
        for state, cores in (("busy", [1]), ("idle", [1, 0]), ("busy", [1])):
            lender.stdin.write(state + "\n")
            lender.stdin.flush()
            assert lender.stdout.readline().strip() == "ok"
            assert borrower.cores() == cores
            assert BusyFlag(path).busy() == (state == "busy")
    finally:
        lender.stdin.close()
        lender.wait(30)
    assert borrower.borrowed_steps == 2


def test_a_lender_whose_flag_is_gone_lends_nothing(tmp_path: Path) -> None:
    borrower = CoreBorrower([1], [(str(tmp_path / "gone.busy"), (0,))])
    assert borrower.cores() == [1]
    assert borrower.borrowed_steps == 0


def test_the_driver_raises_the_flag_for_its_steps_and_lowers_it_when_idle(
        tmp_path: Path) -> None:
    from pdserve.engine import SamplingParams
    from pdserve.engine.config import CacheConfig, EngineConfig
    from pdserve.engine.driver import EngineDriver
    from pdserve.engine.engine import Engine
    from pdserve.engine.outputs import RequestOutput

    path = tmp_path / "decode-0.busy"
    make_flag(path)
    flag = BusyFlag(path)
    reader = BusyFlag(path)
    seen_in_steps: list[bool] = []
    done = threading.Event()

    def on_outputs(outputs: list[RequestOutput]) -> None:
        seen_in_steps.append(reader.busy())  # right after a step, before the next turn
        if any(o.finished for o in outputs):
            done.set()

    engine = Engine(EngineConfig(model="tiny", dtype="float32", device="cpu",
                                 cache=CacheConfig(block_size=16, num_blocks=64)))
    driver = EngineDriver(engine, on_outputs=on_outputs, on_busy=flag.set)
    driver.start()
    try:
        time.sleep(0.05)
        assert not reader.busy()
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        driver.call(lambda e: e.add_request("r", list(range(3, 40)), params)).result(10)
        assert done.wait(30)
        deadline = time.monotonic() + 5
        while reader.busy() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert not reader.busy()
    finally:
        driver.stop()
    # Raised for every step; lowered right after the last one, before its outputs go out
    # (the next request, sent when they arrive, finds the worker idle).
    assert seen_in_steps == [True] * 5 + [False]


@TWO_CORES
def test_a_step_runs_on_the_lenders_core_only_while_the_lender_is_idle(tmp_path: Path) -> None:
    """A process pinned to one core steps on two while its lender's flag is down, one while
    it is up, with the same tokens either way."""
    own, lent = sorted(os.sched_getaffinity(0))[:2]
    path = tmp_path / "prefill-0.busy"
    make_flag(path)
    script = textwrap.dedent(f"""
        import json, os, threading
        from pdserve.worker.affinity import pin_process
        pin_process([{own}])
        from pdserve.engine import LLM, SamplingParams
        from pdserve.worker.idle_cores import BusyFlag, CoreBorrower
        llm = LLM("tiny", dtype="float32", device="cpu", num_blocks=64)
        pinning = llm.engine.runner.pinning
        borrower = CoreBorrower([{own}], [({str(path)!r}, ({lent},))])
        pinning.cores_for_step = borrower.cores
        seen = []
        step = llm.engine.runner._execute  # inside the step's binding
        def spy(batch):
            import torch
            seen.append(torch.get_num_threads())
            return step(batch)
        llm.engine.runner._execute = spy
        lender = BusyFlag({str(path)!r})
        params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
        out = {{}}
        for state in ("idle", "busy", "idle"):
            lender.set(state == "busy")
            seen.clear()
            tokens = llm.generate([[5, 6, 7, 8, 9]], params)[0].token_ids
            masks = sorted({{tuple(sorted(os.sched_getaffinity(int(t))))
                            for t in os.listdir("/proc/self/task")}})
            out[state] = out.get(state, []) + [{{"tokens": tokens, "threads": sorted(set(seen)),
                                                  "masks": masks}}]
        out["borrowed_steps"] = borrower.borrowed_steps
        out["caller"] = sorted(os.sched_getaffinity(0))
        print(json.dumps(out))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    idle, busy = got["idle"], got["busy"][0]
    assert [r["threads"] for r in idle] == [[2], [2]]
    assert busy["threads"] == [1]
    # While borrowing, torch's second thread sits on the lender's core alone.
    assert [lent] in [list(m) for m in idle[0]["masks"]]
    assert idle[0]["tokens"] == busy["tokens"] == idle[1]["tokens"]
    assert got["borrowed_steps"] == 10  # two idle runs of five steps
    assert got["caller"] == [own]  # the stepping thread is back on its own core


@TWO_CORES
@pytest.mark.timeout(300)
def test_a_pinned_cluster_lends_idle_cores_and_serves_exact_tokens() -> None:
    """1P1D pinned to one core each: each worker borrows the other's core while the other
    is idle (the prefill while no decode runs, the decode between prompts), and the tokens
    are the engine's own."""
    from pdserve.engine import LLM, SamplingParams
    from pdserve_client import Client
    from tests.service import ServiceThread

    service = ServiceThread("tiny", 1, 1, pin_cpus=True)
    try:
        assert service.router is not None
        info = {h.worker_id: h.info for h in service.router.cluster.workers.values()}
        cpus = {w: i["cpus"] for w, i in info.items()}
        assert cpus["prefill-0"] != cpus["decode-0"]
        assert info["decode-0"]["borrows"] == cpus["prefill-0"]
        assert info["prefill-0"]["borrows"] == cpus["decode-0"]
        assert info["decode-0"]["lends_cores"] and info["prefill-0"]["lends_cores"]
        flag_dir = service.router.cluster._flag_dir
        assert flag_dir is not None and Path(flag_dir).name.startswith(
            f"{FLAG_DIR_PREFIX}{os.getpid()}-")
        assert sorted(p.name for p in Path(flag_dir).iterdir()) == [
            "decode-0.busy", "prefill-0.busy"]

        prompts = [[3 + i, 7, 11 + 2 * i, 13, 17, 19 + i] * 4 for i in range(3)]
        with Client(service.target) as client:
            got = [list(client.generate(p, max_tokens=12, temperature=0.0,
                                        ignore_eos=True).token_ids) for p in prompts]
        stats = service.wait_idle()
    finally:
        service.stop()
    assert not Path(flag_dir).exists()
    want = LLM("tiny", dtype="float32", device="cpu", num_blocks=128).generate(
        prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert got == [list(o.token_ids) for o in want]
    # One request at a time: every prefill ran while the decode worker was idle, and most
    # decode steps while the prefill worker was.
    assert stats["prefill-0"]["borrowed_core_steps"] >= 3
    assert stats["decode-0"]["borrowed_core_steps"] >= 3 * 11 // 2


def test_serve_shares_idle_cores_unless_told_not_to() -> None:
    from pdserve.cli import _router_config, build_parser

    base = ["serve", "--model", "tiny", "--device", "cpu"]
    assert _router_config(build_parser().parse_args(base)).pools.share_idle_cores
    off = build_parser().parse_args([*base, "--share-idle-cores", "off"])
    assert not _router_config(off).pools.share_idle_cores


def test_a_new_router_removes_the_flags_of_routers_that_are_gone(tmp_path: Path) -> None:
    """A router killed with SIGKILL cannot remove its flags' folder; the next one does,
    and leaves alone those of routers still running and anything else."""
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()
    stale = tmp_path / f"{FLAG_DIR_PREFIX}{killed.pid}-x1"
    running = tmp_path / f"{FLAG_DIR_PREFIX}{os.getppid()}-x2"
    other = tmp_path / "pdserve-other"
    for folder in (stale, running, other):
        folder.mkdir()
        make_flag(folder / "decode-0.busy")
    made = Path(make_flag_dir(tmp_path))
    assert made.parent == tmp_path and made.name.startswith(f"{FLAG_DIR_PREFIX}{os.getpid()}-")
    assert not stale.exists()
    assert running.exists() and other.exists()
