"""The planner's simulator against the real service on this machine (CPU, tiny model).

The engine's step costs are measured first, here (``pdserve.bench.costs``, quick); the
service overheads (``pdserve.planner.costs.Overheads``: the router's CPU per request and per
token, admission, the workers' loops around their steps, the rest of a lone request's TTFT,
what a burst adds) are measured on lightly loaded requests and on bursts of one-token
requests served by the first configuration; then 1P1D, 2P1D
and 1P2D each serve the same replayed trace for real (``pdserve serve`` on a local Ray head,
``pdserve bench serve``'s trace replay), and the simulation of each must come within 20% of
the measured TTFT and TPOT medians and order the configurations as the measurements do
(pairs closer than ``RANK_MARGIN`` are not ranked). About 2.5 minutes on two idle cores;
skipped, saying why, when other work keeps the machine's cores more than half busy.

Not met reliably yet, so not part of ``make test`` (run it with ``pytest -m validation``).
With the tokens streamed counted as load at the rate of the moment, the router's work on
each prefill's answer, and the bursts' terms (a prefill step's cost in a burst, each answer
waiting for those still coming) fitted on six bursts of one-token requests, three runs on an
idle machine were off by TTFT +18% / +10% / -9%, +10% / -8% / -8% and +29% / +7% / +4%,
TPOT +13% / +13% / -3%, +16% / +14% / -1% and +4% / +3% / -8% (1P1D / 2P1D / 1P2D), the
configurations ordered alike in all three: two of three within 20% everywhere. The real
medians themselves move by 5-15% between identical runs (1P1D TTFT 62-78 ms), and the
fitted burst terms by up to 2x. Before these terms: TTFT -12% / -28% / -26%, TPOT -20% /
-30% / -22%. Earlier, with other jobs at load averages of 6-16 on the 2-core machine the
simulator was 1.6-2.9x optimistic, and identical real runs differed by up to 2x.
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
