"""Helpers for tests that run pdserve or Ray as real processes on this machine.

Every process tree started here is stopped by the PIDs that belong to it (its own Ray temp
dir on their command lines, or its own process group): never a plain ``ray stop``, which
stops every Ray on the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path


def pids_using(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (a temp dir, a port)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


def stop_pids_using(marker: str, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, the processes whose command line contains ``marker``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids_using(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids_using(marker) and time.monotonic() < deadline:
            time.sleep(0.2)


class Lines:
    """Collects a process's output lines on a thread; waits for one to appear."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(text in line for line in self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return any(text in line for line in self.lines)
                self._cond.wait(min(left, 0.5))
            return True

    def matching(self, text: str) -> list[str]:
        with self._cond:
            return [line for line in self.lines if text in line]

    def text(self, last: int = 60) -> str:
        with self._cond:
            return "\n".join(self.lines[-last:])
