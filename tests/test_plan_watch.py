"""``pdserve plan --watch`` against a running service: it reads the router's real
``/metrics`` over HTTP, sees the traffic sent meanwhile and the live 1P1D split, and prints
the split to move to as JSON."""

from __future__ import annotations

import json
import threading
import time

import pytest

from pdserve.cli import main as cli_main
from pdserve.planner.watch import scrape_http
from tests.service import SHARED_API_KEY, shared_service


@pytest.fixture(scope="module")
def svc():
    return shared_service("tiny")


def test_watch_reads_live_metrics_and_prints_a_split(svc, capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    from pdserve_client import Client

    url = f"{svc.http_url}/metrics"
    samples = scrape_http(url, SHARED_API_KEY)
    assert samples["pdserve:worker_up{role=\"prefill\",worker=\"prefill-0\"}"] == 1.0
    done = threading.Event()

    def traffic() -> None:
        time.sleep(1.5)  # after the watch's first scrape; done well before its second
        with Client(svc.target, api_key=SHARED_API_KEY) as client:
            for i in range(6):
                client.generate(list(range(3, 43 + i)), max_tokens=8, ignore_eos=True)
        done.set()

    sender = threading.Thread(target=traffic)
    rc_box: list[int] = []
    watcher = threading.Thread(target=lambda: rc_box.append(cli_main([
        "plan", "--watch", "--metrics-url", url, "--api-key", SHARED_API_KEY,
        "--slo", "ttft:2000,tpot:200", "--costs", "cpu-tiny", "--interval", "8",
        "--rounds", "1", "--horizon", "30", "--json", "-"])))
    watcher.start()
    sender.start()
    sender.join(60)
    watcher.join(120)
    assert done.is_set() and rc_box == [0]
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["current"] == {"prefill_replicas": 1, "decode_replicas": 1}
    observed = out["observed"]
    assert observed["rate_rps"] > 0 and 40 <= observed["mean_prompt"] <= 45
    assert observed["mean_output"] == 8
    rec = out["recommended"]
    assert rec["prefill_replicas"] + rec["decode_replicas"] == 2
