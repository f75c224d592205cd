"""A model of KV transfer between prefill and decode GPUs, for what cannot be measured here.

    python -m pdserve.bench.transfer_model [--prompt-tokens 4096] [--chunk-tokens 512]

Pure arithmetic (no torch). For a prompt of T tokens, each of a prefill worker's TP ranks
holds 1/TP of the KV heads of every block and sends exactly those to the decode rank(s) that
hold them, each over its own link, so a rank moves ``T * kv_bytes_per_token / TP`` bytes.

Assumptions (stated in the output too):
- KV bytes per token = 2 (K and V) x layers x KV heads x head_dim x bytes per element;
- links are used at the given effective bandwidth per direction, one link per GPU, no
  contention between ranks; per-message latency (tens of microseconds) is ignored;
- prefill time = FLOPs / (TP x peak x MFU), FLOPs = 2 x params x T (linear layers) +
  2 x layers x T^2 x d_model (causal attention); tensor-parallel all-reduces are ignored;
- streamed per chunk of C tokens (pdserve's default), the transfer of chunk k starts when
  chunk k is computed and the previous chunk has gone: only the tail is exposed
  (``exposed_s``);
- the nccl transport also copies the blocks once on each side (gather into a transfer buffer,
  scatter out of it) at HBM speed (``staging_s``); NIXL writes blocks in place.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str
    layers: int
    kv_heads: int
    head_dim: int
    d_model: int
    params: float
    dtype_bytes: int = 2  # bf16

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * self.kv_bytes_per_token_per_layer


LLAMA_8B = ModelShape("Llama-3.1-8B", layers=32, kv_heads=8, head_dim=128, d_model=4096,
                      params=8.03e9)
LLAMA_70B = ModelShape("Llama-3.1-70B", layers=80, kv_heads=8, head_dim=128, d_model=8192,
                       params=70.6e9)


@dataclass(frozen=True, slots=True)
class Link:
    name: str
    bytes_per_s: float  # effective, per direction, per GPU


NVLINK4 = Link("NVLink 4 (H100 SXM)", 450e9)
PCIE5 = Link("PCIe 5 x16", 55e9)
IB400 = Link("400 Gb/s IB/RoCE", 48e9)
LINKS = (NVLINK4, PCIE5, IB400)


@dataclass(frozen=True, slots=True)
class Gpu:
    name: str
    peak_flops: float  # dense bf16
    mfu: float  # fraction of peak a prefill reaches
    hbm_bytes_per_s: float


H100 = Gpu("H100 SXM", peak_flops=989e12, mfu=0.5, hbm_bytes_per_s=3.35e12)


def rank_bytes(model: ModelShape, tokens: int, tp: int) -> int:
    """KV bytes one of ``tp`` ranks sends for ``tokens`` tokens (TP must divide the heads)."""
    if tp < 1 or model.kv_heads % tp:
        raise ValueError(f"TP {tp} does not divide {model.name}'s {model.kv_heads} KV heads")
    return tokens * model.kv_bytes_per_token // tp


def prefill_seconds(model: ModelShape, tokens: int, tp: int, gpu: Gpu = H100) -> float:
    flops = 2 * model.params * tokens + 2 * model.layers * tokens**2 * model.d_model
    return flops / (tp * gpu.peak_flops * gpu.mfu)


def exposed_seconds(transfer_s: float, prefill_s: float, chunks: int) -> float:
    """Transfer time left after the prefill when each of ``chunks`` equal chunks is sent as
    soon as it is computed and the link is free: x + (n - 1) * max(0, x - c) for a chunk's
    transfer x and compute c."""
    if chunks < 1:
        raise ValueError(f"need at least one chunk, got {chunks}")
    x, c = transfer_s / chunks, prefill_s / chunks
    return x + (chunks - 1) * max(0.0, x - c)


@dataclass(frozen=True, slots=True)
class Estimate:
    model: str
    tp: int
    link: str
    rank_mib: float
    transfer_s: float
    prefill_s: float
    share: float  # transfer / prefill, if nothing overlapped
    exposed_s: float  # streamed per chunk
    staging_s: float  # the nccl transport's extra copies (both sides, one each)


def estimate(model: ModelShape, tokens: int, tp: int, link: Link, chunk_tokens: int,
             gpu: Gpu = H100) -> Estimate:
    nbytes = rank_bytes(model, tokens, tp)
    transfer = nbytes / link.bytes_per_s
    prefill = prefill_seconds(model, tokens, tp, gpu)
    chunks = -(-tokens // chunk_tokens)
    staging = 2 * (2 * nbytes / gpu.hbm_bytes_per_s)  # read + write, sender and receiver
    return Estimate(model.name, tp, link.name, nbytes / 2**20, transfer, prefill,
                    transfer / prefill, exposed_seconds(transfer, prefill, chunks), staging)


def table(tokens: int, chunk_tokens: int, tps: tuple[int, ...] = (1, 2, 4, 8)) -> list[Estimate]:
    return [estimate(m, tokens, tp, link, chunk_tokens)
            for m in (LLAMA_8B, LLAMA_70B) for tp in tps for link in LINKS]


def markdown(rows: list[Estimate]) -> str:
    lines = ["| model | TP | link | MiB per rank | transfer | prefill | transfer / prefill "
             "| exposed, streamed | nccl staging copies |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.tp} | {r.link} | {r.rank_mib:,.0f} | "
                     f"{r.transfer_s * 1e3:.2f} ms | {r.prefill_s * 1e3:.0f} ms | "
                     f"{r.share:.1%} | {r.exposed_s * 1e3:.2f} ms | {r.staging_s * 1e3:.2f} ms |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--chunk-tokens", type=int, default=512)
    args = parser.parse_args(argv)
    for m in (LLAMA_8B, LLAMA_70B):
        print(f"{m.name}: {m.kv_bytes_per_token_per_layer:,} B of KV per token per layer, "
              f"{m.kv_bytes_per_token / 1024:,.0f} KiB per token (bf16)")
    print(f"Prefill on {H100.name}: {H100.peak_flops / 1e12:.0f} TFLOP/s bf16 x MFU "
          f"{H100.mfu:.0%} per rank; HBM {H100.hbm_bytes_per_s / 1e12:.2f} TB/s; links: "
          + ", ".join(f"{k.name} {k.bytes_per_s / 1e9:.0f} GB/s" for k in LINKS))
    print(f"{args.prompt_tokens}-token prompt, streamed in chunks of {args.chunk_tokens} tokens "
          "(70B at TP 1 does not fit one 80 GB GPU: shown for scale):\n")
    print(markdown(table(args.prompt_tokens, args.chunk_tokens)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
