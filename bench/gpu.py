"""GPU benchmark: the two hardware ceilings, and the engine's decode and prefill against them.

In one run on one CUDA device, for a Llama-3-8B-shaped model with random bf16 weights
created on the device (no checkpoint files):

- ceilings: device-to-device copy bandwidth (bytes read + bytes written, over time) and
  the rate of a large bf16 matmul;
- decode: the step time of ``ModelRunner.execute`` (Triton attention, decode through CUDA
  graphs, and eagerly for comparison) at batch 1, 8, 64 and 256 with 1k- and 8k-token
  contexts, every sequence at the same context length. Roofline fraction = (bytes read per
  step / measured bandwidth) / step time, where the bytes are every weight but the embedding
  table (plus the batch's embedding rows) and the K/V of every sequence's whole context;
- prefill: model-FLOPs utilization of one 512-, 2k- and 8k-token prompt: (2 x layer
  matmul weights x tokens + 2 x LM head weights for the one sampled row + causal attention
  FLOPs 2 x layers x heads x head_dim x T(T+1)) / time / measured matmul rate. The
  attention FLOPs count only the unmasked (causal) half; the table shows their share;
- peer: transformers ``LlamaForCausalLM`` of the same shape, random bf16 on the same GPU,
  ``generate`` (greedy, sdpa attention) at the same batch on 1k-token prompts. Its decode
  rate is batch x N / (time of generate(1 + N tokens) - time of generate(1 token)), so its
  prefill is excluded; its context grows from 1k to 1k + N while ours stays at 1k.

A configuration whose KV cache does not fit in free memory is reported as skipped (batch 256
with 8k tokens needs 256 GiB of KV). Without CUDA the script prints why and exits with 2.

Run: ``python -m pdserve.bench.gpu [--json PATH] [--batches 1 8 64 256] [--contexts 1024 8192]
[--prompts 512 2048 8192] [--hf-batches 1 8 64] [--no-hf] [--no-eager]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pdserve.bench.common import Progress, markdown_table
from pdserve.engine.config import KVCacheSpec, ModelConfig, RopeConfig

LLAMA3_8B = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope=RopeConfig(theta=500000.0, kind="llama3", factor=8.0, original_max_position=8192),
)
"""The shape of Meta-Llama-3-8B (8,030,261,248 parameters)."""

BF16_BYTES = 2
BLOCK_SIZE = 16
MEMORY_MARGIN = 4 << 30
"""Free memory kept out of the KV cache for activations, graphs and the allocator."""
TARGET_BATCH = 64
TARGET_CONTEXT = 1024


# -- pure arithmetic (tested on CPU) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParamCounts:
    """Parameters of a Llama-family model by role."""

    embedding: int
    lm_head: int  # 0 when tied to the embedding
    layer_matmuls: int  # qkv, o, gate_up and down of every layer
    norms: int

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.layer_matmuls + self.norms


def param_counts(c: ModelConfig) -> ParamCounts:
    """Parameter counts of ``c`` (no biases, no q/k norms: the Llama variant)."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    h, inter = c.hidden_size, c.intermediate_size
    per_layer = h * (q + 2 * kv) + q * h + 2 * inter * h + inter * h
    embedding = c.vocab_size * h
    return ParamCounts(
        embedding=embedding,
        lm_head=0 if c.tie_word_embeddings else embedding,
        layer_matmuls=c.num_layers * per_layer,
        norms=c.num_layers * 2 * h + h,
    )


def kv_bytes_per_token(c: ModelConfig, dtype_bytes: int = BF16_BYTES) -> int:
    """K and V of one token across all layers."""
    return c.num_layers * 2 * c.num_kv_heads * c.head_dim * dtype_bytes


def decode_bytes(c: ModelConfig, batch: int, context: int, dtype_bytes: int = BF16_BYTES) -> int:
    """Bytes one decode step must read at least: every weight except the embedding table,
    the ``batch`` embedding rows it looks up, and the K/V of ``context`` tokens (the new one
    included) for each of the ``batch`` sequences."""
    p = param_counts(c)
    lm_head = p.lm_head or p.embedding  # a tied head reads the embedding table
    weights = (p.layer_matmuls + lm_head + p.norms + batch * c.hidden_size) * dtype_bytes
    return weights + batch * context * kv_bytes_per_token(c, dtype_bytes)


def prefill_flops(c: ModelConfig, tokens: int, sampled_rows: int = 1) -> tuple[int, int]:
    """(matmul FLOPs, attention FLOPs) of prefilling one ``tokens``-token prompt and
    computing logits for ``sampled_rows`` rows. Attention counts the causal part only:
    query ``i`` meets ``i + 1`` keys, 4 x head_dim FLOPs each (QK^T and PV)."""
    p = param_counts(c)
    lm_head = p.lm_head or p.embedding
    matmul = 2 * p.layer_matmuls * tokens + 2 * lm_head * sampled_rows
    attention = 2 * c.num_layers * c.num_heads * c.head_dim * tokens * (tokens + 1)
    return matmul, attention


def kv_cache_blocks(batch: int, context: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks for ``batch`` sequences of ``context`` tokens each."""
    return batch * -(-context // block_size)


def roofline_fraction(bytes_read: int, bandwidth: float, step_seconds: float) -> float:
    """Time the bytes take at ``bandwidth`` (bytes/s) over the measured step time."""
    return bytes_read / bandwidth / step_seconds


# -- measurements (CUDA only) --------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_seconds(fn: Callable[[], object], iters: int, warmup: int = 2) -> float:
    """Mean wall time of ``fn`` over ``iters`` calls, the device synchronized around them
    (host work included, as a serving loop sees it)."""
    for _ in range(warmup):
        fn()
    _sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync()
    return (time.perf_counter() - start) / iters


def copy_bandwidth(nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth, bytes/s, counting the bytes read and the written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = cuda_seconds(lambda: dst.copy_(src), iters)
    return 2 * nbytes / seconds


def matmul_rate(n: int = 8192, iters: int = 20) -> float:
    """FLOP/s of an ``n x n @ n x n`` bf16 matmul."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    seconds = cuda_seconds(lambda: a @ b, iters)
    return 2 * n**3 / seconds


class _RandomTensors(Mapping[str, torch.Tensor]):
    """Hugging Face tensor names -> random bf16 tensors made on the device when asked for
    (norm weights 1, everything else N(0, 0.02)): loading holds one tensor beyond the model."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], device: str, seed: int = 0) -> None:
        self.shapes = shapes
        self.device = device
        self.gen = torch.Generator(device).manual_seed(seed)

    def __getitem__(self, name: str) -> torch.Tensor:
        t = torch.empty(self.shapes[name], dtype=torch.bfloat16, device=self.device)
        if name.endswith("norm.weight"):
            return t.fill_(1.0)
        return t.normal_(0.0, 0.02, generator=self.gen)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def random_model(config: ModelConfig, device: str = "cuda") -> torch.nn.Module:
    """An engine ``CausalLM`` of ``config`` with random bf16 weights made on ``device``."""
    from pdserve.engine.model.llama import CausalLM

    model = CausalLM(config)
    tensors = _RandomTensors(model.hf_tensor_shapes(), device)
    model.load_hf_tensors(tensors, torch.bfloat16, device)
    return model.eval()


def _spec(c: ModelConfig) -> KVCacheSpec:
    return KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, BLOCK_SIZE, "bfloat16")


def _fits(num_blocks: int, spec: KVCacheSpec, device: torch.device) -> tuple[bool, float]:
    need = (num_blocks + 1) * spec.block_bytes
    if device.type != "cuda":
        return True, need / 2**30
    free, _ = torch.cuda.mem_get_info(device)
    return need + MEMORY_MARGIN <= free, need / 2**30


def _sequence(i: int, tokens: int, blocks: range) -> Any:
    from pdserve.engine.sampling import SamplingParams
    from pdserve.engine.sequence import Sequence

    seq = Sequence(f"s{i}", [3 + (i + t) % 1000 for t in range(tokens)], SamplingParams(), 0.0, i)
    seq.block_ids = list(blocks)
    return seq


@dataclass(slots=True)
class DecodeRow:
    batch: int
    context: int
    kv_gib: float
    bytes_per_step: int
    step_ms_graphs: float | None = None
    step_ms_eager: float | None = None
    roofline_ms: float | None = None
    roofline_fraction: float | None = None
    tokens_per_s: float | None = None
    skipped: str | None = None


def measure_decode(
    model: torch.nn.Module,
    c: ModelConfig,
    batch: int,
    context: int,
    bandwidth: float,
    iters: int,
    eager: bool,
) -> DecodeRow:
    """Decode step time of ``batch`` sequences at ``context`` tokens each (the step's token
    is the ``context``-th); the same step is re-run, which rewrites the same slots."""
    from pdserve.engine.attention import get_attention_backend
    from pdserve.engine.runner import ModelRunner
    from pdserve.engine.scheduler import ScheduledBatch

    spec = _spec(c)
    per_seq = kv_cache_blocks(1, context)
    num_blocks = batch * per_seq
    nbytes = decode_bytes(c, batch, context)
    device = next(model.parameters()).device
    fits, gib = _fits(num_blocks, spec, device)
    row = DecodeRow(batch, context, gib, nbytes)
    if not fits:
        row.skipped = f"KV cache needs {gib:.0f} GiB"
        return row
    seqs = [_sequence(i, context, range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    for seq in seqs:
        seq.num_computed_tokens = context - 1
    step = ScheduledBatch(decodes=seqs)
    backend = get_attention_backend("triton", device)
    seconds: dict[bool, float] = {}
    for graphs in (True, False) if eager else (True,):
        runner = ModelRunner(
            model,
            spec,
            num_blocks,
            device,
            backend,
            cuda_graphs=graphs,
            max_num_seqs=batch,
            max_model_len=per_seq * BLOCK_SIZE,
        )
        if graphs and device.type == "cuda" and runner.graphs is None:
            raise RuntimeError("the runner did not capture CUDA graphs")
        seconds[graphs] = cuda_seconds(lambda r=runner: r.execute(step), iters, warmup=3)
        del runner  # before the next runner allocates its own KV cache
        torch.cuda.empty_cache()
    row.step_ms_graphs = seconds[True] * 1e3
    row.step_ms_eager = seconds[False] * 1e3 if False in seconds else None
    row.roofline_ms = nbytes / bandwidth * 1e3
    row.roofline_fraction = roofline_fraction(nbytes, bandwidth, seconds[True])
    row.tokens_per_s = batch / seconds[True]
    return row


@dataclass(slots=True)
class PrefillRow:
    tokens: int
    ms: float
    matmul_tflop: float
    attention_tflop: float
    mfu: float
    attention_share: float


def measure_prefill(
    model: torch.nn.Module, c: ModelConfig, tokens: int, matmul_peak: float, iters: int
) -> PrefillRow:
    """One prompt of ``tokens`` tokens prefilled in one eager step (logits of its last)."""
    from pdserve.engine.attention import get_attention_backend
    from pdserve.engine.runner import ModelRunner
    from pdserve.engine.scheduler import ScheduledBatch

    per_seq = kv_cache_blocks(1, tokens)
    device = next(model.parameters()).device
    runner = ModelRunner(
        model,
        _spec(c),
        per_seq,
        device,
        get_attention_backend("triton", device),
        cuda_graphs=False,
    )
    seq = _sequence(0, tokens, range(per_seq))
    step = ScheduledBatch(prefills=[(seq, tokens)])
    seconds = cuda_seconds(lambda: runner.execute(step), iters)
    matmul, attention = prefill_flops(c, tokens)
    return PrefillRow(
        tokens,
        seconds * 1e3,
        matmul / 1e12,
        attention / 1e12,
        (matmul + attention) / seconds / matmul_peak,
        attention / (matmul + attention),
    )


@dataclass(slots=True)
class PeerRow:
    batch: int
    context: int
    new_tokens: int
    decode_tokens_per_s: float | None = None
    skipped: str | None = None


def hf_model(c: ModelConfig) -> torch.nn.Module:
    """transformers ``LlamaForCausalLM`` of ``c``'s shape, random bf16 on the current GPU
    (default rope: the rope variant does not change the cost)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build the weights in bf16 directly
    try:
        with torch.device("cuda"):
            return LlamaForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(default)


def hf_decode_rate(
    model: Any, vocab_size: int, batch: int, context: int, new_tokens: int, cache: str
) -> float:
    """Decode tokens/s of ``model.generate`` on ``batch`` random ``context``-token prompts:
    batch x new_tokens / (time of 1 + new_tokens tokens - time of 1 token)."""
    ids = torch.randint(3, vocab_size, (batch, context), device="cuda")
    mask = torch.ones_like(ids)
    kwargs: dict[str, Any] = {"cache_implementation": "static"} if cache == "static" else {}

    def generate(n: int) -> None:
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                **kwargs,
            )

    first = cuda_seconds(lambda: generate(1), 2, warmup=1)
    full = cuda_seconds(lambda: generate(1 + new_tokens), 2, warmup=1)
    return batch * new_tokens / (full - first)


def measure_hf(
    c: ModelConfig,
    batches: Sequence[int],
    context: int,
    new_tokens: int,
    cache: str,
    progress: Progress,
) -> list[PeerRow]:
    """transformers ``generate`` decode rate per batch size (see the module docstring)."""
    model = hf_model(c)
    rows = []
    for batch in batches:
        progress(f"transformers generate, batch {batch}, {context}-token prompts")
        row = PeerRow(batch, context, new_tokens)
        try:
            row.decode_tokens_per_s = hf_decode_rate(
                model, c.vocab_size, batch, context, new_tokens, cache
            )
        except torch.OutOfMemoryError:
            row.skipped = "out of memory"
        torch.cuda.empty_cache()
        rows.append(row)
    return rows


# -- the run ---------------------------------------------------------------------------


def run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    c = LLAMA3_8B
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "model": "Llama-3-8B shape",
        "params": param_counts(c).total,
    }
    progress("copy bandwidth")
    bandwidth = copy_bandwidth()
    progress("bf16 matmul rate")
    peak = matmul_rate()
    out["copy_bandwidth_GBps"] = bandwidth / 1e9
    out["matmul_TFLOPs"] = peak / 1e12
    progress("random bf16 model on the device")
    model = random_model(c)
    decode = []
    for context in args.contexts:
        for batch in args.batches:
            progress(f"decode, batch {batch}, context {context}")
            decode.append(
                measure_decode(model, c, batch, context, bandwidth, args.iters, not args.no_eager)
            )
    out["decode"] = [asdict(r) for r in decode]
    prefill = []
    for tokens in args.prompts:
        progress(f"prefill, {tokens}-token prompt")
        prefill.append(measure_prefill(model, c, tokens, peak, max(3, args.iters // 5)))
    out["prefill"] = [asdict(r) for r in prefill]
    del model
    torch.cuda.empty_cache()
    out["hf"] = []
    out["targets"] = {}
    if not args.no_hf:
        peers = measure_hf(
            c, args.hf_batches, TARGET_CONTEXT, args.hf_new_tokens, args.hf_cache, progress
        )
        out["hf"] = [asdict(r) for r in peers]
        ours = {(r.batch, r.context): r.tokens_per_s for r in decode}
        for peer in peers:
            mine = ours.get((peer.batch, peer.context))
            if mine and peer.decode_tokens_per_s:
                key = f"decode b{peer.batch} ctx{peer.context} pdserve/hf"
                out["targets"][key] = mine / peer.decode_tokens_per_s
    return out


def report(result: dict[str, Any]) -> str:
    """The result as markdown tables."""
    lines = [
        f"# GPU benchmark: {result['device']}, {result['model']} "
        f"({result['params'] / 1e9:.2f}B params, bf16)",
        "",
        f"D2D copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s (read + write); "
        f"bf16 matmul {result['matmul_TFLOPs']:.0f} TFLOP/s",
        "",
        "## Decode (step time; roofline = weights + KV bytes / bandwidth)",
        "",
        markdown_table(
            [
                "batch",
                "context",
                "KV GiB",
                "graphs ms",
                "eager ms",
                "roofline ms",
                "of roofline",
                "tok/s",
                "note",
            ],
            [
                [
                    r["batch"],
                    r["context"],
                    r["kv_gib"],
                    r["step_ms_graphs"],
                    r["step_ms_eager"],
                    r["roofline_ms"],
                    r["roofline_fraction"],
                    r["tokens_per_s"],
                    r["skipped"],
                ]
                for r in result["decode"]
            ],
        ),
        "",
        "## Prefill (one prompt; FLOPs = 2 x layer matmul params x T + LM head row + causal "
        "attention)",
        "",
        markdown_table(
            ["tokens", "ms", "matmul TFLOP", "attention TFLOP", "attention share", "MFU"],
            [
                [
                    r["tokens"],
                    r["ms"],
                    r["matmul_tflop"],
                    r["attention_tflop"],
                    r["attention_share"],
                    r["mfu"],
                ]
                for r in result["prefill"]
            ],
        ),
    ]
    if result["hf"]:
        lines += [
            "",
            "## transformers generate (decode tokens/s, prefill excluded)",
            "",
            markdown_table(
                ["batch", "prompt", "new tokens", "tok/s", "note"],
                [
                    [
                        r["batch"],
                        r["context"],
                        r["new_tokens"],
                        r["decode_tokens_per_s"],
                        r["skipped"],
                    ]
                    for r in result["hf"]
                ],
            ),
        ]
    if result["targets"]:
        lines += ["", "## Ratios", ""]
        lines += [f"- {k}: {v:.2f}" for k, v in result["targets"].items()]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.gpu",
                                description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--prompts", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--hf-batches", type=int, nargs="+", default=[1, 8, TARGET_BATCH])
    p.add_argument("--hf-new-tokens", type=int, default=32)
    p.add_argument("--hf-cache", choices=("dynamic", "static"), default="dynamic")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    p.add_argument("--no-eager", action="store_true", help="time decode with graphs only")
    p.add_argument("--iters", type=int, default=20, help="timed decode steps per point")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "pdserve.bench.gpu needs a CUDA GPU, and torch sees none "
            "(torch.cuda.is_available() is False); nothing was measured.",
            file=sys.stderr,
        )
        return 2
    progress = Progress("gpu")
    result = run(args, progress)
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
