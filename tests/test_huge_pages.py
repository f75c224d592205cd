"""The KV cache and the bandwidth benchmark's buffer in transparent huge pages, on a Linux
kernel that grants them on advice (THP ``always`` or ``madvise``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdserve.engine import huge_pages
from pdserve.engine.attention import get_attention_backend
from pdserve.engine.config import CacheConfig, EngineConfig, KVCacheSpec
from pdserve.engine.engine import Engine
from pdserve.engine.model.builtin import builtin_checkpoint
from pdserve.engine.model.loader import load_model
from pdserve.engine.runner import ModelRunner

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
CPU = torch.device("cpu")


def _thp_granted_on_advice() -> bool:
    try:
        mode = THP.read_text()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


needs_thp = pytest.mark.skipif(not _thp_granted_on_advice(),
                               reason="transparent huge pages are off on this kernel")


def huge_kib(tensor: torch.Tensor) -> int:
    """The kB of huge pages in the mappings that hold ``tensor``'s storage (the advice
    splits its mapping at the whole pages it covers)."""
    start = tensor.untyped_storage().data_ptr()
    end = start + tensor.untyped_storage().nbytes()
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(x, 16) for x in head.split("-"))
            inside = low < end and start < high
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1])
    return total


@needs_thp
def test_zeros_are_zeros_in_huge_pages_and_plain_zeros_are_not() -> None:
    size = 64 * 2**20
    tensor = huge_pages.zeros((size // 2,), torch.bfloat16, CPU)
    assert tensor.dtype == torch.bfloat16 and tensor.shape == (size // 2,)
    assert not tensor.any()
    assert huge_kib(tensor) * 1024 >= size - 2 * huge_pages.HUGE_PAGE  # all but the edges
    assert huge_kib(torch.zeros(size // 2, dtype=torch.bfloat16)) == 0


def test_small_tensors_and_other_devices_are_left_alone() -> None:
    assert not huge_pages.advise_huge_pages(torch.empty(1024))
    assert not huge_pages.advise_huge_pages(torch.empty(2**22, device="meta"))
    assert not huge_pages.zeros((3, 5), torch.float32, CPU).any()


@needs_thp
def test_the_runners_kv_cache_is_in_huge_pages_when_asked() -> None:
    model = load_model(builtin_checkpoint("tiny"), "float32", CPU)
    c = model.config
    spec = KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 16, "float32")
    num_blocks = 32 * 2**20 // spec.block_bytes
    runner = ModelRunner(model, spec, num_blocks, CPU, get_attention_backend("torch", CPU),
                         huge_pages=True)
    nbytes = runner.kv_cache.untyped_storage().nbytes()
    assert nbytes >= 16 * 2**20
    assert huge_kib(runner.kv_cache) * 1024 >= nbytes - 2 * huge_pages.HUGE_PAGE


@needs_thp
def test_the_engine_takes_huge_pages_when_asked_and_the_benchmark_by_default() -> None:
    def cache(**options: object) -> torch.Tensor:
        config = EngineConfig(model="tiny", dtype="float32", device="cpu",
                              cache=CacheConfig(num_blocks=2048, **options))
        return Engine(config).runner.kv_cache

    on = cache(huge_pages=True)
    assert on.untyped_storage().nbytes() >= 16 * 2**20
    assert huge_kib(on) * 1024 >= on.untyped_storage().nbytes() - 2 * huge_pages.HUGE_PAGE
    assert huge_kib(cache()) == 0
    from pdserve.bench.engine import BenchOptions

    assert BenchOptions().huge_pages


def test_serve_takes_huge_pages_unless_told_not_to() -> None:
    from pdserve.cli import _router_config, build_parser

    base = ["serve", "--model", "tiny", "--device", "cpu"]
    assert _router_config(build_parser().parse_args(base)).pools.engine.cache.huge_pages
    off = build_parser().parse_args([*base, "--huge-pages", "off"])
    assert not _router_config(off).pools.engine.cache.huge_pages
