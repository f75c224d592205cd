"""Check the planner's simulator against the real service, on this machine.

    python -m pdserve.bench.plan_check [--configs 1P1D,2P1D,1P2D] [--json PATH]
                                       [--write-costs my-cpu.json]

One local Ray head (``ray start``, token authentication) serves every configuration in
turn: for each, ``pdserve serve --ray-address`` starts the router and its P prefill and D
decode workers (built-in tiny model, CPU), ``pdserve bench serve``'s trace replay sends the
same requests (Mooncake conversation trace, lengths scaled to the tiny model, greedy,
``ignore_eos``), and the service is stopped. Then the planner's simulation replays the same
requests with a costs file calibrated just before, on this machine
(``pdserve.bench.costs``), and the predicted TTFT and TPOT medians are compared with the
measured ones, as is the order of the configurations by each.

The service overheads (``pdserve.planner.costs.Overheads``) are measured on the first
configuration, on three batches of other trace rows than the check's: 16 requests sent one
every 0.25 s (mostly alone), 96 of one output token each in six bursts of 16 a second apart,
and 160 replayed as the check replays its own (bursts of 3 to 16, outputs as the trace has
them). From them: the router process's CPU seconds (``/proc``) per request (over the
one-token bursts), per decode step's message of tokens and per further token (the lone
requests stream a token a step, the replayed traffic several: fitted to both), the shares
of a request's CPU spent taking it in and admitting it (how much later a burst's first
admission comes than a lone one's, per other request of the burst, and how far apart its
admissions are), each worker role's loop CPU seconds per step beyond the engine's step (the
router's ``pdserve:engine_hook_cpu_seconds_total`` / ``pdserve:engine_steps_total``), the
median admission time (``Timing.queue_s``), and what remains once the simulation accounts
for the rest: of the replayed traffic's median prefill time (``Timing.prefill_s``) per
prefill step, of the lone requests' median TPOT per decode step (the worker's other threads
on its core, the tokens' trip to the router) and of their median TTFT per request (the
prefill call's trip, the first token's trip to the client), and of the replayed traffic's
median TTFT per request still waiting for its first token (the answers of a burst crossing
the same processes one after another). The load generator's CPU (this process) is measured
the same way, per request, decode step and streamed token, and so are the cores each worker
process keeps busy besides its steps and whether the workers run at a lower priority than
the router (Ray starts its workers at niceness 15).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.bench.serve import GrpcBackend, run_load
from pdserve.bench.serve_metrics import RequestResult
from pdserve.bench.serve_workload import WorkItem, read_trace, replay, trace_prompts
from pdserve.engine.ports import free_port
from pdserve.planner.costs import (
    HardwareCosts,
    Host,
    Overheads,
    fit_nonnegative,
    parse_costs,
    resolve_costs_path,
)
from pdserve.planner.sim import ClusterSpec, SimResult, simulate
from pdserve.planner.workload import Workload, from_prompts

BIN = Path(sys.executable).parent


@dataclass(frozen=True, slots=True)
class CheckWorkload:
    """Which requests the check replays (the tiny model's 16-token blocks, one per trace
    block: ``length_scale`` 1/32)."""

    trace: str = "conversation"
    offset: int = 0
    requests: int = 160
    length_scale: float = 1 / 32
    max_input: int = 1024
    max_output: int = 48
    time_scale: float = 0.25
    vocab_size: int = 512
    block_size: int = 16

    def items(self) -> list[WorkItem]:
        rows = read_trace(self.trace, "mooncake", self.offset + self.requests)[self.offset:]
        items = trace_prompts(rows, vocab_size=self.vocab_size, length_scale=self.length_scale,
                              max_input_len=self.max_input, max_output_len=self.max_output)
        return replay(items, self.time_scale)

    def workload(self) -> Workload:
        items = self.items()
        return from_prompts([it.arrival_s for it in items],
                            [list(it.prompt) for it in items],  # type: ignore[arg-type]
                            [it.output_len for it in items], self.block_size,
                            name=f"{self.trace}[{self.offset}:{self.offset + self.requests}]")


def machine_busy_fraction(seconds: float = 2.0) -> float:
    """Share of the machine's CPU time spent busy over ``seconds`` (from /proc/stat), while
    this process sleeps: the other work a latency measurement here would share cores
    with."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    total = total1 - total0
    return 1.0 - (idle1 - idle0) / total if total > 0 else 0.0


def parse_config(label: str) -> tuple[int, int]:
    """'2P1D' -> (2, 1)."""
    text = label.upper()
    try:
        p, d = text.rstrip("D").split("P")
        return int(p), int(d)
    except ValueError:
        raise ValueError(f"bad configuration {label!r}; use e.g. 2P1D") from None


@contextmanager
def ray_head(num_cpus: int = 8) -> Iterator[tuple[str, dict[str, str]]]:
    """A local Ray head for the run: (its address, the environment that reaches it)."""
    temp_dir = tempfile.mkdtemp(prefix="pdplan-", dir="/tmp")  # short: unix socket paths
    port = free_port()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               TOKENIZERS_PARALLELISM="false")
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
           "--port", str(port), "--include-dashboard", "false", "--temp-dir", temp_dir,
           "--num-cpus", str(num_cpus), "--disable-usage-stats"]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        raise RuntimeError(f"ray start failed:\n{started.stdout}\n{started.stderr}")
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _cmdlines() -> Iterator[tuple[int, bytes]]:
    """(pid, command line) of each process of this machine (Linux ``/proc``), skipping
    those that end meanwhile."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield int(entry.name), (entry / "cmdline").read_bytes()
            except OSError:
                continue


def _pids_using(temp_dir: str) -> list[int]:
    marker = temp_dir.encode()
    return [pid for pid, cmdline in _cmdlines() if marker in cmdline]


def _stop_head(temp_dir: str) -> None:
    """Stop the processes of the head started on ``temp_dir``, and only those (``ray stop``
    would stop every Ray process of the machine)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _pids_using(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5.0
        while _pids_using(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)


async def _wait_ready(target: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    from pdserve_client import AsyncClient

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pdserve serve exited with {proc.returncode}")
        try:
            async with AsyncClient(target, retries=0) as client:
                await client.list_models(timeout=2)
            return
        except Exception:  # not up yet
            await asyncio.sleep(0.5)
    raise TimeoutError(f"pdserve serve on {target} not ready after {timeout_s:.0f} s")


class _TimedBackend(GrpcBackend):
    """The SDK's stream, keeping each request's router ``Timing`` (on its last chunk)."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.timings: dict[int, Any] = {}

    def observe(self, chunk: Any, result: RequestResult) -> None:
        super().observe(chunk, result)
        if chunk.timing is not None:
            self.timings[id(result)] = chunk.timing


@dataclass(frozen=True, slots=True)
class BatchRun:
    """One batch of requests served: each request's result and router ``Timing`` (None if
    it carried none), and when probed the router process's CPU time and the workers' loop
    counters over the batch, summed by role: ``{"prefill": {"steps": ..., "hook_cpu_s":
    ...}, "decode": {...}}``."""

    results: list[RequestResult]
    timings: list[Any]
    loops: dict[str, dict[str, float]]
    router_cpu_s: float = 0.0
    """When probed: CPU seconds the router's process used over the batch."""
    client_cpu_s: float = 0.0
    """When probed: CPU seconds this process (the load generator) used over the batch."""
    seconds: float = 0.0
    """When probed: wall seconds between the two reads of the loop counters."""
    workers_niced: bool = False
    """When probed: the worker processes ran at a lower priority (a higher niceness) than
    the router's."""


LOOP_COUNTERS = {"steps": "pdserve:engine_steps_total",
                 "step_cpu_s": "pdserve:engine_step_cpu_seconds_total",
                 "hook_cpu_s": "pdserve:engine_hook_cpu_seconds_total",
                 "process_cpu_s": "pdserve:worker_process_cpu_seconds_total"}
STATS_SETTLE_S = 0.6
"""The router's view of worker stats lags by up to one ping interval (0.5 s), more when a
busy worker answers late: counters are read until two reads this far apart agree."""
STATS_WAIT_S = 15.0


async def _loop_counters(target: str) -> dict[str, dict[str, float]]:
    """The workers' step-loop counters (router ``GetStats``), summed by role."""
    from pdserve_client import AsyncClient

    async with AsyncClient(target, retries=0) as client:
        metrics = (await client.stats(timeout=10)).metrics
    out: dict[str, dict[str, float]] = {}
    for key, name in LOOP_COUNTERS.items():
        for sample, value in metrics.items():
            if sample.startswith(name + "{"):
                role = "prefill" if 'role="prefill"' in sample else "decode"
                out.setdefault(role, dict.fromkeys(LOOP_COUNTERS, 0.0))[key] += value
    return out


async def _settled_counters(target: str) -> dict[str, dict[str, float]]:
    """``_loop_counters`` once the router's copy has caught up with the workers (two reads
    ``STATS_SETTLE_S`` apart agree on the loops' counters: the processes' CPU time grows
    whatever they do), or the last read after ``STATS_WAIT_S``."""
    def loops(counters: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        return {role: {k: v for k, v in vals.items() if k != "process_cpu_s"}
                for role, vals in counters.items()}

    deadline = time.monotonic() + STATS_WAIT_S
    last = await _loop_counters(target)
    while True:
        await asyncio.sleep(STATS_SETTLE_S)
        now = await _loop_counters(target)
        if loops(now) == loops(last) or time.monotonic() > deadline:
            return now
        last = now


def _stat_fields(pid: int) -> list[str]:
    """``/proc/PID/stat`` after the command name (field 3 on: state, ppid, ...)."""
    return Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (Linux ``/proc``)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


WORKER_TITLES = (b"ray::PrefillWorker", b"ray::DecodeWorker")


def workers_niced(router_pid: int) -> bool:
    """True if this machine's pdserve worker processes (Ray actors, by process title) run
    at a higher niceness than the router process ``router_pid``."""
    router_nice = int(_stat_fields(router_pid)[16])
    nices = []
    for pid, cmdline in _cmdlines():
        if cmdline.startswith(WORKER_TITLES):
            try:
                nices.append(int(_stat_fields(pid)[16]))
            except (OSError, ValueError, IndexError):  # gone meanwhile
                continue
    return bool(nices) and min(nices) > router_nice


async def _replay(target: str, items: list[WorkItem], router_pid: int | None = None
                  ) -> BatchRun:
    """Replay ``items``; with ``router_pid``, also probe the router's CPU time and the
    workers' loop counters over them."""
    before: dict[str, dict[str, float]] = {}
    cpu0 = client0 = t0 = 0.0
    if router_pid is not None:
        before = await _settled_counters(target)
        cpu0, client0, t0 = process_cpu_s(router_pid), time.process_time(), time.monotonic()
    backend = _TimedBackend(target)
    await backend.start()
    try:
        results, _ = await run_load(backend, items, progress=False)
    finally:
        await backend.close()
    loops: dict[str, dict[str, float]] = {}
    router_cpu = client_cpu = 0.0
    niced = False
    if router_pid is not None:
        router_cpu = process_cpu_s(router_pid) - cpu0
        client_cpu = time.process_time() - client0
        niced = workers_niced(router_pid)
        after = await _settled_counters(target)
        t0 = time.monotonic() - t0
        loops = {role: {k: v - before.get(role, {}).get(k, 0.0) for k, v in vals.items()}
                 for role, vals in after.items()}
    return BatchRun(results, [backend.timings.get(id(r)) for r in results], loops, router_cpu,
                    client_cpu, t0, niced)


def run_service(prefill: int, decode: int, batches: Sequence[list[WorkItem]], address: str,
                env: dict[str, str], *, warmup: int = 4,
                probe: Sequence[int] = ()) -> list[BatchRun]:
    """Serve with ``pdserve serve`` on the Ray head, replay each batch of requests in turn
    (after ``warmup`` requests sent at once), stop the service. The batches whose indices
    are in ``probe`` also read the workers' loop counters before and after."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    cmd = [str(BIN / "pdserve"), "serve", "--ray-address", address, "--port", str(port),
           "--http-port", "0", "--model", "tiny", "--device", "cpu", "--dtype", "float32",
           "--prefill-workers", str(prefill), "--decode-workers", str(decode)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(_wait_ready(target, proc, 180.0))
        if warmup:  # first calls of a fresh worker (allocations, lazy imports) are slow
            first = batches[0][:warmup]
            asyncio.run(_replay(target, [replace(it, arrival_s=0.0) for it in first]))
        return [asyncio.run(_replay(target, items, proc.pid if i in probe else None))
                for i, items in enumerate(batches)]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def medians(ttft: Sequence[float], tpot: Sequence[float]) -> dict[str, float]:
    return {"ttft_s": float(np.nanmedian(ttft)) if len(ttft) else np.nan,
            "tpot_s": float(np.nanmedian(tpot)) if len(tpot) else np.nan}


def measured(results: Sequence[RequestResult]) -> dict[str, float]:
    """Median TTFT and TPOT (seconds) of the completed requests."""
    done = [r for r in results if r.ok]
    if len(done) < len(results):
        errors = sorted({r.error for r in results if not r.ok})
        raise RuntimeError(f"{len(results) - len(done)} requests failed: {errors[:3]}")
    return medians([r.ttft for r in done], [t for r in done if (t := r.tpot) is not None])


def predicted(workload: Workload, costs: HardwareCosts, prefill: int, decode: int,
              seed: int = 0) -> dict[str, float]:
    res = simulate(workload, costs, ClusterSpec(prefill, decode, seed=seed))
    if not res.ok.all():
        raise RuntimeError(f"{int((~res.ok).sum())} simulated requests failed")
    return medians(res.ttft_s, res.tpot_s)


def timing_medians(timings: Sequence[Any]) -> dict[str, float]:
    """Median milliseconds of each router ``Timing`` phase over the requests carrying one."""
    kept = [t for t in timings if t is not None]
    return {k: round(float(np.median([getattr(t, k) for t in kept])) * 1e3, 2)
            for k in ("queue_s", "prefill_s", "transfer_s", "first_token_s")} if kept else {}


def fit_overheads(costs: HardwareCosts, workload: Workload, run: BatchRun,
                  one_token: BatchRun, traffic: Workload, traffic_run: BatchRun,
                  prefill: int, decode: int) -> HardwareCosts:
    """``costs`` with the service overheads measured on a lightly loaded run (``workload``
    served as ``run``: requests mostly alone), on ``one_token`` (bursts of requests of one
    output token, ``one_token_items``) and on ``traffic`` served as ``traffic_run`` (trace
    requests replayed as the check replays its own): the router process's CPU seconds per
    request (from the one-token bursts), per decode step and per further token (from the
    lone requests and the traffic, ``stream_cpu``), the shares of a request's spent
    taking it in and admitting it (from every burst's admission times, ``burst_lines``),
    each worker role's loop CPU seconds per step beyond the engine's (its counters over the
    run), the median admission time (router ``Timing.queue_s``), and what remains once the
    simulation with those terms accounts for the rest: of the traffic's median prefill time
    per prefill step, of the lone requests' median TPOT per decode step and of their median
    TTFT per request, and of the traffic's median TTFT per request still waiting for its
    first token (``Overheads`` says what each term stands for)."""
    per_step = {}
    for role in ("prefill", "decode"):
        loop = run.loops.get(role)
        if not loop or loop["steps"] <= 0:
            raise RuntimeError(f"no {role} steps counted over the calibration run: {run.loops}")
        per_step[role] = loop["hook_cpu_s"] / loop["steps"]
    queue = [t.queue_s for t in run.timings if t is not None]
    burst_timings = [t for t in one_token.timings if t is not None]
    if not queue or not burst_timings:
        raise RuntimeError("the calibration requests carried no router timing")
    router_s = one_token.router_cpu_s / len(one_token.results)
    step_s, token_s = stream_cpu(router_s, run, traffic_run)
    lines = (burst_lines([it.arrival_s for it in one_token_items()], one_token.timings)
             + burst_lines(list(traffic.arrival_s), traffic_run.timings))
    lone = float(np.median(queue))
    slope = float(np.median([b for _, b, _ in lines]))
    # A burst's first admission comes after the router took in the whole burst.
    receive = float(np.median([max(0.0, (a - lone) / (n - 1)) for a, _, n in lines if n > 1]))
    admit_share = min(1.0, slope / router_s) if router_s > 0 else 1.0
    terms = Overheads(admission_s=lone,
                      router_cpu_s=router_s,
                      router_admit_share=admit_share,
                      router_receive_share=(min(1.0 - admit_share, receive / router_s)
                                            if router_s > 0 else 0.0),
                      router_token_s=token_s,
                      router_step_s=step_s,
                      prefill_step_s=per_step["prefill"],
                      decode_step_s=per_step["decode"])

    def sim(wl: Workload, over: Overheads) -> SimResult:
        return simulate(wl, replace(costs, overheads=over), ClusterSpec(prefill, decode))

    traffic_timings = [t for t in traffic_run.timings if t is not None]
    if not traffic_timings:
        raise RuntimeError("the calibration traffic carried no router timing")
    real_prefill = float(np.median([t.prefill_s for t in traffic_timings]))
    terms = replace(terms, prefill_step_s=terms.prefill_step_s + fit_term(
        lambda x: float(np.nanmedian(sim(traffic, replace(
            terms, prefill_step_s=terms.prefill_step_s + x)).prefilled_s)),
        real_prefill, real_prefill))
    real = measured(run.results)
    terms = replace(terms, decode_step_s=per_step["decode"] + tpot_residual(
        costs, terms, workload, prefill, decode, real["tpot_s"]))
    real_traffic = measured(traffic_run.results)
    terms = replace(terms, decode_join_s=fit_term(
        lambda x: float(np.nanmedian(sim(traffic, replace(terms, decode_join_s=x)).tpot_s)),
        real_traffic["tpot_s"], real_traffic["tpot_s"] * 50))
    lone = predicted(workload, replace(costs, overheads=terms), prefill, decode)
    terms = replace(terms, request_s=max(0.0, real["ttft_s"] - lone["ttft_s"]))
    terms = replace(terms, answer_wait_s=fit_term(
        lambda x: float(np.nanmedian(sim(traffic, replace(terms, answer_wait_s=x)).ttft_s)),
        real_traffic["ttft_s"], real_traffic["ttft_s"]))
    return replace(costs, overheads=terms)


def stream_cpu(request_s: float, *runs: BatchRun,
               cpu: Callable[[BatchRun], float] = lambda run: run.router_cpu_s
               ) -> tuple[float, float]:
    """The router's CPU seconds per decode step's message of tokens and per further token
    (``Overheads.router_step_s``, ``router_token_s``), from probed runs streaming tokens at
    different batch sizes (a lone request's steps carry one token each, a burst's several):
    what each run's router CPU leaves beyond ``request_s`` a request, fitted to the decode
    steps and further tokens of each (non-negative least squares, relative error). With
    ``cpu``, of another process's CPU over each run (the load generator's)."""
    rows, extra = [], []
    for run in runs:
        tokens = sum(r.output_len - 1 for r in run.results)
        steps = run.loops.get("decode", {}).get("steps", 0.0)
        rest = cpu(run) - request_s * len(run.results)
        if tokens > 0 and steps > 0 and rest > 0:
            rows.append([steps, tokens])
            extra.append(rest)
    if not rows:
        return 0.0, 0.0
    fit = fit_nonnegative(np.array(rows, dtype=float), np.array(extra))
    return fit.coef[0], fit.coef[1]


def fit_term(predict: Callable[[float], float], target: float, hi: float) -> float:
    """The ``x`` in ``[0, hi]`` at which ``predict(x)``, growing with ``x``, reaches
    ``target`` (bisection); 0 when ``predict(0)`` is already there."""
    if not target > predict(0.0):
        return 0.0
    lo = 0.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predict(mid) < target else (lo, mid)
    return (lo + hi) / 2


def tpot_residual(costs: HardwareCosts, terms: Overheads, workload: Workload, prefill: int,
                   decode: int, real_tpot_s: float) -> float:
    """Seconds per decode step to add to ``terms.decode_step_s`` for the simulated median
    TPOT of ``workload`` to match ``real_tpot_s`` (0 when the simulation is already slower):
    what a step costs beyond its engine step and loop on a lightly loaded service (the
    worker's other threads on its core, the tokens' trip to the router)."""
    def tpot(extra: float) -> float:
        over = replace(terms, decode_step_s=terms.decode_step_s + extra)
        return predicted(workload, replace(costs, overheads=over), prefill, decode)["tpot_s"]

    return fit_term(tpot, real_tpot_s, real_tpot_s)


def with_load_generator(costs: HardwareCosts, client: LoadGenerator,
                        workload: Workload) -> HardwareCosts:
    """``costs`` whose host counts the load generator sharing the machine's cores: its CPU
    seconds per request at ``workload``'s mean request rate, as background threads, and its
    CPU seconds per streamed token and per decode step's tokens (``Host.client_token_s``,
    ``client_step_s``), at the rates of the moment."""
    if costs.host is None:
        return costs
    span = float(workload.arrival_s[-1] - workload.arrival_s[0])
    rate = len(workload) / span if span > 0 else 0.0
    return replace(costs, host=replace(costs.host, background_threads=client.request_s * rate,
                                       client_token_s=client.token_s,
                                       client_step_s=client.step_s))


@dataclass(frozen=True, slots=True)
class LoadGenerator:
    """This process's CPU seconds as the load generator: per request (sending it, its first
    response), per further streamed token, and per decode step whose tokens it reads (the
    streams of one step's tokens come in together: one wake-up of its event loop)."""

    request_s: float
    token_s: float
    step_s: float = 0.0

    @classmethod
    def measure(cls, one_token: BatchRun, *runs: BatchRun) -> LoadGenerator:
        """From a run of requests of one output token each, and runs streaming tokens at
        different batch sizes (as the router's ``router_cpu_s``, ``router_step_s`` and
        ``router_token_s``)."""
        request_s = one_token.client_cpu_s / len(one_token.results)
        step_s, token_s = stream_cpu(request_s, *runs, cpu=lambda r: r.client_cpu_s)
        return cls(request_s, token_s, step_s)


def with_worker_background(costs: HardwareCosts, run: BatchRun, workers: int) -> HardwareCosts:
    """``costs`` whose host counts the cores each worker process keeps busy besides its
    step loop: its process CPU less its loop's (``run``'s counters, every worker summed)
    over the probe window, per worker (mostly idle requests: the polling and Ray threads
    every worker runs whatever it does)."""
    if costs.host is None or run.seconds <= 0:
        return costs
    other = sum(max(0.0, v["process_cpu_s"] - v["step_cpu_s"] - v["hook_cpu_s"])
                for v in run.loops.values())
    return replace(costs, host=replace(costs.host,
                                       worker_background=other / (run.seconds * workers)))


def same_order(real: dict[str, float], sim: dict[str, float], margin: float) -> bool:
    """True if the simulation orders every pair of configurations whose measured values
    differ by more than ``margin`` (relative) as the measurement does."""
    labels = list(real)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            lo, hi = sorted((real[a], real[b]))
            if hi > lo * (1 + margin) and (real[a] < real[b]) != (sim[a] < sim[b]):
                return False
    return True


@dataclass(frozen=True, slots=True)
class CheckResult:
    real: dict[str, dict[str, float]]
    sim: dict[str, dict[str, float]]
    overheads: Overheads
    seconds: float
    host: Host | None = None
    """The shared host as measured: each worker's own background, the load generator's
    CPU, whether the workers yield the cores to the router."""

    def errors(self) -> dict[str, dict[str, float]]:
        """Relative error sim / real - 1 of each median."""
        return {c: {k: self.sim[c][k] / self.real[c][k] - 1 for k in ("ttft_s", "tpot_s")}
                for c in self.real}

    def table(self) -> str:
        lines = ["| config | TTFT real | TTFT sim | error | TPOT real | TPOT sim | error |",
                 "|---|---|---|---|---|---|---|"]
        for c, err in self.errors().items():
            r, s = self.real[c], self.sim[c]
            lines.append(f"| {c} | {r['ttft_s'] * 1e3:.1f} ms | {s['ttft_s'] * 1e3:.1f} ms | "
                         f"{err['ttft_s']:+.0%} | {r['tpot_s'] * 1e3:.2f} ms | "
                         f"{s['tpot_s'] * 1e3:.2f} ms | {err['tpot_s']:+.0%} |")
        return "\n".join(lines)


CALIBRATION = CheckWorkload(offset=400, requests=16)
"""Requests sent one every ``CALIBRATION_GAP_S`` to fit the overheads (other rows of the
trace than the check's)."""
CALIBRATION_GAP_S = 0.25


def calibration_items() -> list[WorkItem]:
    return [replace(it, arrival_s=i * CALIBRATION_GAP_S)
            for i, it in enumerate(CALIBRATION.items())]


ONE_TOKEN = CheckWorkload(offset=420, requests=96)
"""Requests of one output token each, sent in bursts of ``BURST`` every ``BURST_GAP_S``: the
router's CPU per request without streaming, how fast it admits a burst, and what a burst
costs beyond the steps (other rows of the trace again)."""
BURST = 16
BURST_GAP_S = 1.0


def one_token_items() -> list[WorkItem]:
    return [replace(it, arrival_s=(i // BURST) * BURST_GAP_S, output_len=1)
            for i, it in enumerate(ONE_TOKEN.items())]


TRAFFIC = CheckWorkload(offset=200)
"""Trace requests replayed as the check replays its own (other rows of the trace: bursts of
3 to 16 at the trace's instants, outputs as the trace has them): what the service adds to
the prefills and first tokens of such traffic beyond the simulated steps."""


def burst_lines(arrival_s: Sequence[float], timings: Sequence[Any]
                ) -> list[tuple[float, float, int]]:
    """``admission_line`` of each burst (requests arriving at the same instant) of a
    replay, from the ``Timing`` of each request (None: left out)."""
    bursts: dict[float, list[float]] = {}
    for t, timing in zip(arrival_s, timings, strict=True):
        if timing is not None:
            bursts.setdefault(float(t), []).append(timing.queue_s)
    return [admission_line(q) for q in bursts.values() if len(q) > 1]


def admission_line(queue_s: Sequence[float]) -> tuple[float, float, int]:
    """A burst's sorted ``Timing.queue_s`` over their rank, fitted by least squares: (the
    first admission's time, the seconds from one admission to the next, the burst's
    size)."""
    n = len(queue_s)
    if n < 2:
        return (float(queue_s[0]) if n else 0.0), 0.0, n
    slope, first = np.polyfit(np.arange(n), np.sort(queue_s), 1)
    return float(first), max(0.0, float(slope)), n


def check(costs: HardwareCosts, configs: Sequence[str], spec: CheckWorkload,
          log: Any = None) -> CheckResult:
    """Run every configuration for real on one Ray head (the first also serves the
    calibration requests, which fit the overheads), then simulate each."""
    t0 = time.monotonic()
    items = spec.items()
    cal_items = calibration_items()
    traffic_items = TRAFFIC.items()
    real: dict[str, dict[str, float]] = {}
    cal_run = one_run = traffic_run = None
    with ray_head() as (address, env):
        for n, label in enumerate(configs):
            batches = ([cal_items, one_token_items(), traffic_items, items] if n == 0
                       else [items])
            runs = run_service(*parse_config(label), batches, address, env,
                               probe=(0, 1, 2) if n == 0 else ())
            if n == 0:
                cal_run, one_run, traffic_run = runs[0], runs[1], runs[2]
            real[label] = measured(runs[-1].results)
            if log:
                log(f"{label}: {real[label]} after {time.monotonic() - t0:.0f} s; router "
                    f"timing medians {timing_medians(runs[-1].timings)}")
    cal_wl = from_prompts([it.arrival_s for it in cal_items],
                          [list(it.prompt) for it in cal_items],  # type: ignore[arg-type]
                          [it.output_len for it in cal_items], spec.block_size)
    assert cal_run is not None and one_run is not None and traffic_run is not None
    client = LoadGenerator.measure(one_run, cal_run, traffic_run)
    costs = with_worker_background(costs, cal_run, sum(parse_config(configs[0])))
    if costs.host is not None:
        costs = replace(costs, host=replace(costs.host, workers_yield=cal_run.workers_niced))
    traffic = TRAFFIC.workload()
    costs = fit_overheads(with_load_generator(costs, client, cal_wl), cal_wl, cal_run,
                          one_run, traffic, traffic_run, *parse_config(configs[0]))
    workload = spec.workload()
    costs = with_load_generator(costs, client, workload)
    host = costs.host or Host(cores=1.0)
    if log:
        log(f"calibration: router timing medians {timing_medians(cal_run.timings)}; "
            f"worker loops {cal_run.loops}")
        log(f"measured: {costs.overheads}; load generator {client.request_s * 1e3:.1f} ms "
            f"CPU a request ({host.background_threads:.2f} cores), "
            f"{client.token_s * 1e3:.2f} ms a token, {client.step_s * 1e3:.2f} ms a decode "
            f"step; each worker's own background "
            f"{host.worker_background:.2f} cores; workers yield to the router: "
            f"{host.workers_yield}")
    sim = {label: predicted(workload, costs, *parse_config(label)) for label in configs}
    if log:
        for label in configs:
            res = simulate(workload, costs, ClusterSpec(*parse_config(label)))
            log(f"{label} simulated medians: queue {np.nanmedian(res.sent_s) * 1e3:.2f} ms, "
                f"prefill {np.nanmedian(res.prefilled_s) * 1e3:.2f} ms, first token "
                f"{np.nanmedian(res.ttft_s) * 1e3:.2f} ms")
    return CheckResult(real, sim, costs.overheads, time.monotonic() - t0, costs.host)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.plan_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="1P1D,2P1D,1P2D")
    p.add_argument("--costs", default=None,
                   help="costs file (default: calibrate the engine here first)")
    p.add_argument("--requests", type=int, default=CheckWorkload().requests)
    p.add_argument("--time-scale", type=float, default=CheckWorkload().time_scale)
    p.add_argument("--json", default=None)
    p.add_argument("--write-costs", default=None, metavar="PATH",
                   help="write a costs file: the engine's steps measured here (unless --costs) "
                        "and the service overheads measured on the calibration requests")
    args = p.parse_args(argv)
    spec = CheckWorkload(requests=args.requests, time_scale=args.time_scale)
    if args.costs:
        data = json.loads(resolve_costs_path(args.costs).read_text(encoding="utf-8"))
    else:
        data = calibration_data()
    costs = parse_costs(data)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    result = check(costs, configs, spec, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"overheads measured on the calibration requests: {result.overheads}")
    if args.write_costs:
        data["overheads"] = asdict(result.overheads)
        if data.get("host") and result.host is not None:
            data["host"].update({k: getattr(result.host, k) for k in (
                "worker_background", "client_token_s", "client_step_s", "workers_yield")})
        Path(args.write_costs).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(result.table())
    for key in ("ttft_s", "tpot_s"):
        real = {c: v[key] for c, v in result.real.items()}
        sim = {c: v[key] for c, v in result.sim.items()}
        print(f"{key[:4].upper()} order: real {rank(real)}, sim {rank(sim)}; pairs apart by "
              f"> {RANK_MARGIN:.0%} ordered alike: {same_order(real, sim, RANK_MARGIN)}")
    print(f"{result.seconds:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"real": result.real, "sim": result.sim, "overheads": str(result.overheads)},
            indent=1))
    return 0


RANK_MARGIN = 0.15
"""Configurations whose measured medians are closer than this are not ranked."""


def rank(values: dict[str, float]) -> list[str]:
    """Configuration labels, best (lowest) first."""
    return sorted(values, key=lambda k: values[k])


def calibration_data() -> dict[str, Any]:
    """A costs file's data (no overheads yet): the engine's step costs measured now, in this
    process (``pdserve.bench.costs``, CPU time of the stepping thread), on a machine of
    ``os.cpu_count()`` cores shared by the workers."""
    from pdserve.bench.costs import calibrate

    # CPU time: what a step costs on a core of its own, whatever else runs meanwhile (on
    # an idle machine the same as the wall clock); the workers' sharing of the cores is
    # the host model's.
    data = calibrate("tiny", quick=True, cpu_time=True, repeats=5)
    data["transfer"] = dict(LOCAL_LINK)
    data["host"] = {"cores": os.cpu_count() or 1, "threads_per_worker": 1,
                    "background_threads": BACKGROUND_THREADS}
    return data


def calibrate_here() -> HardwareCosts:
    """``calibration_data()``, fitted."""
    return parse_costs(calibration_data())


LOCAL_LINK = {"link_bytes_per_s": 4.12e9, "latency_s": 0.000195,
              "source": "README: pdserve.bench.kvtransfer, NIXL block lists and one block"}
"""Two workers on one machine (UCX over shared memory), as measured by bench.kvtransfer."""
BACKGROUND_THREADS = 0.0
"""Written into the costs file's host: the check sets it from the load generator it measures
(``with_load_generator``); the router's own work is ``Overheads.router_cpu_s``."""


if __name__ == "__main__":
    sys.exit(main())
