"""Build and load the engine's C++ CPU kernels (``csrc/``): paged attention that reads the
KV cache in place (``paged_attention.cpp``) and the decoder's fused elementwise stages
(``fused_ops.cpp``).

The kernels are compiled once per machine kind with the system C++ compiler (``$CXX``, else
``c++`` / ``g++``) against the installed torch, for the CPU that builds them
(``-march=native``), into a cache folder (``$PDSERVE_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/pdserve/kernels``, else ``~/.cache/pdserve/kernels``). The file name holds
a hash of the source, the torch version, the flags and the CPU's feature flags, so a change
of any of them builds anew and machines of different kinds sharing a home folder never load
each other's builds. ``make venv`` builds ahead of time (``python -m
pdserve.engine.cpu_kernels``); otherwise the first engine to need them builds
(20-60 s), under a file lock so that concurrent workers build once.

No Python headers are involved: the library registers its ops with torch's dispatcher
(``torch.ops.pdserve_cpu.*``); they run on the calling thread's torch intra-op pool.

``available()`` says whether the ops are loaded; where they cannot be (no compiler, a
failed build), it logs ONE warning line and returns False, and the engine keeps the torch
attention path.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).with_name("csrc")
SOURCES = ("paged_attention.cpp", "fused_ops.cpp", "linear_f32.cpp", "threads.cpp")
HEADERS = ("simd.h",)
LIBRARY = "pdserve_cpu"
# -ffp-contract=off: a * b - c * d stays two roundings, as torch's elementwise ops round.
CXXFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-std=c++17", "-fPIC",
            "-Wno-unused-function")
DISABLE_ENV = "PDSERVE_CPU_KERNELS"
"""Set to ``0`` to skip the kernels (the torch attention path is used)."""


class KernelBuildError(RuntimeError):
    """The kernels could not be built or loaded; the message says why."""


def cache_dir() -> Path:
    explicit = os.environ.get("PDSERVE_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pdserve" / "kernels"


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return name
    raise KernelBuildError("no C++ compiler found (set CXX, or install g++)")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile_command(cxx: str, source: Path, output: Path) -> list[str]:
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    return [cxx, *CXXFLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, "-c", str(source),
            "-o", str(output)]


def _link_command(cxx: str, objects: list[Path], output: Path) -> list[str]:
    torch_lib = Path(torch.__file__).parent / "lib"
    return [cxx, "-shared", "-fopenmp", *map(str, objects), "-o", str(output),
            f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{torch_lib}"]


def _run_all(commands: list[list[str]], cxx: str) -> None:
    """Run the commands in parallel; KernelBuildError with the compiler's last lines if
    any fails."""
    for cmd in commands:
        logger.info("building the CPU kernels: %s", " ".join(cmd))
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in commands]
    failures = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"{cxx} failed ({proc.returncode}): "
                            + "\n".join(out.strip().splitlines()[-20:]))
    if failures:
        raise KernelBuildError("\n".join(failures))


def library_path(cxx: str | None = None) -> Path:
    """Where the build for this source, torch, compiler and CPU lives (built or not)."""
    cxx = cxx or _compiler()
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update((SOURCE_DIR / name).read_bytes())
    for part in (torch.__version__, cxx, " ".join(CXXFLAGS), _cpu_flags(), sys.platform):
        digest.update(b"\0" + part.encode())
    return cache_dir() / f"{LIBRARY}-{digest.hexdigest()[:16]}.so"


def build(force: bool = False) -> Path:
    """Compile the kernels unless a build for this machine exists; returns the library."""
    cxx = _compiler()
    target = library_path(cxx)
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{LIBRARY}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same file
        if target.is_file() and not force:
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            objects = [Path(tmp) / f"{Path(name).stem}.o" for name in SOURCES]
            _run_all([_compile_command(cxx, SOURCE_DIR / name, obj)
                      for name, obj in zip(SOURCES, objects, strict=True)], cxx)
            out = Path(tmp) / target.name
            _run_all([_link_command(cxx, objects, out)], cxx)
            os.replace(out, target)
    return target


@functools.cache
def available() -> bool:
    """True once the ops are loaded (building them first if needed). False, after one
    logged warning, when this machine cannot have them."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        logger.warning("CPU kernels disabled (%s=0): using the torch attention path and "
                       "torch's elementwise ops", DISABLE_ENV)
        return False
    try:
        path = build()
        torch.ops.load_library(str(path))
    except Exception as e:  # any failure keeps the torch path working
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        logger.warning("CPU kernels unavailable (%s): using the torch attention path and "
                       "torch's elementwise ops", reason)
        return False
    return True


def half_matmuls_emulated() -> bool:
    """True when this CPU has no AVX-512 (and so no AVX512-BF16 or AMX either): torch's
    bfloat16 and float16 matmuls then take a scalar fallback, measured on an AVX2-only
    2-core machine at 0.2 GFLOP/s (bfloat16) and 1.2 GFLOP/s (float16) against 137 GFLOP/s
    in float32."""
    flags = set(_cpu_flags().split())
    return platform.machine() in ("x86_64", "AMD64") and "avx512f" not in flags


def simd_level() -> int:
    """0: portable loops, 1: AVX-512, 2: AVX-512 with bfloat16 dot products."""
    return int(torch.ops.pdserve_cpu.simd_level())


def main() -> int:
    """``python -m pdserve.engine.cpu_kernels [--force]``: build ahead of time.
    Exits 0 when built (or when no compiler exists: the torch path is used then)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = build(force="--force" in sys.argv[1:])
    except KernelBuildError as e:
        print(f"CPU kernels not built: {e}", file=sys.stderr)
        return 0 if "no C++ compiler" in str(e) else 1
    print(f"CPU kernels: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
