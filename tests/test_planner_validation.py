"""The planner's simulator against the real service on this machine (CPU, tiny model).

The engine's step costs are measured first, here (``pdserve.bench.costs``, quick); the
service overheads (``pdserve.planner.costs.Overheads``: the router's CPU per request and per
token, admission, the workers' loops around their steps, the rest of a lone request's TTFT)
are measured on lightly loaded requests served by the first configuration; then 1P1D, 2P1D
and 1P2D each serve the same replayed trace for real (``pdserve serve`` on a local Ray head,
``pdserve bench serve``'s trace replay), and the simulation of each must come within 20% of
the measured TTFT and TPOT medians and order the configurations as the measurements do
(pairs closer than ``RANK_MARGIN`` are not ranked). About 1.5 minutes on two idle cores;
skipped, saying why, when other work keeps the machine's cores more than half busy.

Not met yet, so not part of ``make test`` (run it with ``pytest -m validation``). On an idle
machine, with the decode steps calibrated on the measured TPOT too: TTFT 80.5 / 80.3 / 83.3
ms simulated against 92.7 / 103.2 / 120.4 measured (-13% / -22% / -31%), TPOT 1.91 / 1.91 /
2.12 ms against 2.64 / 2.68 / 3.26 (-28% to -35%); with each worker's own background
cores measured too, TTFT -12% / -28% / -26%, TPOT -20% / -30% / -22%. Earlier, with other
jobs at load averages of 6-16 on the 2-core machine the simulator was 1.6-2.9x optimistic
(TTFT 71 / 65 / 77 ms simulated against 113 / 187 / 161 ms measured for 1P1D / 2P1D / 1P2D;
TPOT 1.5-1.7 ms against 2.8-4.3 ms), and identical real runs differed by up to 2x.
"""

from __future__ import annotations

import os

import pytest

from pdserve.bench.plan_check import (
    RANK_MARGIN,
    CheckWorkload,
    calibrate_here,
    check,
    machine_busy_fraction,
    same_order,
)

CONFIGS = ("1P1D", "2P1D", "1P2D")
TOLERANCE = 0.20
MAX_BUSY = 0.5
"""Latencies measured while other work keeps the cores busier than this say nothing of the
service (a shared machine at a load of 20 ran every configuration 3-5x slower than its
engine steps)."""


@pytest.mark.validation
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_simulated_medians_match_real_runs_and_rank_the_configurations_alike(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    busy = machine_busy_fraction()
    if busy > MAX_BUSY:
        pytest.skip(f"the machine is {busy:.0%} busy with other work: latencies would not be "
                    "the service's")
    os.environ.setdefault("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    result = check(calibrate_here(), CONFIGS, CheckWorkload(), log=print)
    print(f"overheads {result.overheads}; {result.seconds:.0f} s\n{result.table()}")
    table = result.table()
    for config, err in result.errors().items():
        for key in ("ttft_s", "tpot_s"):
            assert abs(err[key]) <= TOLERANCE, f"{config} {key} off by {err[key]:+.0%}\n{table}"
    for key in ("ttft_s", "tpot_s"):
        real = {c: v[key] for c, v in result.real.items()}
        sim = {c: v[key] for c, v in result.sim.items()}
        assert same_order(real, sim, RANK_MARGIN), f"{key} ordered differently\n{table}"
