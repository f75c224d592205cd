"""The planner's simulator against the real service on this machine (CPU, tiny model).

The engine's step costs are measured first, here (``pdserve.bench.costs``, quick); the
service overheads (``pdserve.planner.costs.Overheads``: the router's CPU per request, per
decode step and per token, admission, the workers' loops around their steps and their work
on each request, the rest of a lone request's TTFT, what traffic adds) are measured by the
first configuration on other rows of the trace: lightly loaded requests, bursts of one-token
requests, and requests replayed as the check's are; then 1P1D, 2P1D and 1P2D each serve
the same replayed trace for real (``pdserve serve`` on a local Ray head, ``pdserve bench
serve``'s trace replay), and the simulation of each must come within 20% of the measured
TTFT and TPOT medians and order the configurations as the measurements do (pairs closer
than ``RANK_MARGIN`` are not ranked). About 2 minutes on two idle cores; skipped, saying
why, when other work keeps the machine's cores more than half busy.

Not met reliably yet, so not part of ``make test`` (run it with ``pytest -m validation``).
Thirteen runs on an idle machine (the README's table): ten within 20% on every median, the
configurations ordered alike in eleven; the misses are 1P2D's TTFT (-25%, -20.4%), whose
prefills cost more CPU with three worker processes on two cores than the host model (cores
shared by time) gives them, and 1P1D's (+21%) in a run slower throughout. The real
medians themselves move by 5-15% between identical runs (1P2D TTFT 78-95 ms). With the
earlier calibration (terms fitted on one-token bursts only) 1P1D's TTFT came out 10-29%
high in six of six runs.
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
