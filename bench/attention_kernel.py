"""The CPU paged-attention kernel's decode speed where its keys and values come from: the
cache level they fit in, or memory.

    python -m pdserve.bench.attention_kernel [--model smollm2|small|PATH] [--dtype bfloat16]
        [--batches 4 64] [--context 512] [--block-sizes 16] [--threads 1 2]
        [--layers 30] [--huge-pages on|off] [--json PATH]

One decode step's attention of ``batch`` sequences of ``context`` tokens, blocks of each
sequence drawn in random order from the cache, timed two ways:

- ``cached``: the same layer's cache read again and again (it stays in whatever cache level
  holds it: a few sequences fit in L2, 64 of 512 tokens in L3 where it is large enough);
- ``memory``: ``layers`` layers' caches read in turn, as a step of the model reads them, so
  each layer's keys and values come from memory (when ``layers`` times the batch's bytes
  exceeds the last-level cache).

Printed per row: milliseconds a layer (median), GB/s of keys and values read, and
nanoseconds per key and KV head (one query token's keys and values of one KV head, the
unit of the kernel's inner loop). A streaming ``sum()`` of 1 GiB with the same threads
gives the bandwidth to compare with. The caches are in transparent huge pages, as the
engine's (``--huge-pages off``: small pages).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def decode_attention(model: str, dtype: str, batch: int, context: int, block_size: int,
                     layers: int, repeats: int = 5, seed: int = 0,
                     huge: bool = True) -> dict[str, Any]:
    """Times of one decode attention (one query token per sequence), ``cached`` and
    ``memory`` (see the module docstring), on torch's threads as set."""
    from pdserve.bench.compile_eval import model_shape
    from pdserve.engine import cpu_kernels, huge_pages

    if not cpu_kernels.available():
        raise RuntimeError("the CPU kernels are not built (python -m pdserve.engine.cpu_kernels)")
    _, heads, kv_heads, head_dim, _ = model_shape(model)
    gen = torch.Generator().manual_seed(seed)
    per_seq = -(-context // block_size)
    num_blocks = batch * per_seq
    tdtype = DTYPES[dtype]
    shape = (num_blocks, 2, block_size, kv_heads, head_dim)
    cpu = torch.device("cpu")
    caches = [huge_pages.zeros(shape, tdtype, cpu, huge=huge)
              .copy_(torch.randn(shape, generator=gen)) for _ in range(layers)]
    tables = torch.randperm(num_blocks, generator=gen).view(batch, per_seq).to(torch.int32)
    query = torch.randn(batch, heads, head_dim, generator=gen).to(tdtype)
    out = torch.empty_like(query)
    starts = torch.arange(batch + 1, dtype=torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32)
    scale = head_dim**-0.5
    op = torch.ops.pdserve_cpu.paged_attention

    def attend(cache: torch.Tensor) -> None:
        op(out, query, cache, starts, lens, tables, scale)

    for cache in caches[:2]:
        attend(cache)
    cached = []
    for _ in range(max(repeats, 3) * 10):
        t0 = time.perf_counter()
        attend(caches[0])
        cached.append(time.perf_counter() - t0)
    memory = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for cache in caches:
            attend(cache)
        memory.append((time.perf_counter() - t0) / layers)
    kv_bytes = batch * context * kv_heads * head_dim * 2 * caches[0].element_size()
    units = batch * context * kv_heads
    row: dict[str, Any] = {"model": model, "dtype": dtype, "batch": batch, "context": context,
                           "block_size": block_size, "threads": torch.get_num_threads(),
                           "layers": layers, "kv_bytes": kv_bytes}
    for name, times in (("cached", cached), ("memory", memory)):
        t = statistics.median(times)
        row[f"{name}_ms"] = t * 1e3
        row[f"{name}_gbs"] = kv_bytes / t / 1e9
        row[f"{name}_ns_per_key_head"] = t / units * 1e9
    return row


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.attention_kernel",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2",
                   help="smollm2, small, or a checkpoint folder (its config.json)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--batches", type=int, nargs="+", default=[4, 64])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--block-sizes", type=int, nargs="+", default=[16])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--huge-pages", choices=["on", "off"], default="on")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from pdserve.bench.roofline import read_bandwidth_gbs

    rows = []
    print("| threads | batch | block | cached ms | cached GB/s | cached ns | memory ms | "
          "memory GB/s | memory ns | sum() GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        stream = read_bandwidth_gbs()
        for block_size in args.block_sizes:
            for batch in args.batches:
                r = decode_attention(args.model, args.dtype, batch, args.context, block_size,
                                     args.layers, huge=args.huge_pages == "on")
                r["sum_gbs"] = stream
                rows.append(r)
                print(f"| {threads} | {batch} | {block_size} | {r['cached_ms']:.3f} | "
                      f"{r['cached_gbs']:.1f} | {r['cached_ns_per_key_head']:.1f} | "
                      f"{r['memory_ms']:.3f} | {r['memory_gbs']:.1f} | "
                      f"{r['memory_ns_per_key_head']:.1f} | {stream:.1f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
