"""Would ``torch.compile`` pay on the CPU? The decoder layer's dense work, eager against
compiled, on one model's shapes.

    python -m pdserve.bench.compile_eval [--model smollm2|small|PATH] [--dtype bfloat16]
                                         [--rows 1 16 64 512] [--threads 1 2] [--json PATH]

The engine runs a decoder layer as fused C++ ops (``pdserve_cpu``: add + RMSNorm, RoPE,
SwiGLU) around packed oneDNN matmuls, attention aside. Here the same layer minus attention
(norm, QKV projection, RoPE of q and k; then the output projection, norm, gate/up
projection, SwiGLU, down projection) runs three ways on random weights of the model's
shapes: the engine's eager path, the plain torch reference eager, and that reference under
``torch.compile`` (inductor's C++ backend, weights frozen so that it packs them itself, one
compile per row count: ``dynamic=False``; ``--mode max-autotune`` by default, which also
tries inductor's own matmul kernels for each shape; ``--cpp-wrapper`` for its C++ caller).
Printed per row count: microseconds per layer for each, the compile time, and the largest
difference of the compiled output from the engine's. The figures
are what ``torch.compile`` of the layer stack could save per layer (times the layers per
step); attention, the sampler and the scheduler are outside either way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SHAPES = {
    # hidden, heads, kv heads, head dim, intermediate
    "smollm2": (576, 9, 3, 64, 1536),
    "small": (640, 10, 2, 64, 2048),
}


def model_shape(model: str) -> tuple[int, int, int, int, int]:
    """(hidden, heads, KV heads, head dim, intermediate) of a named shape or a checkpoint
    folder (its config.json)."""
    if model in SHAPES:
        return SHAPES[model]
    cfg = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    heads = cfg["num_attention_heads"]
    return (cfg["hidden_size"], heads, cfg.get("num_key_value_heads", heads),
            cfg.get("head_dim") or cfg["hidden_size"] // heads, cfg["intermediate_size"])


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after three untimed ones."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def evaluate(model: str, dtype_name: str, rows: Sequence[int], threads: int,
             repeats: int = 50, mode: str = "default",
             cpp_wrapper: bool = False) -> list[dict[str, Any]]:
    import torch
    import torch._dynamo
    import torch._inductor.config as inductor_config
    import torch.nn.functional as F

    from pdserve.engine import cpu_kernels
    from pdserve.engine.model.cpu_linear import linear, pack, packing_supported

    if not cpu_kernels.available():
        raise RuntimeError("the engine's C++ kernels are not built (make kernels)")
    from pdserve.engine.model.cpu_ops import add_rms_norm, rotate, silu_mul

    torch.set_num_threads(threads)
    inductor_config.freezing = True
    inductor_config.cpp_wrapper = cpp_wrapper
    dtype = getattr(torch, dtype_name)
    hidden, heads, kv_heads, head_dim, inter = model_shape(model)
    qkv_out = (heads + 2 * kv_heads) * head_dim
    gen = torch.Generator().manual_seed(0)

    def weight(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * shape[-1] ** -0.5).to(dtype)

    w = {"norm1": weight(hidden) + 1, "qkv": weight(qkv_out, hidden),
         "o": weight(hidden, heads * head_dim), "norm2": weight(hidden) + 1,
         "gate_up": weight(2 * inter, hidden), "down": weight(hidden, inter)}
    packed = {k: pack(v) if v.dim() == 2 and packing_supported(dtype, v.device) else v
              for k, v in w.items()}
    eps = 1e-5
    qk_heads = heads + kv_heads

    def engine_layer(x: torch.Tensor, res: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = x.shape[0]
        h, res = add_rms_norm(x, res, packed["norm1"], eps)
        qkv = linear(h, packed["qkv"])
        qk, v = qkv.view(n, qk_heads + kv_heads, head_dim).split_with_sizes(
            (qk_heads, kv_heads), dim=1)
        qk = rotate(qk, cos, sin)
        out = linear(attn, packed["o"])
        h, res = add_rms_norm(out, res, packed["norm2"], eps)
        return linear(silu_mul(linear(h, packed["gate_up"])), packed["down"]), res, qk, v

    class Reference(torch.nn.Module):
        """The layer in plain torch ops, its weights parameters (what freezing packs)."""

        def __init__(self) -> None:
            super().__init__()
            for k, v in w.items():
                setattr(self, k, torch.nn.Parameter(v, requires_grad=False))

        def rms(self, x: torch.Tensor, weight_: torch.Tensor) -> torch.Tensor:
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(
                x.dtype) * weight_

        def forward(self, x: torch.Tensor, res: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, ...]:
            n = x.shape[0]
            res = x + res
            qkv = F.linear(self.rms(res, self.norm1), self.qkv)
            qk, v = qkv.view(n, qk_heads + kv_heads, head_dim).split_with_sizes(
                (qk_heads, kv_heads), dim=1)
            a, b = qk.float().chunk(2, dim=-1)
            c, s = cos.float(), sin.float()
            qk = torch.cat((a * c - b * s, b * c + a * s), dim=-1).to(x.dtype)
            res = F.linear(attn, self.o) + res
            g, u = F.linear(self.rms(res, self.norm2), self.gate_up).chunk(2, dim=-1)
            return F.linear(F.silu(g) * u, self.down), res, qk, v

    reference_layer = Reference().eval()

    out = []
    for n in rows:
        torch._dynamo.reset()
        x, res = torch.randn(n, hidden).to(dtype), torch.randn(n, hidden).to(dtype)
        attn = torch.randn(n, heads * head_dim).to(dtype)
        angles = torch.rand(n, 1, head_dim // 2) * 6.28
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        args = (x, res, cos, sin, attn)
        with torch.inference_mode():
            compiled = torch.compile(reference_layer, dynamic=False,
                                     mode=None if mode == "default" else mode)
            t0 = time.perf_counter()
            compiled(*args)
            compile_s = time.perf_counter() - t0
            timed = {name: median_seconds(lambda f=f, a=args: f(*a), repeats) * 1e6
                     for name, f in (("engine_us", engine_layer),
                                     ("reference_us", reference_layer),
                                     ("compiled_us", compiled))}
            err = (compiled(*args)[0].float() - engine_layer(*args)[0].float()).abs().max()
            row = {"rows": n, "threads": threads, "dtype": dtype_name, "mode": mode,
                   "cpp_wrapper": cpp_wrapper, **timed, "compile_s": compile_s,
                   "max_abs_diff": float(err)}
        out.append(row)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.compile_eval",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2",
                   help="smollm2, small, or a checkpoint folder (its config.json)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 512])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--mode", default="max-autotune",
                   choices=("default", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode (max-autotune: inductor benchmarks its own "
                        "matmul kernels against oneDNN's for each shape)")
    p.add_argument("--cpp-wrapper", action="store_true",
                   help="inductor's C++ wrapper: the compiled graph is called without Python")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = []
    for threads in args.threads:
        rows += evaluate(args.model, args.dtype, args.rows, threads, mode=args.mode,
                         cpp_wrapper=args.cpp_wrapper)
    print("| threads | rows | engine eager us | reference eager us | compiled us | "
          "compiled / engine | compile s | max |diff| |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['rows']} | {r['engine_us']:.0f} | {r['reference_us']:.0f} | "
              f"{r['compiled_us']:.0f} | {r['compiled_us'] / r['engine_us']:.2f} | "
              f"{r['compile_s']:.1f} | {r['max_abs_diff']:.2g} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
