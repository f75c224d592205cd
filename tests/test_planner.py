"""The planner: cost model fits and files, the simulation's timing (checked against hand
arithmetic and a step-by-step replay), determinism, the search, metrics, ``--watch``'s
scrape, and the ``pdserve plan`` command. Pure logic: milliseconds to a few seconds."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pdserve.cli import main as cli_main
from pdserve.planner.costs import (
    HARDWARE_DIR,
    SCHEMA,
    HardwareCosts,
    Host,
    LinearFit,
    Overheads,
    attention_pairs,
    fit_nonnegative,
    load_costs,
    parse_costs,
)
from pdserve.planner.metrics import SLO, summarize
from pdserve.planner.search import SearchConfig, plan
from pdserve.planner.sim import ClusterSpec, simulate
from pdserve.planner.watch import parse_prometheus, traffic, workload_for
from pdserve.planner.workers import DecodeSim, SimRequest
from pdserve.planner.workload import Workload, from_prompts, load_trace

# A toy machine: prefill 1 ms + 10 us a token (no attention term), decode 2 ms + 0.1 ms a
# sequence + 1 us a context token, 1 MB/s link of 1 KB/token.
TOY = HardwareCosts(
    name="toy",
    prefill=LinearFit((0.001, 1e-5, 0.0), 0.0),
    decode=LinearFit((0.002, 1e-4, 1e-6), 0.0),
    kv_bytes_per_token=1000,
    link_bytes_per_s=1e6,
    link_latency_s=0.0005,
)


def workload(arrivals: list[float], prompts: list[int], outputs: list[int]) -> Workload:
    n = len(arrivals)
    return Workload(np.array(arrivals, dtype=float), np.array(prompts), np.array(outputs),
                    ((),) * n, 16)


def toy_file(**changes: object) -> dict:
    data = {
        "schema": SCHEMA, "name": "toy", "kv_bytes_per_token": 1000,
        "prefill_steps": [{"tokens": t, "context": 0, "ms": 1 + 0.01 * t} for t in (16, 64, 256)],
        "decode_steps": [{"batch": b, "context": k, "ms": 2 + 0.1 * b + 0.001 * b * k}
                         for b in (1, 8, 64) for k in (100, 1000)],
    }
    data.update(changes)
    return data


# ---------------------------------------------------------------------- costs


def test_fit_recovers_a_linear_model_and_drops_negative_terms() -> None:
    x = np.array([[1, t, t * t] for t in (1.0, 2.0, 5.0, 9.0)])
    fit = fit_nonnegative(x, x @ np.array([0.5, 0.25, 0.0]))
    assert fit.coef == pytest.approx((0.5, 0.25, 0.0), abs=1e-9) and fit.max_rel_error < 1e-9
    # Decreasing data would want a negative slope: the fit keeps every term >= 0.
    fit = fit_nonnegative(x[:, :2], np.array([4.0, 3.0, 2.0, 1.0]))
    assert min(fit.coef) >= 0


def test_costs_file_is_fitted_on_load() -> None:
    costs = parse_costs(toy_file(transfer={"link_bytes_per_s": 2e6, "latency_s": 0.001}))
    assert costs.prefill_step_s(100, attention_pairs(100, 0)) == pytest.approx(0.002)
    assert costs.decode_step_s(8, 8 * 1000) == pytest.approx(0.0108)
    assert costs.transfer_s(1000) == pytest.approx(0.001 + 0.5)
    measured = {"admission_s": 0.005, "request_s": 0.008, "prefill_step_s": 0.0007,
                "decode_step_s": 0.0002}
    costs = parse_costs(toy_file(overheads=measured))
    assert costs.overheads == Overheads(**measured)
    assert costs.decode_step_s(8, 8 * 1000) == pytest.approx(0.0108 + 0.0002)


def test_every_measured_term_reads_back_from_a_costs_file() -> None:
    # What ``plan_check --write-costs`` writes: every overhead and host field.
    from dataclasses import asdict

    over = Overheads(admission_s=0.005, router_cpu_s=0.005, router_admit_share=0.1,
                     router_receive_share=0.12, router_token_s=5e-5, router_step_s=4e-4,
                     request_s=0.001, answer_wait_s=0.004, prefill_step_s=0.001,
                     decode_join_s=0.0015, decode_step_s=0.0006)
    host = Host(cores=2.0, background_threads=0.01, worker_background=0.07,
                client_token_s=5e-5, client_step_s=2e-4, workers_yield=True)
    costs = parse_costs(toy_file(overheads=asdict(over), host=asdict(host)))
    assert costs.overheads == over
    assert costs.host == host


@pytest.mark.parametrize(("change", "message"), [
    ({"schema": "other/1"}, "schema"),
    ({"kv_bytes_per_token": -1}, "kv_bytes_per_token must be positive"),
    ({"prefill_steps": []}, "prefill_steps"),
    ({"decode_steps": [{"batch": 1, "context": 1}]}, "decode_steps\\[0\\]: missing 'ms'"),
    ({"decode_steps": [{"batch": 1, "context": 1, "ms": 0}]}, "ms must be positive"),
    ({"host": {"threads_per_worker": 1}}, "host: missing 'cores'"),
    ({"overheads": {"admission_s": -0.001}}, "overheads.admission_s must be >= 0"),
    ({"overheads": {"router_admit_share": 1.5}}, "router_admit_share must be within"),
    ({"overheads": {"router_admit_share": 0.6, "router_receive_share": 0.5}},
     "router_receive_share \\+ router_admit_share must be at most 1"),
    ({"host": {"cores": 2, "client_token_s": -1}}, "host.client_token_s must be >= 0"),
])
def test_bad_costs_files_name_the_field(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_costs(toy_file(**change))


def test_shipped_costs_files_load_and_fit_their_measurements() -> None:
    names = sorted(p.stem for p in HARDWARE_DIR.glob("*.json"))
    assert "h100-llama3-8b" in names and "cpu-tiny" in names
    h100 = load_costs("h100-llama3-8b")
    assert h100.prefill_step_s(2048, attention_pairs(2048, 0)) == pytest.approx(0.0515, rel=0.01)
    assert h100.decode.max_rel_error < 0.05
    with pytest.raises(FileNotFoundError, match="h100-llama3-8b"):
        load_costs("no-such-machine")


# ---------------------------------------------------------------------- simulation


def test_one_request_times_match_hand_arithmetic() -> None:
    costs = replace(TOY, overheads=Overheads(admission_s=0.003, request_s=0.004,
                                             prefill_step_s=0.0002, decode_step_s=0.0005))
    res = simulate(workload([0.0], [100], [4]), costs, ClusterSpec(1, 1, idle_poll_s=0.0))
    prefill = 0.001 + 100 * 1e-5 + 0.0002         # one step of 100 tokens, and the loop's
    transfer = 0.0005 + 100 * 1000 / 1e6          # the whole prompt in that step's write
    assert res.ttft_s[0] == pytest.approx(0.003 + prefill + transfer + 0.004)
    # Three decode steps of one sequence, context 101, 102, 103.
    steps = [0.002 + 1e-4 + 1e-6 * c + 0.0005 for c in (101, 102, 103)]
    assert res.tpot_s[0] == pytest.approx(sum(steps) / 3)
    assert res.e2e_s[0] == pytest.approx(res.ttft_s[0] + sum(steps))


def test_a_burst_queues_at_the_router_one_request_at_a_time() -> None:
    # The router's process works router_cpu_s on each request: four arriving together are
    # taken up 50 ms apart, each sent to prefill admission_s after it was taken up.
    costs = replace(TOY, overheads=Overheads(admission_s=0.003, router_cpu_s=0.05))
    res = simulate(workload([0.0] * 4, [100] * 4, [1] * 4), costs,
                   ClusterSpec(1, 1, idle_poll_s=0.0))
    alone = 0.003 + (0.001 + 100 * 1e-5) + (0.0005 + 100 * 1000 / 1e6)
    assert sorted(res.ttft_s) == pytest.approx([alone + 0.05 * i for i in range(4)])


def test_the_routers_work_on_each_answer_queues_the_first_tokens_of_a_burst() -> None:
    # 50 ms of router CPU a request, a fifth of it admitting: four arriving together are
    # admitted 10 ms apart, then each prefill's answer waits for the router's 40 ms on it,
    # one answer after another, the first as soon as the admissions are done.
    costs = replace(TOY, overheads=Overheads(admission_s=0.003, router_cpu_s=0.05,
                                             router_admit_share=0.2))
    res = simulate(workload([0.0] * 4, [100] * 4, [1] * 4), costs,
                   ClusterSpec(1, 1, idle_poll_s=0.0))
    landed = 0.003 + (0.001 + 100 * 1e-5) + (0.0005 + 100 * 1000 / 1e6)
    assert landed > 4 * 0.01  # the router is done admitting when the first answer comes
    assert sorted(res.ttft_s) == pytest.approx([landed + 0.04 * (i + 1) for i in range(4)])
    assert sorted(res.sent_s) == pytest.approx([0.003 + 0.01 * i for i in range(4)])


def test_a_burst_is_taken_in_whole_before_its_first_reservation_answer() -> None:
    # 50 ms of router CPU a request: 10 taking it in, 10 admitting it once its reservation
    # answers, 25 ms a lone admission in all (so the reservation's trip is 5 ms). Alone, the
    # prefill goes out 25 ms after arrival; four arriving together are taken in by 40 ms,
    # their reservations answer at 45 ms, and the four are admitted 10 ms apart from there:
    # the first 30 ms later than alone, 10 ms for each other request of the burst.
    costs = replace(TOY, overheads=Overheads(admission_s=0.025, router_cpu_s=0.05,
                                             router_admit_share=0.2,
                                             router_receive_share=0.2))
    spec = ClusterSpec(1, 1, idle_poll_s=0.0)
    lone = simulate(workload([0.0], [100], [1]), costs, spec)
    assert lone.sent_s[0] == pytest.approx(0.025)
    burst = simulate(workload([0.0] * 4, [100] * 4, [1] * 4), costs, spec)
    assert sorted(burst.sent_s) == pytest.approx([0.055, 0.065, 0.075, 0.085])


def test_each_answer_of_a_burst_waits_for_those_still_coming_and_its_stream_with_it() -> None:
    # Four prompts arriving together (the first prefilled alone, the other three in the next
    # step): each answer waits 10 ms for every request still without its first token, 30
    # ms for the first, then 20, 10 and 0 ms.
    wl = workload([0.0] * 4, [100] * 4, [5] * 4)
    spec = ClusterSpec(1, 1, idle_poll_s=0.0)
    base = simulate(wl, TOY, spec)
    waited = simulate(wl, replace(TOY, overheads=Overheads(answer_wait_s=0.01)), spec)
    assert base.ttft_s[0] < base.ttft_s[1] == base.ttft_s[3]
    assert waited.ttft_s[0] - base.ttft_s[0] == pytest.approx(0.03)
    assert sorted(waited.ttft_s - base.ttft_s) == pytest.approx([0.0, 0.01, 0.02, 0.03])
    # The tokens behind the first come through the same processes: the stream moves with it.
    assert waited.e2e_s - base.e2e_s == pytest.approx(waited.ttft_s - base.ttft_s)
    assert waited.tpot_s == pytest.approx(base.tpot_s)


def test_streamed_tokens_take_cores_at_the_rate_of_the_moment() -> None:
    host = Host(cores=1.0)
    # One busy worker and tokens that alone would keep 2 cores busy: at stretch s they
    # come s times slower, so s = 1 + 2 / s, s = 2.
    assert host.stretch(1, True, token_cores=2.0) == pytest.approx(2.0)
    assert host.stretch(1, True) == 1.0
    # One sequence decoding on one core; its first step (context 101) would stream a token
    # every 2.201 ms; the router and the client each spend that long on a token: two
    # more cores at that rate, so its steps run twice as slow.
    step = 0.002 + 1e-4 + 1e-6 * 101
    costs = replace(TOY, host=replace(host, client_token_s=step),
                    overheads=Overheads(router_token_s=step))
    res = simulate(workload([0.0], [100], [3]), costs, ClusterSpec(1, 1, idle_poll_s=0.0))
    steps = [0.002 + 1e-4 + 1e-6 * c for c in (101, 102)]
    assert res.tpot_s[0] == pytest.approx(2 * sum(steps) / 2)
    # Tokens streamed earlier weigh nothing on a request that comes after they are done.
    res = simulate(workload([0.0, 10.0], [100, 100], [3, 3]), costs,
                   ClusterSpec(1, 1, idle_poll_s=0.0))
    assert res.tpot_s[1] == pytest.approx(res.tpot_s[0])


def test_workers_of_lower_priority_share_what_the_router_leaves() -> None:
    # Two cores, the router at work, two workers stepping: alike, 3 threads on 2 cores (1.5x);
    # yielding, the workers share the one core the router leaves (2x).
    assert Host(cores=2.0).stretch(2, True, 1) == pytest.approx(1.5)
    host = Host(cores=2.0, workers_yield=True)
    assert host.stretch(2, True, 1) == pytest.approx(2.0)
    assert host.stretch(1, True, 0) == 1.0
    # Tokens at 0.5 cores alone: they come s times slower, so the workers have 1 - 0.5 / s
    # of the core: s = (2 + 0.5) / 1.
    assert host.stretch(2, True, 1, token_cores=0.5) == pytest.approx(2.5)


def test_the_router_works_per_decode_step_and_per_token() -> None:
    # One decode worker on one core, two sequences: the router's work per step's message
    # counts once a step, its work per token twice.
    step = 0.002 + 2e-4 + 1e-6 * 202
    wl = workload([0.0, 0.0], [100, 100], [3, 3])
    spec = ClusterSpec(1, 1, idle_poll_s=0.0)
    host = Host(cores=1.0)
    per_step = simulate(wl, replace(TOY, host=host, overheads=Overheads(router_step_s=step)),
                        spec)
    per_token = simulate(wl, replace(TOY, host=host,
                                     overheads=Overheads(router_token_s=step)), spec)
    alone = simulate(wl, replace(TOY, host=host), spec)
    assert np.nanmax(alone.tpot_s) < np.nanmax(per_step.tpot_s) < np.nanmax(per_token.tpot_s)


def test_each_request_joining_a_decode_batch_holds_up_its_next_step() -> None:
    # The worker's 5 ms on each request that joins its batch comes before its next step: a
    # lone request's tokens come 5 ms later; with a second joining while the first decodes,
    # the first's remaining tokens wait for both joins.
    spec = ClusterSpec(1, 1, idle_poll_s=0.0)
    held = replace(TOY, overheads=Overheads(decode_join_s=0.005))
    wl = workload([0.0], [100], [4])
    base, slow = simulate(wl, TOY, spec), simulate(wl, held, spec)
    assert slow.ttft_s == pytest.approx(base.ttft_s)
    assert slow.e2e_s - base.e2e_s == pytest.approx([0.005])
    wl = workload([0.0, 0.0], [100, 100], [4, 4])
    base, slow = simulate(wl, TOY, spec), simulate(wl, held, spec)
    assert slow.ttft_s == pytest.approx(base.ttft_s)
    assert slow.e2e_s[0] - base.e2e_s[0] >= 0.010


def test_the_routers_stream_cpu_splits_into_steps_and_tokens() -> None:
    from pdserve.bench.plan_check import BatchRun, stream_cpu
    from pdserve.bench.serve_metrics import RequestResult

    def run(requests: int, output: int, steps: int, step_s: float, token_s: float) -> BatchRun:
        results = [RequestResult(prompt_len=100, output_len=output) for _ in range(requests)]
        cpu = requests * 0.005 + steps * step_s + requests * (output - 1) * token_s
        return BatchRun(results, [None] * requests, {"decode": {"steps": steps}}, cpu)

    # 16 lone requests (a token a step), 96 in bursts (six tokens a step).
    lone, burst = run(16, 41, 640, 3e-4, 1e-4), run(96, 41, 640, 3e-4, 1e-4)
    step_s, token_s = stream_cpu(0.005, lone, burst)
    assert step_s == pytest.approx(3e-4)
    assert token_s == pytest.approx(1e-4)


def test_a_bursts_admission_times_give_the_routers_time_per_admission() -> None:
    from pdserve.bench.plan_check import admission_line

    assert admission_line([0.033, 0.003, 0.023, 0.013])[1] == pytest.approx(0.01)
    assert admission_line([0.004])[1] == 0.0
    assert admission_line([0.004, 0.004, 0.004])[1] == pytest.approx(0.0, abs=1e-12)


def test_workers_of_a_higher_niceness_than_the_router_are_seen_as_such() -> None:
    import os
    import subprocess
    import time

    from pdserve.bench.plan_check import workers_niced

    if os.nice(0) >= 19:
        pytest.skip("this process already runs at the lowest priority")
    # A process titled as a pdserve worker, at a lower priority than this one (as Ray
    # starts its workers).
    worker = subprocess.Popen(["nice", "-n", "5", "bash", "-c",
                               "exec -a ray::DecodeWorker sleep 30"])
    try:
        deadline = time.monotonic() + 10
        while not workers_niced(os.getpid()):
            assert time.monotonic() < deadline, "the niced worker was not found"
            time.sleep(0.05)
    finally:
        worker.kill()
        worker.wait()


def test_a_bursts_first_admission_gives_the_routers_time_to_take_each_request_in() -> None:
    from pdserve.bench.plan_check import admission_line

    first, slope, n = admission_line([0.033, 0.003, 0.023, 0.013])
    assert (first, slope, n) == (pytest.approx(0.003), pytest.approx(0.01), 4)
    assert admission_line([0.004]) == (0.004, 0.0, 1)


def test_a_busy_router_takes_a_core_from_the_workers() -> None:
    host = Host(cores=1.0)
    costs = replace(TOY, host=host, overheads=Overheads(router_cpu_s=0.5))
    alone = replace(TOY, host=host)
    # The request's steps all run while the router still works on it.
    wl = workload([0.0], [100], [6])
    slow = simulate(wl, costs, ClusterSpec(1, 1, idle_poll_s=0.0))
    fast = simulate(wl, alone, ClusterSpec(1, 1, idle_poll_s=0.0))
    steps = [0.002 + 1e-4 + 1e-6 * c for c in range(101, 106)]
    assert fast.tpot_s[0] == pytest.approx(sum(steps) / 5)
    assert slow.tpot_s[0] == pytest.approx(2 * sum(steps) / 5)  # two busy on one core


def test_decode_worker_closed_form_matches_stepping_one_step_at_a_time() -> None:
    jobs = {0: (50, 30), 1: (300, 7), 2: (10, 19)}  # idx: (prompt, output tokens)
    # Step by step: the join gave each its first token; each step adds one to every context.
    live = {i: [p + 1, out - 1] for i, (p, out) in jobs.items()}  # context, tokens to go
    t, want = 0.0, {}
    while live:
        t += 0.002 + 1e-4 * len(live) + 1e-6 * sum(c for c, _ in live.values())
        for i in list(live):
            live[i][0] += 1
            live[i][1] -= 1
            if live[i][1] == 0:
                want[i] = t
                del live[i]
    d = DecodeSim("d", TOY)
    for i, (p, out) in jobs.items():
        d.awaiting += 1
        d.join(SimRequest(i, 0.0, p, out, ()))
    got = {}
    while d.finishing:
        counter = d.finishing[0][0]
        assert d.counter_at(d.next_finish() - 1e-9) == counter  # that step is in progress
        d.advance(counter)
        got.update((req.idx, d.anchor_t) for req in d.pop_finished())
    assert got == pytest.approx(want)


def test_same_seed_same_result_and_the_seed_matters_only_through_ties() -> None:
    wl = load_trace("conversation", limit=300, length_scale=1 / 32, max_output=64)
    costs = load_costs("cpu-tiny")
    a = simulate(wl.scaled(4), costs, ClusterSpec(2, 2, seed=7))
    b = simulate(wl.scaled(4), costs, ClusterSpec(2, 2, seed=7))
    for field in ("ttft_s", "tpot_s", "e2e_s", "ok"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert (a.events, a.cached_tokens) == (b.events, b.cached_tokens)
    assert a.cached_tokens > 0  # the trace's shared prefixes hit the prefill caches


def test_more_load_than_the_pools_hold_queues_then_fails_past_the_admission_timeout() -> None:
    small = replace(TOY, engine=replace(TOY.engine, num_blocks=300, max_num_seqs=2))
    n = 40
    wl = workload([0.0] * n, [100] * n, [2000] * n)
    res = simulate(wl, small, ClusterSpec(1, 1))
    assert 0 < res.ok.sum() < n  # the first ones ran; the rest waited 30 s and failed
    assert np.all(np.isnan(res.ttft_s[~res.ok]))


def test_shared_cores_stretch_steps() -> None:
    wl = workload([0.0, 0.0], [2000, 2000], [200, 200])
    alone = simulate(wl, TOY, ClusterSpec(1, 2))
    shared = simulate(wl, replace(TOY, host=Host(cores=1.0)), ClusterSpec(1, 2))
    assert np.nanmedian(shared.tpot_s) > 1.5 * np.nanmedian(alone.tpot_s)


def test_each_workers_own_background_takes_cores_from_every_step() -> None:
    host = Host(cores=2.0, worker_background=0.5)
    assert host.stretch(1, True, workers=2) == 1.0  # 1 + 2 x 0.5 cores: fits in 2
    assert host.stretch(2, True, workers=2) == pytest.approx(1.5)  # 3 cores of work on 2
    assert host.stretch(2, True, workers=4) == pytest.approx(2.0)  # more workers, more of it
    # One decode step of one sequence on a 1P1D pool: the two workers' background alone
    # (2 x 0.75 cores) and the decode worker's step share one core: 2.5x slower.
    wl = workload([0.0], [100], [3])
    steps = [0.002 + 1e-4 + 1e-6 * c for c in (101, 102)]
    res = simulate(wl, replace(TOY, host=Host(cores=1.0, worker_background=0.75)),
                   ClusterSpec(1, 1, idle_poll_s=0.0))
    assert res.tpot_s[0] == pytest.approx(2.5 * sum(steps) / 2)


def test_prompts_hash_as_the_router_hashes_them() -> None:
    from pdserve.engine.hashing import hash_blocks

    wl = from_prompts([0.0, 1.0], [list(range(40)), list(range(33))], [5, 5], 16)
    assert wl.block_hashes[0] == tuple(hash_blocks(list(range(40)), 16))
    assert wl.block_hashes[0][:2] == wl.block_hashes[1]


# ---------------------------------------------------------------------- metrics, search


def test_slo_parsing_and_goodput() -> None:
    assert SLO.parse("ttft:500,tpot:50") == SLO(0.5, 0.05)
    for bad in ("ttft", "e2e:5", "ttft:-1", "ttft:abc", ""):
        with pytest.raises(ValueError):
            SLO.parse(bad)
    res = simulate(workload([0.0, 1.0], [100, 100], [4, 1]), TOY, ClusterSpec(1, 1))
    s = summarize(res, SLO(1.0, 1e-6))  # TPOT impossible: only the 1-token request counts
    assert s.completed == 2 and s.slo_attainment == 0.5


def test_search_gives_prefill_heavy_work_more_prefill_workers() -> None:
    rng = np.random.default_rng(0)
    n = 200
    arrivals = np.sort(rng.uniform(0, 100, n))
    slo = SLO(0.5, 0.05)
    heavy_prefill = Workload(arrivals, np.full(n, 8000), np.full(n, 4), ((),) * n, 16)
    heavy_decode = Workload(arrivals, np.full(n, 50), np.full(n, 300), ((),) * n, 16)
    costs = load_costs("h100-llama3-8b")
    cfg = SearchConfig(bisect_steps=2)
    p = plan(heavy_prefill, [costs], 4, slo, cfg)
    d = plan(heavy_decode, [costs], 4, slo, cfg)
    assert p.best.prefill > p.best.decode and d.best.decode >= d.best.prefill
    assert [r.label for r in p.splits] == ["1P3D", "2P2D", "3P1D"]
    assert p.best.goodput_rps == max(r.goodput_rps for r in p.splits) > 0


# ---------------------------------------------------------------------- watch


def test_watch_reads_the_routers_own_metrics() -> None:
    from pdserve.router.metrics import RouterMetrics, WorkerSample

    workers = [WorkerSample("prefill-0", "prefill", True, {}),
               WorkerSample("decode-0", "decode", True, {}),
               WorkerSample("decode-1", "decode", False, {})]
    m = RouterMetrics(policy="prefix_aware", workers=lambda: workers)
    before = parse_prometheus(m.render().decode())
    for _ in range(10):
        timer = m.track(prompt_tokens=300, arrival=0.0)
        timer.on_tokens(40, now=0.5)
        timer.finish("length", now=1.0)
    m.requests.labels("resource_exhausted").inc()  # refused: not served traffic
    t = traffic(before, parse_prometheus(m.render().decode()), seconds=5.0)
    assert (t.rate, t.mean_prompt, t.mean_output) == (2.0, 300.0, 40.0)
    assert (t.prefill_workers, t.decode_workers) == (1, 1)
    wl = workload_for(t, duration_s=100, seed=1)
    assert abs(len(wl) - 200) < 60 and abs(wl.prompt_tokens.mean() - 300) < 60


# ---------------------------------------------------------------------- command line


def test_pdserve_plan_prints_every_split_and_a_recommendation(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    rc = cli_main(["plan", "--trace", "azure", "--requests", "200", "--slo", "ttft:2000,tpot:100",
                   "--gpus", "3", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "| 1P2D" in text and "| 2P1D" in text and "recommended:" in text
    data = json.loads(out.read_text())
    rec = data["recommended"]
    assert rec["prefill_replicas"] + rec["decode_replicas"] == 3
    assert {s["prefill"] for s in data["splits"]} == {1, 2}


def test_pdserve_plan_refuses_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", "--trace", "azure", "--slo", "ttft:abc"]) == 2
    assert "bad SLO" in capsys.readouterr().err
    assert cli_main(["plan", "--trace", "nope.jsonl", "--slo", "ttft:100"]) == 2
    assert cli_main(["plan", "--trace", "azure", "--slo", "ttft:100", "--gpus", "1"]) == 2


def test_fast_router_serves_a_prefix_free_stream_as_the_live_one_does() -> None:
    from pdserve.planner.router_model import RouterSettings
    from pdserve.planner.workload import poisson

    wl = poisson(load_trace("azure", limit=500, length_scale=0.1), 400.0, 3.0, seed=1)
    costs = load_costs("h100-llama3-8b")
    live = simulate(wl, costs, ClusterSpec(4, 4))
    fast = simulate(wl, costs, ClusterSpec(4, 4, router=RouterSettings(fast=True)))
    assert live.ok.all() and fast.ok.all()
    # Decode is the same machine either way; prefill routing differs (see FastRouter).
    assert np.nanmedian(fast.tpot_s) == pytest.approx(np.nanmedian(live.tpot_s), rel=0.05)
    assert np.median(fast.ttft_s) < 3 * np.median(live.ttft_s)


def test_calibrated_tpot_residual_makes_the_simulation_match_the_measured_median() -> None:
    from pdserve.bench.plan_check import predicted, tpot_residual

    wl = workload([0.0, 0.01, 0.02, 0.5], [100, 200, 50, 80], [8, 16, 4, 12])
    terms = Overheads(decode_step_s=0.0005)
    alone = predicted(wl, replace(TOY, overheads=terms), 1, 1)["tpot_s"]
    measured = 1.5 * alone  # the service is slower per token than its engine steps
    extra = tpot_residual(TOY, terms, wl, 1, 1, measured)
    assert extra > 0
    fitted = replace(terms, decode_step_s=terms.decode_step_s + extra)
    assert predicted(wl, replace(TOY, overheads=fitted), 1, 1)["tpot_s"] == pytest.approx(
        measured, rel=1e-6)
    # A simulation already slower than the measurement gets nothing added.
    assert tpot_residual(TOY, terms, wl, 1, 1, 0.5 * alone) == 0.0
