"""``pdserve serve`` at its edges, as a process: options it cannot honour are refused before
Ray starts (a port out of range or in use, ``--device cuda`` without CUDA), and Ctrl-C
during start-up stops it cleanly, leaving no process behind. (The drain and a second stop
are exercised on a running service in ``test_hardening.py``.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def serve(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pdserve", "serve", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str, float]:
    start = time.monotonic()
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out, time.monotonic() - start


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_unusable_options_are_refused_before_ray_starts(busy_port: int, capsys) -> None:
    """The command's own checks, run in this process (as ``pdserve serve`` runs them)."""
    import ray
    import torch

    from pdserve.cli import main

    cases = [(["--port", "99999"], "--port 99999: a port is 1..65535"),
             (["--port", str(busy_port)], f"--port {busy_port}: cannot listen"),
             (["--http-port", str(busy_port), "--port", "0"],
              f"--http-port {busy_port}: cannot listen"),
             (["--metrics-port", "-3"], "--metrics-port -3: a port is 1..65535")]
    if not torch.cuda.is_available() and not os.environ.get("RAY_ADDRESS"):
        cases.append((["--device", "cuda"], "CUDA is not available on this machine"))
    ray_before = ray.is_initialized()
    for args, message in cases:
        start = time.monotonic()
        assert main(["serve", *args]) == 2, args
        assert message in capsys.readouterr().err, args
        assert time.monotonic() - start < 10 and ray.is_initialized() == ray_before


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_during_start_up_stops_cleanly(tmp_path: Path) -> None:
    proc = serve("--port", "0", "--http-port", "0", "--model", "tiny")
    lines = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # until Ray is up and the workers are being created
        lines.append(line)
        if "Started a local Ray instance" in line or time.monotonic() > deadline:
            break
    assert any("Started a local Ray instance" in ln for ln in lines), "".join(lines)
    proc.send_signal(signal.SIGINT)
    code, out, took = finish(proc, timeout=90)
    out = "".join(lines) + out
    assert code == 0 and "pdserve: stopped" in out, out
    assert "pdserve: serving" not in out and "Traceback" not in out, out
    deadline = time.monotonic() + 20  # Ray's own processes go with it
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_alive(proc.pid)
