"""`pdserve serve` as a Ray job, for real: the documented `ray job submit` entry point.

A local Ray head is started with the real `ray start --head` (token authentication on, its
own temp dir and free ports, custom resources standing for the two node types), the job is
submitted with the real `ray job submit` CLI and deploy/ray/runtime_env.yaml, a reply is
streamed through the SDK from the router the job started, `ray job stop` drains it, and no
pdserve actor may be left on the cluster. Teardown stops only this head, by the PIDs of the
processes that use its temp dir: never a plain `ray stop`, which stops every Ray on the
machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pdserve.engine.ports import free_ports
from pdserve_client import Client
from tests.procs import Lines

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `ray` and `pdserve`: workers share its Python
RAY = BIN / "ray"
RESOURCES = {"prefill_node": 4, "decode_node": 4}

pytestmark = pytest.mark.timeout(180)


@dataclass(frozen=True)
class Head:
    gcs: str  # host:port, for drivers
    dashboard: str  # http://host:port, for `ray job ...`
    env: dict[str, str]  # RAY_AUTH_MODE=token and the cluster's token


def _pids_using(temp_dir: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            pids.append(int(entry.name))
    return pids


def _stop_head(temp_dir: str) -> None:
    """Stop the processes of the head that uses ``temp_dir`` (and only those)."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for pid in _pids_using(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while _pids_using(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    # A short temp dir: Ray's unix socket paths must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="pdray-", dir="/tmp")
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env = free_ports(7)
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),  # this cluster's own token
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `pdserve` is the venv's
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    cmd = [
        str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1",
        "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--include-dashboard", "true", "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", str(agent_http),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
        "--runtime-env-agent-port", str(runtime_env), "--temp-dir", temp_dir,
        "--num-cpus", "4", "--resources", json.dumps(RESOURCES), "--disable-usage-stats",
    ]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        yield Head(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", env)
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray(head: Head, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RAY), *args], env=head.env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _cluster_state(head: Head) -> dict:
    """pdserve's live named actors and the free custom resources, seen by a fresh driver."""
    code = (
        "import json, ray\n"
        f"ray.init(address={head.gcs!r}, log_to_driver=False)\n"
        "names = [a['name'] for a in ray.util.list_named_actors(all_namespaces=True)]\n"
        "free = ray.available_resources()\n"
        f"print(json.dumps({{'actors': [n for n in names if n.startswith('pdserve-')],"
        f" 'free': {{k: free.get(k, 0) for k in {sorted(RESOURCES)!r}}}}}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=head.env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ray_job_serves_streams_and_stops_without_leftover_actors(head: Head) -> None:
    port, http_port = free_ports(2)
    job_id = f"pdserve-test-{secrets.token_hex(4)}"
    submit = subprocess.Popen(
        [str(RAY), "job", "submit", "--address", head.dashboard,
         "--runtime-env", "deploy/ray/runtime_env.yaml", "--submission-id", job_id, "--",
         "pdserve", "serve", "--ray-address", "auto", "--host", "127.0.0.1", "--port", str(port),
         "--http-port", str(http_port), "--model", "tiny",
         "--device", "cpu", "--num-blocks", "128", "--prefill-resource", "prefill_node=1",
         "--decode-resource", "decode_node=1"],
        env=head.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    logs = Lines(submit)
    try:
        assert logs.wait_for("pdserve: serving", timeout=90), (
            f"the job's router did not come up:\n{logs.text()}")

        with Client(f"127.0.0.1:{port}", timeout=30) as client:
            chunks = list(client.stream("The quick brown fox", max_tokens=8, temperature=0))
        assert chunks and chunks[-1].finish_reason, chunks
        assert sum(len(c.token_ids) for c in chunks) == 8
        # What the Helm chart's probes and ServiceMonitor read.
        for path in ("/health", "/metrics"):
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=10) as r:
                assert r.status == 200, path

        running = _cluster_state(head)
        # One prefill + one decode worker, and the directory other routers attach with.
        workers = sorted(a for a in running["actors"] if a != "pdserve-directory")
        assert "pdserve-directory" in running["actors"], running
        assert len(workers) == 2 and "prefill-0" in workers[1] and "decode-0" in workers[0], \
            running
        assert running["free"] == {"decode_node": 3, "prefill_node": 3}, running

        stopped = _ray(head, "job", "stop", "--address", head.dashboard, job_id)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        submit.wait(timeout=60)
        assert logs.wait_for("pdserve: stopped", timeout=10), (
            f"the router did not drain on SIGTERM:\n{logs.text()}")
        status = _ray(head, "job", "status", "--address", head.dashboard, job_id)
        assert "was stopped" in status.stdout, status.stdout + status.stderr

        left = _cluster_state(head)
        assert left["actors"] == [], left
        assert left["free"] == RESOURCES, left
    finally:
        if submit.poll() is None:
            submit.kill()
            submit.wait(10)


@pytest.mark.parametrize(("token", "refusal"), [
    (None, "no authentication token was found"),
    ("0" * 64, "token is invalid or incorrect"),
])
def test_job_submit_without_the_clusters_token_is_refused(
    head: Head, token: str | None, refusal: str
) -> None:
    env = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH_")}
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    env["HOME"] = tempfile.mkdtemp(prefix="pdray-home-")  # no ~/.ray/auth_token either
    try:
        out = subprocess.run(
            [str(RAY), "job", "submit", "--address", head.dashboard, "--no-wait", "--", "true"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
        )
    finally:
        shutil.rmtree(env["HOME"], ignore_errors=True)
    assert out.returncode != 0
    assert refusal in out.stdout + out.stderr, out.stdout + out.stderr
