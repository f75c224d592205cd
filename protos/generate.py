"""Generate (or check) the committed code made from the .proto files, for both distributions.

``python -m pdserve.protos.generate`` (``make protos``) writes:

- the server's stubs, ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` next to each
  ``.proto`` under ``protos/`` (imported as ``pdserve.protos.pdserve.v1.generation_pb2``);
- the client SDK's copy of the public API's stubs in ``clients/python/pdserve_client/_proto/``
  (imported as ``pdserve_client._proto.generation_pb2``), so that the SDK needs nothing of the
  server;
- the SDK's ``_version.py``, copied from ``pdserve/_version.py`` (one source of the version).

``--check`` writes nothing; it exits 1 and names every stale, missing or orphaned generated
file when the committed code differs from what the sources generate now.

protoc runs with ``protos/`` as the import root, so every copy registers the same file name
(``pdserve/v1/generation.proto``) and the same bytes in protobuf's descriptor pool: the
server's and the SDK's modules load side by side in one process. The generated module names
and the stub module's import of the messages are then rewritten to where each copy lives.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "protos"
CLIENT_DIR = Path("clients/python/pdserve_client")
VERSION_SOURCE = Path("pdserve/_version.py")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
CLIENT_PROTOS = ("pdserve/v1/generation.proto",)
"""The .proto files (relative to ``protos/``) whose stubs the client SDK ships."""


@dataclass(frozen=True, slots=True)
class _Copy:
    """Where one generated module lands: ``path`` (relative to the repository root) and the
    Python package it is imported from."""

    path: Path
    package: str


def proto_files() -> list[Path]:
    """Every .proto under ``protos/``, relative to ``protos/``, sorted."""
    return sorted(p.relative_to(PROTO_DIR) for p in PROTO_DIR.rglob("*.proto"))


def _copies(proto: Path, suffix: str) -> list[_Copy]:
    stem = proto.with_suffix("")
    name = stem.name + suffix
    server_dir = Path("protos") / stem.parent
    out = [_Copy(server_dir / name, "pdserve." + ".".join(server_dir.parts))]
    if proto.as_posix() in CLIENT_PROTOS:
        out.append(_Copy(CLIENT_DIR / "_proto" / name, "pdserve_client._proto"))
    return out


def _relocate(text: str, proto: Path, package: str) -> str:
    """protoc names modules after the .proto's path (``pdserve.v1.generation_pb2``); name
    them after the package they are imported from instead."""
    stem = proto.with_suffix("")
    origin = ".".join(stem.parent.parts)
    module = stem.name + "_pb2"
    return (
        text.replace(f"'{origin}.{module}'", f"'{package}.{module}'")
        .replace(f"from {origin} import {module}", f"from {package} import {module}")
    )


def _protoc(out_dir: Path) -> None:
    well_known = resources.files("grpc_tools") / "_proto"
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I",
        ".",
        "-I",
        str(well_known),
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(p.as_posix() for p in proto_files()),
    ]
    result = subprocess.run(cmd, cwd=PROTO_DIR, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed ({result.returncode}):\n{result.stderr}")


def generate() -> dict[Path, str]:
    """Every generated file's path (relative to the repository root) and its text.

    Raises ``RuntimeError`` with protoc's output if compilation fails."""
    if not proto_files():
        raise RuntimeError(f"no .proto files under {PROTO_DIR}")
    files: dict[Path, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        _protoc(Path(tmp))
        for proto in proto_files():
            for suffix in GENERATED_SUFFIXES:
                raw = (Path(tmp) / proto.with_suffix("").parent / (proto.stem + suffix))
                text = raw.read_text(encoding="utf-8")
                for copy in _copies(proto, suffix):
                    files[copy.path] = _relocate(text, proto, copy.package)
    version = (REPO_ROOT / VERSION_SOURCE).read_text(encoding="utf-8")
    files[CLIENT_DIR / "_version.py"] = (
        f"# Copied from {VERSION_SOURCE.as_posix()} by `make protos`. DO NOT EDIT.\n{version}"
    )
    return files


def _committed_generated() -> set[Path]:
    roots = [PROTO_DIR, REPO_ROOT / CLIENT_DIR]
    return {
        p.relative_to(REPO_ROOT)
        for root in roots
        for suffix in GENERATED_SUFFIXES
        for p in root.rglob(f"*{suffix}")
    }


def _tools_version() -> str:
    from importlib.metadata import version

    return version("grpcio-tools")


def stale_files() -> list[str]:
    """Descriptions of committed generated files that differ from a fresh generation.

    Empty when everything is up to date. Each entry is ``"<path>: <why>"`` with the path
    relative to the repository root.
    """
    problems: list[str] = []
    expected = generate()
    for rel, text in expected.items():
        committed = REPO_ROOT / rel
        if not committed.exists():
            problems.append(f"{rel}: missing (run `make protos`)")
        elif committed.read_text(encoding="utf-8") != text:
            problems.append(
                f"{rel}: stale against grpcio-tools {_tools_version()} (run `make protos`)"
            )
    for rel in sorted(_committed_generated() - set(expected)):
        problems.append(f"{rel}: generated file without a .proto (delete it)")
    return problems


def write() -> list[Path]:
    """Regenerate the committed code in place; return the paths written."""
    written = []
    for rel, text in generate().items():
        path = REPO_ROOT / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(rel)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.protos.generate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the committed generated code is stale",
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = stale_files()
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            return 1
        print("generated code is up to date")
        return 0
    for rel in write():
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
