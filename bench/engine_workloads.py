"""The engine benchmark's workloads and result records (shared by its systems).

Prompts are random token ids from ``FIRST_REGULAR_TOKEN`` up; every system gets the same
requests and must produce exactly ``max_tokens`` tokens for each.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.bench.common import read_azure

FIRST_REGULAR_TOKEN = 3
"""Prompt token ids start here: 0..2 are the built-in checkpoints' BOS, EOS and PAD."""
PAD_TOKEN = 2

@dataclass(frozen=True, slots=True)
class Request:
    """A prompt and the exact number of output tokens every system must produce."""

    prompt: list[int]
    max_tokens: int




def _scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def _random_tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(FIRST_REGULAR_TOKEN, vocab) for _ in range(n)]


def workload_fixed(
    n: int, prompt_len: int, output_len: int, vocab: int, seed: int
) -> list[Request]:
    """``n`` random prompts of ``prompt_len`` tokens, each asking ``output_len`` tokens."""
    rng = random.Random(f"fixed-{seed}")
    return [Request(_random_tokens(rng, prompt_len, vocab), output_len) for _ in range(n)]


def workload_azure(
    n: int, vocab: int, seed: int, length_divisor: int, max_output: int,
    max_model_len: int, path: str | None = None,
) -> list[Request]:
    """The first ``n`` Azure trace rows as random prompts of ``ContextTokens / divisor``
    tokens (at least 1) asking ``GeneratedTokens`` clamped to ``1..max_output`` tokens."""
    rng = random.Random(f"azure-{seed}")
    out = []
    for row in read_azure(path, limit=n):
        output = min(max(row.generated_tokens, 1), max_output)
        prompt = max(1, row.context_tokens // length_divisor)
        prompt = min(prompt, max_model_len - output - 1)
        out.append(Request(_random_tokens(rng, prompt, vocab), output))
    if len(out) < n:
        raise ValueError(f"the Azure trace has {len(out)} rows, {n} were asked for")
    return out


def workload_shared_prefix(
    n: int, prefix_len: int, suffix_len: int, output_len: int, vocab: int, seed: int
) -> list[Request]:
    """``n`` prompts: one shared ``prefix_len`` system prompt, then a unique suffix each."""
    rng = random.Random(f"prefix-{seed}")
    prefix = _random_tokens(rng, prefix_len, vocab)
    return [
        Request(prefix + _random_tokens(rng, suffix_len, vocab), output_len) for _ in range(n)
    ]


def min_prefill_tokens(prompts: Sequence[Sequence[int]]) -> int:
    """Fewest prompt tokens any cache can compute when prompts arrive in this order: each
    prompt's tokens past its longest common prefix with an earlier prompt; the last token
    is always computed (its logits give the first output token)."""
    total = 0
    for i, p in enumerate(prompts):
        shared = 0
        for q in prompts[:i]:
            k = 0
            for x, y in zip(p, q, strict=False):
                if x != y:
                    break
                k += 1
            shared = max(shared, k)
        total += len(p) - min(shared, len(p) - 1)
    return total


def output_tokens(requests: Sequence[Request]) -> int:
    return sum(r.max_tokens for r in requests)


# ---------------------------------------------------------------------------- results


@dataclass(slots=True)
class ThroughputResult:
    """One system on one throughput workload. ``generated`` counts every token produced
    (static batches produce more than requested); throughput counts requested ones."""

    system: str
    requests: int
    output_tokens: int
    generated: int
    wall_s: float
    tokens_per_s: float
    error: str | None = None


@dataclass(slots=True)
class TTFTResult:
    """Workload (c) on one engine: times to first token and prefill work."""

    prefix_caching: bool
    requests: int
    ttft_mean_s: float
    ttft_median_s: float
    ttft_p90_s: float
    prefill_tokens_computed: int
    prefix_hit_tokens: int
    wall_s: float


