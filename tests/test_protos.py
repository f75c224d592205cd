"""The committed generated protobuf code matches the .proto files and imports cleanly."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protos import generate

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_committed_generated_code_is_up_to_date() -> None:
    problems = generate.stale_files()
    assert not problems, "stale generated protobuf code:\n" + "\n".join(problems)


def test_check_cli_exits_zero_when_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "protos.generate", "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_check_names_the_stale_file_after_a_proto_edit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(REPO_ROOT / "protos", tmp_path / "protos")
    proto = tmp_path / "protos" / "pdserve" / "v1" / "generation.proto"
    proto.write_text(proto.read_text() + "\nmessage AddedLater { string x = 1; }\n")
    monkeypatch.setattr(generate, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(generate, "PROTO_DIR", tmp_path / "protos")

    problems = generate.stale_files()

    assert any(p.startswith("protos/pdserve/v1/generation_pb2.py: stale") for p in problems)


def test_grpc_module_imports_messages_by_full_package_path() -> None:
    grpc_src = (REPO_ROOT / "protos/pdserve/v1/generation_pb2_grpc.py").read_text()
    assert "from protos.pdserve.v1 import generation_pb2" in grpc_src

    from protos.pdserve.v1 import generation_pb2, generation_pb2_grpc

    assert generation_pb2.DESCRIPTOR.package == "pdserve.v1"
    assert hasattr(generation_pb2_grpc, "GenerationStub")
    assert hasattr(generation_pb2_grpc, "GenerationServicer")
