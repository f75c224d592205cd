"""The README's run command, from a clean clone, serves a reply that the SDK streams."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdserve_client import Client

REPO = Path(__file__).resolve().parents[1]


def readme_run_command() -> str:
    block = re.search(r"## Two commands.*?```sh\n(.*?)```", (REPO / "README.md").read_text(),
                      re.S)
    assert block, "README lost its 'Two commands' block"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    run = [c for c in commands if c.startswith("make run")]
    assert run == ["make run"]
    return run[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
def test_readme_run_command_serves_the_sdk_from_a_clean_clone(tmp_path: Path) -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    venv = Path(sys.prefix)
    stamp = venv / ".installed"
    port = free_port()
    # The README's command in the clone, with this suite's environment standing in for
    # the set-up step (make -o: the venv is already installed) and the clone's code first
    # on the path.
    cmd = readme_run_command().split() + [
        f"VENV={venv}", "-o", str(stamp), f"ARGS=--port {port}",
    ]
    env = {**os.environ, "PYTHONPATH": str(clone), "RAY_ADDRESS": ""}
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
        with Client(f"127.0.0.1:{port}") as client:
            chunks = list(client.stream("The quick brown fox", max_tokens=8, temperature=0))
        assert sum(len(c.token_ids) for c in chunks) >= 1
        assert chunks[-1].finish_reason in ("length", "stop")
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
        lines.append(out)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "pdserve: stopped" in "".join(lines), "".join(lines[-30:])
