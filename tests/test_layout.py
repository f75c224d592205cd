"""The house plan: one import root, arrows that run one way, a router that loads no torch.

Every module is read as source (``ast``), so these checks see lazy imports inside functions
too, not only what a test happens to execute.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {
    "engine": "pdserve.engine",
    "kvtransfer": "pdserve.kvtransfer",
    "worker": "pdserve.worker",
    "prefill_worker": "pdserve.prefill_worker",
    "decode_worker": "pdserve.decode_worker",
    "router": "pdserve.router",
    "protos": "pdserve.protos",
    "bench": "pdserve.bench",
    "planner": "pdserve.planner",
    "pdserve": "pdserve",
    "clients/python/pdserve_client": "pdserve_client",
    "tests": "tests",
}
"""Source folder -> the package it is imported as."""
LEGACY_ROOTS = {"engine", "router", "bench", "protos", "kvtransfer", "prefill_worker",
                "decode_worker", "worker", "planner"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _imports(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


def _imported_by(prefix: str) -> dict[str, set[str]]:
    return {m: _imports(p, m) for m, p in MODULES.items()
            if m == prefix or m.startswith(prefix + ".")}


def _offenders(importers: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for module, names in _imported_by(importers).items():
        for name in sorted(names):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{module} imports {name}")
    return bad


def test_every_project_import_goes_through_the_pdserve_root() -> None:
    bad = []
    for module, path in MODULES.items():
        for name in _imports(path, module):
            if name.split(".")[0] in LEGACY_ROOTS:
                bad.append(f"{module} imports {name}")
    assert not bad, "imports outside the pdserve root:\n" + "\n".join(bad)


@pytest.mark.parametrize(("importers", "forbidden"), [
    ("pdserve.prefill_worker", ("pdserve.decode_worker",)),
    ("pdserve.decode_worker", ("pdserve.prefill_worker",)),
    ("pdserve.worker", ("pdserve.prefill_worker", "pdserve.decode_worker", "pdserve.router")),
    ("pdserve.router", ("pdserve.bench", "pdserve.cli", "pdserve.planner")),
    ("pdserve.planner.sim", ("torch", "ray", "grpc", "pdserve_client", "pdserve.worker")),
    ("pdserve.planner.workers", ("torch", "ray", "grpc", "pdserve_client")),
    ("pdserve.planner.router_model", ("torch", "ray", "grpc", "pdserve_client")),
    ("pdserve.planner.search", ("torch", "ray", "grpc", "pdserve_client")),
    ("pdserve.planner.costs", ("torch", "ray", "grpc", "pdserve_client")),
    ("pdserve.engine", ("pdserve.router", "pdserve.worker", "pdserve.prefill_worker",
                        "pdserve.decode_worker", "pdserve.kvtransfer", "pdserve.bench",
                        "ray", "grpc", "nixl", "nixl_cu12", "nixl_cu13", "zmq")),
    ("pdserve.kvtransfer", ("pdserve.router", "pdserve.worker", "pdserve.prefill_worker",
                            "pdserve.decode_worker", "pdserve.bench", "ray", "grpc")),
    ("pdserve.router.http", ("pdserve.router.app",)),
    ("pdserve.router.server", ("pdserve.router.http", "pdserve.router.app")),
    ("pdserve_client", ("pdserve", "torch", "ray", "nixl")),
])
def test_arrows_run_one_way(importers: str, forbidden: tuple[str, ...]) -> None:
    assert _imported_by(importers), f"no modules under {importers}"
    bad = _offenders(importers, forbidden)
    assert not bad, "\n".join(bad)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from .aio import X\n\ndef f():\n    from pdserve.engine import engine\n")
    names = _imports(probe, "pdserve_client.probe")
    assert {"pdserve_client.aio", "pdserve_client.aio.X", "pdserve.engine.engine"} <= names


@pytest.mark.parametrize("module", ["pdserve.router.server", "pdserve.router.app",
                                    "pdserve.cli"])
def test_router_modules_import_without_torch(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'nixl', 'nixl_cu12', 'nixl_cu13', 'triton'))\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"{module} loads {out.stdout.strip()}"


def test_nothing_reads_the_folder_beside_the_repository() -> None:
    """Data, schemas and traces live in the repository: no path reaches ``../shared`` (the
    session hook in conftest.py catches reads at run time; this catches the paths)."""
    needles = ("../shared", '"shared" /', "'shared' /", ".parent / \"shared\"")
    bad = []
    for path in [*MODULES.values(), REPO / "Makefile", *REPO.glob("deploy/**/*.yaml")]:
        text = path.read_text(encoding="utf-8")
        bad += [f"{path.relative_to(REPO)}: {n}" for n in needles if n in text]
    bad = [b for b in bad if not b.startswith("tests/test_layout.py")]  # the needles
    assert not bad, "\n".join(bad)


def test_the_session_hook_tells_reads_beside_the_repository() -> None:
    from tests.conftest import beside_repo

    assert beside_repo(str(REPO.parent / "shared" / "data" / "trace.jsonl"))
    assert beside_repo(str(REPO / ".." / "shared"))
    assert not beside_repo(str(REPO / "bench" / "data" / "trace.jsonl"))
    assert not beside_repo(str(REPO))
    assert not beside_repo("/proc/self/status")
