"""A model's float32 layer projections on the CPU, three ways, as a forward pass meets them.

    python -m pdserve.bench.linear_kernel [--model smollm2|small|PATH] [--layers 30]
        [--rows 1 8 16 32 64 544] [--threads 2] [--repeats 7] [--json PATH]

Each layer's four projections (fused QKV, output, fused gate/up, down), with random weights
of the model's shapes, ``layers`` layers of them taken in turn, so that each weight comes
from memory as in a step of the model (when the layers' weights exceed the last-level
cache). Per row count, the median milliseconds of one pass over every layer through:

- ``mkl``: ``F.linear`` (MKL's sgemm, which copies the weight into its layout per call);
- ``mkl_packed``: MKL's packed sgemm (``torch.ops.mkl._mkl_linear``), packed for exactly
  that row count (a weight copy per row count; any other count falls back to ``mkl``);
- ``engine``: the engine's kernel on weights packed once (``cpu_linear.pack``), what the
  engine runs in float32 where the CPU kernels are built and the CPU has AVX-512.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pdserve.bench.compile_eval import median_seconds, model_shape


def projection_shapes(model: str) -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's four projections."""
    hidden, heads, kv_heads, head_dim, inter = model_shape(model)
    return [((heads + 2 * kv_heads) * head_dim, hidden), (hidden, heads * head_dim),
            (2 * inter, hidden), (hidden, inter)]


def _plain(xs: list[torch.Tensor], weights: list[list[torch.Tensor]]) -> None:
    for layer in weights:
        for x, w in zip(xs, layer, strict=True):
            F.linear(x, w)


def _mkl_packed(xs: list[torch.Tensor], weights: list[list[torch.Tensor]],
                packed: list[list[torch.Tensor]]) -> None:
    for layer, layer_packed in zip(weights, packed, strict=True):
        for x, w, wp in zip(xs, layer, layer_packed, strict=True):
            torch.ops.mkl._mkl_linear(x, wp, w, None, x.shape[0])


def _engine(xs: list[torch.Tensor], packed: list[list[torch.Tensor]]) -> None:
    from pdserve.engine.model.cpu_linear import linear

    for layer in packed:
        for x, w in zip(xs, layer, strict=True):
            linear(x, w)


def measure(model: str, layers: int, rows: Sequence[int], repeats: int,
            seed: int = 0) -> list[dict[str, Any]]:
    from pdserve.engine.model.cpu_linear import pack, packing_supported

    engine_kernel = packing_supported(torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    shapes = projection_shapes(model)
    weights = [[torch.randn(n, k, generator=gen) * 0.02 for n, k in shapes]
               for _ in range(layers)]
    packed = [[pack(w) for w in layer] for layer in weights] if engine_kernel else None

    def ms(fn: partial[None]) -> float:
        return median_seconds(fn, repeats) * 1e3

    out = []
    for m in rows:
        xs = [torch.randn(m, k, generator=gen) for _, k in shapes]
        mkl = [[torch.ops.mkl._mkl_reorder_linear_weight(w, m) for w in layer]
               for layer in weights]
        flops = 2 * m * layers * sum(n * k for n, k in shapes)
        engine_ms = ms(partial(_engine, xs, packed)) if packed else None
        out.append({"rows": m, "mkl_ms": ms(partial(_plain, xs, weights)),
                    "mkl_packed_ms": ms(partial(_mkl_packed, xs, weights, mkl)),
                    "engine_ms": engine_ms,
                    "engine_gflops": flops / engine_ms / 1e6 if engine_ms else None})
        del mkl
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.linear_kernel",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2",
                   help="smollm2, small, or a checkpoint folder (its config.json)")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64, 544])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.model, args.layers, args.rows, args.repeats)
    print(f"{args.model}: {args.layers} layers x 4 projections, float32, {args.threads} threads "
          "(ms a pass, median)")
    print("| rows | MKL F.linear | MKL packed for the row count | engine kernel | engine GFLOP/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        engine = (f"{r['engine_ms']:.1f} | {r['engine_gflops']:.0f}" if r["engine_ms"]
                  else "- | -")
        print(f"| {r['rows']} | {r['mkl_ms']:.1f} | {r['mkl_packed_ms']:.1f} | {engine} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
