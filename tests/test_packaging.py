"""What the two distributions install: `pdserve` under one import root, `pdserve-client` light.

The wheels are built from this checkout as a user's `pip install .` would build them, then
installed where nothing else of the checkout is visible.
"""

from __future__ import annotations

import email
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from pdserve import __version__
from tests.service import SHARED_API_KEY, ServiceThread, shared_service

REPO = Path(__file__).resolve().parents[1]
CLIENT = REPO / "clients" / "python"


def _build_wheel(source: Path, out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (wheel,) = out.glob("*.whl")
    return wheel


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(z.read(name))


@pytest.fixture(scope="module")
def server_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_wheel(REPO, tmp_path_factory.mktemp("server-wheel"))


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_wheel(CLIENT, tmp_path_factory.mktemp("client-wheel"))


def test_package_list_names_every_package_folder() -> None:
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    on_disk = set()  # every folder is a package to setuptools, data folders included
    for package, folder in tool["package-dir"].items():
        for path in [REPO / folder, *(REPO / folder).rglob("*")]:
            if path.is_dir() and "__pycache__" not in path.parts:
                rel = path.relative_to(REPO / folder)
                on_disk.add(".".join([package, *rel.parts]))
    assert listed == on_disk


def test_server_wheel_installs_everything_under_pdserve(server_wheel: Path) -> None:
    with zipfile.ZipFile(server_wheel) as z:
        names = z.namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"pdserve", f"pdserve-{__version__}.dist-info"}
    for needed in ("pdserve/py.typed", "pdserve/engine/engine.py", "pdserve/router/app.py",
                   "pdserve/protos/pdserve/v1/generation.proto",
                   "pdserve/bench/data/mooncake_synthetic_trace.jsonl",
                   "pdserve/bench/data/azure_llm_inference_2023_code.csv",
                   "pdserve/bench/data/sharegpt_v3_first_turns_1000.json",
                   "pdserve/planner/sim.py", "pdserve/planner/hardware/h100-llama3-8b.json",
                   "pdserve/engine/csrc/paged_attention.cpp", "pdserve/engine/csrc/fused_ops.cpp",
                   "pdserve/engine/csrc/simd.h", "pdserve/bench/peers/vllm_engine.py",
                   f"pdserve-{__version__}.dist-info/licenses/LICENSE"):
        assert needed in names, needed
    assert not [n for n in names if "pdserve_client" in n or n.startswith("pdserve/tests")]
    meta = _metadata(server_wheel)
    assert meta["Version"] == __version__
    assert meta["License-Expression"] == "Apache-2.0"


def test_installed_server_imports_only_under_its_root(server_wheel: Path,
                                                      tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(server_wheel)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=tmp_path, env=env,
                                       capture_output=True, text=True, timeout=120)
    ok = run("-c", "import pdserve.engine, pdserve.router.app, pdserve.bench.trace as t; "
                   "print(pdserve.engine.__file__); print(t.data_path('x').parent.is_dir())")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == [str(target / "pdserve" / "engine" / "__init__.py"),
                                      "True"]
    for legacy in ("engine", "router", "bench", "protos", "kvtransfer", "prefill_worker",
                   "decode_worker", "worker"):
        res = run("-c", f"import {legacy}")
        assert res.returncode != 0 and "ModuleNotFoundError" in res.stderr, legacy
    version = run("-m", "pdserve", "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"pdserve {__version__}"


def test_client_wheel_needs_only_grpc_and_protobuf(client_wheel: Path) -> None:
    meta = _metadata(client_wheel)
    assert meta["Name"] == "pdserve-client"
    assert meta["Version"] == __version__
    assert meta["License-Expression"] == "Apache-2.0"
    requires = sorted(r.split(">")[0].split("<")[0].split("=")[0].strip()
                      for r in meta.get_all("Requires-Dist"))
    assert requires == ["grpcio", "protobuf"]
    with zipfile.ZipFile(client_wheel) as z:
        names = z.namelist()
    assert {n.split("/")[0] for n in names} == {"pdserve_client",
                                                f"pdserve_client-{__version__}.dist-info"}
    for needed in ("pdserve_client/py.typed", "pdserve_client/_proto/generation_pb2.py",
                   "pdserve_client/_proto/generation_pb2_grpc.py",
                   "pdserve_client/_proto/generation_pb2.pyi"):
        assert needed in names, needed


@pytest.fixture(scope="module")
def service() -> ServiceThread:
    return shared_service("tiny")


@pytest.mark.timeout(600)
def test_client_alone_in_a_fresh_venv_streams_from_the_service(
    client_wheel: Path, tmp_path: Path, service: ServiceThread
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(client_wheel)], check=True,
                   timeout=480)
    script = (
        "import sys, pdserve_client\n"
        "from pdserve_client import Client\n"
        f"with Client({service.target!r}, api_key={SHARED_API_KEY!r}) as c:\n"
        "    chunks = list(c.stream('The quick brown fox', max_tokens=6, temperature=0,"
        " ignore_eos=True))\n"
        "print(pdserve_client.__version__, sum(len(x.token_ids) for x in chunks),"
        " chunks[-1].finish_reason)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'pdserve')))\n"
    )
    out = subprocess.run([str(py), "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{__version__} 6 length", "[]"]
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True, timeout=120).stdout
    installed = {line.split("==")[0].lower() for line in listed.splitlines()}
    assert "pdserve-client" in installed
    assert not installed & {"torch", "ray", "nixl", "pdserve", "numpy", "transformers"}
