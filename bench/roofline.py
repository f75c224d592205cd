"""A decode step against its roofline on this machine.

The roofline time of a step is ``max(bytes / bandwidth, flops / peak)``: the bytes every
decode step must read (all matmul weights, the LM head's included, and each sequence's
cached keys and values), the FLOPs it must do (2 per weight per token, plus attention's
4 * context * heads * head_dim per token and layer), a streaming-read bandwidth and a
matmul peak both measured in the same run. The fraction reported is roofline / measured:
1.0 would be a step that only streams its bytes (or only multiplies) at the machine's rate.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pdserve.engine import huge_pages

ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def read_buffer(mib: int = 1024) -> torch.Tensor:
    """``read_bandwidth_gbs``' tensor, to measure again without allocating it again."""
    return huge_pages.zeros((mib * 2**20 // 4,), torch.float32, torch.device("cpu")).fill_(1.0)


def read_bandwidth_gbs(mib: int = 1024, min_seconds: float = 1.0,
                       data: torch.Tensor | None = None) -> float:
    """Best GB/s of summing a ``mib``-MiB float32 tensor (a streaming read; ``data``: one
    from ``read_buffer``), with torch's threads as set. The tensor is in huge pages where
    the KV cache is (as the engine's runner allocates it): the best read the machine
    gives."""
    data = read_buffer(mib) if data is None else data
    data.sum()
    best, spent, reps = float("inf"), 0.0, 0
    while spent < min_seconds or reps < 3:
        t0 = time.perf_counter()
        data.sum()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return data.numel() * 4 / best / 1e9


@dataclass(frozen=True, slots=True)
class DecodeCost:
    """What one decode step of ``batch`` sequences at ``context`` tokens must do."""

    batch: int
    context: int
    weight_bytes: int
    kv_bytes: int
    flops: int

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    def roofline_s(self, bandwidth_gbs: float, peak_gflops: float) -> float:
        return max(self.bytes / (bandwidth_gbs * 1e9), self.flops / (peak_gflops * 1e9))


def decode_cost(mc: Any, dtype: str, batch: int, context: int) -> DecodeCost:
    """The cost of one decode step of ``batch`` sequences whose contexts hold ``context``
    tokens (``mc`` is the engine's ``ModelConfig``)."""
    elem = ELEMENT_BYTES[dtype]
    q = mc.num_heads * mc.head_dim
    kv = mc.num_kv_heads * mc.head_dim
    layer = mc.hidden_size * (q + 2 * kv) + q * mc.hidden_size
    layer += 3 * mc.hidden_size * mc.intermediate_size
    params = mc.num_layers * layer + mc.vocab_size * mc.hidden_size  # + the LM head
    kv_bytes = batch * context * mc.num_layers * 2 * kv * elem
    attention = 4 * batch * context * q * mc.num_layers
    return DecodeCost(batch, context, params * elem, kv_bytes, 2 * batch * params + attention)


def measure_decode_step(engine: Any, batch: int, context: int, steps: int = 8,
                        seed: int = 0) -> float:
    """Median seconds of a decode-only step of ``batch`` sequences at about ``context``
    tokens: prompts of ``context - 1`` tokens are prefilled first (not timed), then
    ``steps`` steps are timed after one untimed one, each of the whole batch (the first
    prompts decode while the last are prefilled: their token budget covers those steps
    too). The requests are aborted after."""
    from pdserve.engine import SamplingParams

    rng = random.Random(f"decode-{seed}")
    vocab = engine.model_config.vocab_size
    budget = engine.config.scheduler.max_num_batched_tokens
    prefill_steps = -(-batch * context // budget) + batch  # a chunk boundary per prompt
    params = SamplingParams(max_tokens=steps + 2 + prefill_steps, temperature=0.0,
                            ignore_eos=True)
    ids = [f"roof-{batch}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, [rng.randrange(3, vocab) for _ in range(context - 1)], params)
    try:
        while engine.stats().num_waiting or any(
                s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
            engine.step()
        engine.step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            outputs = engine.step()
            times.append(time.perf_counter() - t0)
            if len(outputs) != batch:
                raise RuntimeError(f"a timed step decoded {len(outputs)} sequences, not {batch}")
    finally:
        for rid in ids:
            engine.abort(rid)
    return statistics.median(times)


def decode_roofline(engine: Any, dtype: str, batches: tuple[int, ...], context: int,
                    bandwidth_gbs: float, peak_gflops: float, steps: int = 8,
                    remeasure: Callable[[], tuple[float, float]] | None = None
                    ) -> list[dict[str, Any]]:
    """For each batch size: the measured step, its roofline, and their ratio.

    ``remeasure`` (read GB/s, matmul GFLOP/s), when given, is called after each batch's
    steps, and every row's roofline takes the best bandwidth and peak of the run: a machine
    whose speed drifts (a shared host) otherwise steps faster than a peak measured in one
    of its slow moments says it can (fractions above 1 were seen so: an fp32 peak of 86
    GFLOP/s measured at the start of one run, 110-158 at the start of the others of the
    same hour)."""
    measured = []
    for batch in batches:
        cost = decode_cost(engine.model_config, dtype, batch, context)
        measured.append((cost, measure_decode_step(engine, batch, context, steps)))
        if remeasure is not None:
            bandwidth, peak = remeasure()
            bandwidth_gbs, peak_gflops = max(bandwidth_gbs, bandwidth), max(peak_gflops, peak)
    rows = []
    for cost, step in measured:
        roof = cost.roofline_s(bandwidth_gbs, peak_gflops)
        rows.append({**asdict(cost), "step_s": step, "roofline_s": roof,
                     "fraction": roof / step, "tokens_per_s": cost.batch / step,
                     "bandwidth_gbs": bandwidth_gbs, "peak_gflops": peak_gflops,
                     "bound": "memory" if cost.bytes / (bandwidth_gbs * 1e9)
                     >= cost.flops / (peak_gflops * 1e9) else "compute"})
    return rows
