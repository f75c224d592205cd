"""Generate (or check) the committed Python code for every .proto under ``protos/``.

``python -m protos.generate`` rewrites ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` next
to each ``.proto``. ``python -m protos.generate --check`` writes nothing; it exits 1 and names
every stale, missing or orphaned generated file when the committed code differs from what the
.proto files generate now.

Code is generated with the repository root as the only import root (``-I .``), so generated
modules import each other by their full package path (``from protos.pdserve.v1 import
generation_pb2``) and work both from a checkout and when installed.
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """Every .proto under ``protos/``, as paths relative to the repository root, sorted."""
    return sorted(p.relative_to(REPO_ROOT) for p in PROTO_DIR.rglob("*.proto"))


def _generated_names(proto: Path) -> list[Path]:
    stem = proto.with_suffix("")
    return [stem.with_name(stem.name + suffix) for suffix in GENERATED_SUFFIXES]


def generate_into(out_dir: Path) -> list[Path]:
    """Run protoc on every .proto, writing into ``out_dir``; return the generated paths.

    Paths are relative to ``out_dir`` (the same layout as the repository). Raises
    ``RuntimeError`` with protoc's output if compilation fails.
    """
    protos = proto_files()
    if not protos:
        raise RuntimeError(f"no .proto files under {PROTO_DIR}")
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
        *(str(p) for p in protos),
    ]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed ({result.returncode}):\n{result.stderr}")
    return [name for proto in protos for name in _generated_names(proto)]


def _committed_generated() -> set[Path]:
    return {
        p.relative_to(REPO_ROOT)
        for suffix in GENERATED_SUFFIXES
        for p in PROTO_DIR.rglob(f"*{suffix}")
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
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        expected = generate_into(fresh_root)
        for rel in expected:
            committed = REPO_ROOT / rel
            if not committed.exists():
                problems.append(f"{rel}: missing (run `python -m protos.generate`)")
            elif not filecmp.cmp(committed, fresh_root / rel, shallow=False):
                problems.append(
                    f"{rel}: stale against grpcio-tools {_tools_version()}"
                    " (run `python -m protos.generate`)"
                )
        for rel in sorted(_committed_generated() - set(expected)):
            problems.append(f"{rel}: generated file without a .proto (delete it)")
    return problems


def write() -> list[Path]:
    """Regenerate the committed code in place; return the paths written."""
    return generate_into(REPO_ROOT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__)
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
        print("generated protobuf code is up to date")
        return 0
    for rel in write():
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
