"""The committed generated code (server stubs, the client SDK's copy, its version file) matches
what the sources generate, and both copies load side by side."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.protos import generate

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_committed_generated_code_is_up_to_date() -> None:
    problems = generate.stale_files()
    assert not problems, "stale generated code:\n" + "\n".join(problems)


def test_check_cli_exits_zero_when_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pdserve.protos.generate", "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def scratch_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of what the generator reads and writes, with the generator pointed at it."""
    shutil.copytree(REPO_ROOT / "protos", tmp_path / "protos")
    shutil.copytree(REPO_ROOT / "clients", tmp_path / "clients", symlinks=True)
    (tmp_path / "pdserve").mkdir()
    shutil.copy(REPO_ROOT / "pdserve" / "_version.py", tmp_path / "pdserve" / "_version.py")
    monkeypatch.setattr(generate, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(generate, "PROTO_DIR", tmp_path / "protos")
    assert generate.stale_files() == []
    return tmp_path


def test_check_names_both_stubs_after_a_proto_edit(scratch_repo: Path) -> None:
    proto = scratch_repo / "protos" / "pdserve" / "v1" / "generation.proto"
    proto.write_text(proto.read_text() + "\nmessage AddedLater { string x = 1; }\n")

    problems = generate.stale_files()

    assert any(p.startswith("protos/pdserve/v1/generation_pb2.py: stale") for p in problems)
    assert any(p.startswith("clients/python/pdserve_client/_proto/generation_pb2.py: stale")
               for p in problems)


def test_check_names_the_client_version_after_a_version_bump(scratch_repo: Path) -> None:
    version = scratch_repo / "pdserve" / "_version.py"
    version.write_text(version.read_text().replace('__version__ = "', '__version__ = "9'))

    assert generate.stale_files() == [
        "clients/python/pdserve_client/_version.py: stale against grpcio-tools "
        f"{generate._tools_version()} (run `make protos`)"
    ]
    generate.write()
    assert generate.stale_files() == []
    assert '__version__ = "9' in (
        scratch_repo / "clients/python/pdserve_client/_version.py").read_text()


def test_check_names_an_orphaned_stub(scratch_repo: Path) -> None:
    orphan = scratch_repo / "clients/python/pdserve_client/_proto/old_pb2.py"
    orphan.write_text("")
    assert generate.stale_files() == [
        "clients/python/pdserve_client/_proto/old_pb2.py: generated file without a .proto "
        "(delete it)"
    ]


def test_both_copies_import_their_messages_from_where_they_live() -> None:
    server = (REPO_ROOT / "protos/pdserve/v1/generation_pb2_grpc.py").read_text()
    client = (REPO_ROOT / "clients/python/pdserve_client/_proto/generation_pb2_grpc.py").read_text()
    assert "from pdserve.protos.pdserve.v1 import generation_pb2" in server
    assert "from pdserve_client._proto import generation_pb2" in client

    from pdserve.protos.pdserve.v1 import generation_pb2, generation_pb2_grpc
    from pdserve_client._proto import generation_pb2 as client_pb2

    assert generation_pb2.DESCRIPTOR.package == "pdserve.v1"
    assert generation_pb2.DESCRIPTOR.name == "pdserve/v1/generation.proto"
    assert hasattr(generation_pb2_grpc, "GenerationStub")
    assert hasattr(generation_pb2_grpc, "GenerationServicer")
    # One descriptor in the pool, so one message class: the two copies interoperate.
    assert client_pb2.GenerateRequest is generation_pb2.GenerateRequest
    wire = client_pb2.GenerateRequest(request_id="r", text="hi").SerializeToString()
    assert generation_pb2.GenerateRequest.FromString(wire).text == "hi"
