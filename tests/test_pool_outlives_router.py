"""A pool on an existing Ray outlives the router that created it (real `ray start --head`,
real `pdserve serve` and `pdserve router` processes, NIXL, gRPC on 127.0.0.1).

A (`pdserve serve --ray-address`) creates the pool, B (`pdserve router`) joins it. A is
killed with SIGKILL mid-stream: its stream fails UNAVAILABLE, B keeps serving exact tokens,
takes over the duty of replacing dead workers (the supervisor's lease in the directory), and
replaces a decode worker killed after A. B, now the only router, stops on SIGINT and removes
the pool: no pdserve actor is left in that Ray.

The Ray head has its own temp dir, free ports and auth token; it is stopped by the PIDs that
use its temp dir, never with ``ray stop``, which would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pdserve.engine.llm import LLM
from pdserve.engine.ports import free_ports
from pdserve.engine.sampling import SamplingParams
from pdserve_client import Client, Unavailable
from tests.procs import Lines, stop_pids_using

pytestmark = pytest.mark.timeout(180)

MODEL = "tiny"
PROMPT = "The pool outlives the router that created it"
RAY = os.path.join(os.path.dirname(sys.executable), "ray")

LIST_ACTORS = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print(json.dumps(sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                        if a["namespace"] == "pdserve")))
"""


@dataclass(frozen=True)
class Head:
    gcs: str  # host:port, for drivers
    env: dict[str, str]  # RAY_AUTH_MODE=token and the cluster's own token


class Process:
    """A child process in its own process group, its output lines collected."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True,
                                     env={**env, "PYTHONUNBUFFERED": "1"})
        self.out = Lines(self.proc)

    def wait_for(self, text: str, timeout: float) -> None:
        assert self.out.wait_for(text, timeout), f"no {text!r} in:\n{self.out.text()}"

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


@pytest.fixture
def head() -> Iterator[Head]:
    temp_dir = tempfile.mkdtemp(prefix="pdpool-", dir="/tmp")  # short: Ray's socket paths
    gcs, client, agent_http, agent_grpc, metrics, runtime_env = free_ports(6)
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               TOKENIZERS_PARALLELISM="false")
    cmd = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--include-dashboard", "false", "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent_http),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port",
           str(metrics), "--runtime-env-agent-port", str(runtime_env), "--temp-dir", temp_dir,
           "--num-cpus", "4", "--disable-usage-stats"]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        yield Head(f"127.0.0.1:{gcs}", env)
    finally:
        stop_pids_using(temp_dir)  # this head only: never a plain `ray stop`
        shutil.rmtree(temp_dir, ignore_errors=True)


def _named_actors(head: Head) -> list[str]:
    out = subprocess.run([sys.executable, "-c", LIST_ACTORS, head.gcs], env=head.env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_pool_outlives_its_first_router(head: Head) -> None:
    port_a, port_b = free_ports(2)
    cli = [sys.executable, "-m", "pdserve.cli"]
    a = Process([*cli, "serve", "--ray-address", head.gcs, "--model", MODEL, "--device", "cpu",
                 "--dtype", "float32", "--port", str(port_a), "--http-port", "0",
                 "--lease", "4", "--disable-log-stats"], head.env)
    b = Process([*cli, "router", "--ray-address", head.gcs, "--wait", "120", "--port",
                 str(port_b), "--http-port", "0", "--disable-log-stats", "--log-level", "info"],
                head.env)
    try:
        ref = LLM(model=MODEL, dtype="float32", device="cpu").generate(
            [PROMPT], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        )[0].token_ids
        a.wait_for("pdserve: serving", 120)
        b.wait_for("pdserve: serving", 120)
        ready = b.out.matching("worker decode-0 (generation 0) ready")
        pid = int(re.findall(r"'pid': (\d+)", ready[0])[0])
        assert not b.out.matching("now replaces dead workers")  # A, the creator, does

        with Client(f"127.0.0.1:{port_a}", retries=0) as ca:  # A dies mid-stream
            got: list[int] = []
            with pytest.raises(Unavailable):
                for chunk in ca.stream(PROMPT, max_tokens=3000, temperature=0.0,
                                       ignore_eos=True):
                    if not got:
                        os.kill(a.proc.pid, signal.SIGKILL)
                    got += chunk.token_ids
            assert got and len(got) < 3000
        a.proc.wait(10)

        with Client(f"127.0.0.1:{port_b}") as cb:
            assert list(cb.generate(PROMPT, max_tokens=10, temperature=0.0,
                                    ignore_eos=True).token_ids) == ref
            # B takes the supervisor's lease A no longer renews and replaces a dead worker.
            b.wait_for("this router now replaces dead workers", 30)
            os.kill(pid, signal.SIGKILL)
            b.wait_for("worker decode-0 (generation 1) ready", 60)
            deadline = time.monotonic() + 10
            while not cb.health() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert list(cb.generate(PROMPT, max_tokens=10, temperature=0.0,
                                    ignore_eos=True).token_ids) == ref

        b.proc.send_signal(signal.SIGINT)  # the last router: it removes the pool
        assert b.proc.wait(60) == 0, b.out.text()
        assert b.out.matching("last router: removing the pool"), b.out.text()
        assert _named_actors(head) == []
    finally:
        for p in (a, b):
            p.kill_group()
