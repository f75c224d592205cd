"""The README's run command, from a clean clone, serves the built-in SmolLM2 and the SDK
streams its reply, while a `ray start` head runs on the same machine (and in the same Ray
temp dir, where a plain `ray.init()` would find it and attach)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pdserve.engine.ports import free_ports
from pdserve_client import Client
from tests.procs import stop_pids_using

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"


def readme_run_command() -> str:
    block = re.search(r"## Two commands.*?```sh\n(.*?)```", (REPO / "README.md").read_text(),
                      re.S)
    assert block, "README lost its 'Two commands' block"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    run = [c for c in commands if c.startswith("make run")]
    assert run == ["make run"]
    return run[0]


@pytest.mark.timeout(240)
def test_readme_run_command_serves_the_sdk_from_a_clean_clone(tmp_path: Path) -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    venv = Path(sys.prefix)
    stamp = venv / ".installed"
    port, http_port, gcs, client, agent, agent_grpc, metrics, runtime_env = free_ports(8)
    temp = tempfile.mkdtemp(prefix="pdrr-", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "PYTHONPATH": str(clone), "RAY_TMPDIR": temp}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.run(
        [str(RAY), "start", "--head", "--port", str(gcs), "--include-dashboard", "false",
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
         "--runtime-env-agent-port", str(runtime_env), "--num-cpus", "1",
         "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=120)
    assert head.returncode == 0, head.stdout + head.stderr
    # The README's command in the clone, with this suite's environment standing in for
    # the set-up step (make -o: the venv is already installed) and the clone's code first
    # on the path.
    cmd = readme_run_command().split() + [
        f"VENV={venv}", "-o", str(stamp), f"ARGS=--port {port} --http-port {http_port}",
    ]
    proc = subprocess.Popen(cmd, cwd=clone, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 180
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "pdserve: serving" in line:
                break
        assert any(f"127.0.0.1:{port}" in line for line in lines), "".join(lines[-30:])
        assert any("serving 'smollm2'" in line for line in lines), "".join(lines[-30:])
        with Client(f"127.0.0.1:{port}") as client:
            chunks = list(client.stream("The capital of France is", max_tokens=8,
                                        temperature=0))
        assert sum(len(c.token_ids) for c in chunks) >= 1
        assert chunks[-1].finish_reason in ("length", "stop")
        assert "Paris" in "".join(c.text for c in chunks)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
        lines.append(out)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        stop_pids_using(temp)
        shutil.rmtree(temp, ignore_errors=True)
    assert "pdserve: stopped" in "".join(lines), "".join(lines[-30:])
    assert "num_cpus and num_gpus must not be provided" not in "".join(lines)
