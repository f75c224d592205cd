"""Shared pytest set-up.

Triton decides between compiled kernels and its CPU interpreter when ``triton.language`` is
first imported (and when each kernel is decorated), reading ``TRITON_INTERPRET``. This file
runs before any test module is imported, so without CUDA the Triton kernels are built for the
interpreter whatever the test order. An explicit ``TRITON_INTERPRET`` is left as it is.

The repository stands alone: a clone with nothing beside it passes. An audit hook records
every file this process opens in the folder that holds the repository but outside the
repository itself (a sibling folder of data); any such read fails the session. Folders and
files the suite makes there itself (a clone in the temporary folder puts its temporary files
beside it) are its own, and reads inside them are not counted.

Every Ray the suite starts waits longer than Ray's default for its GCS (see the end).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_REPO_S = str(REPO)
_PARENT_S = str(REPO.parent)
_reads_beside_repo: set[str] = set()
_made_beside_repo: set[str] = set()


def beside_repo(path: str) -> bool:
    """True when ``path`` lies in the repository's parent folder but not in the repository."""
    full = os.path.abspath(path)
    inside = lambda root: full == root or full.startswith(root + os.sep)
    return inside(_PARENT_S) and not inside(_REPO_S)


def _made_here(path: str) -> bool:
    """True when ``path`` is, or lies in, a folder or file this process made."""
    return any(path == made or path.startswith(made + os.sep) for made in _made_beside_repo)


_MAKES = {"os.mkdir", "tempfile.mkdtemp", "tempfile.mkstemp"}


def _audit(event: str, args: tuple) -> None:
    if (event != "open" and event not in _MAKES) or not args:
        return
    path = args[0]
    if isinstance(path, (bytes, os.PathLike)):
        path = os.fsdecode(path)
    if not isinstance(path, str) or not beside_repo(path):
        return
    full = os.path.abspath(path)
    if event in _MAKES:
        _made_beside_repo.add(full)
    elif not _made_here(full):
        _reads_beside_repo.add(full)


sys.addaudithook(_audit)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _reads_beside_repo:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = "\n".join(sorted(_reads_beside_repo))
        if reporter is not None:
            reporter.write_line(f"files read from outside the repository:\n{lines}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

# Every Ray this suite starts (in process or in a child) gives its GCS 120 s instead of 30 s
# to bind a port: a loaded two-core runner may need longer.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
