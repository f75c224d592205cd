"""transformers as systems of the engine benchmark: static batches and continuous batching.

- ``hf-static``: ``generate`` on static batches in arrival order, left-padded; a batch runs
  to its longest requested output;
- ``hf-cb``: the continuous batching manager behind ``generate_batch``, fed every request
  with its own ``max_new_tokens``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from pdserve.bench.engine_workloads import (
    FIRST_REGULAR_TOKEN,
    PAD_TOKEN,
    Request,
    ThroughputResult,
    output_tokens,
)


class BatchLimits(Protocol):
    """The batching limits pdserve runs with (``BenchOptions`` has them)."""

    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int


def load_hf(model_path: str | Path, dtype: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    return model.eval()


def _hf_generation_config(model: Any, max_new_tokens: int) -> Any:
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    return GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
        eos_token_id=eos, pad_token_id=PAD_TOKEN,
    )


@torch.inference_mode()
def run_hf_static(model: Any, requests: Sequence[Request], batch: int) -> ThroughputResult:
    """``generate`` on batches of ``batch`` in arrival order, left-padded, each batch run to
    its longest requested output (``min_new_tokens`` keeps EOS from ending it early)."""
    generated = 0
    start = time.perf_counter()
    for lo in range(0, len(requests), batch):
        chunk = requests[lo : lo + batch]
        width = max(len(r.prompt) for r in chunk)
        ids = torch.full((len(chunk), width), PAD_TOKEN, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, r in enumerate(chunk):
            ids[row, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[row, width - len(r.prompt) :] = 1
        new = max(r.max_tokens for r in chunk)
        out = model.generate(input_ids=ids, attention_mask=mask,
                             generation_config=_hf_generation_config(model, new))
        if out.shape[1] != width + new:
            raise RuntimeError(f"hf-static batch at {lo}: {out.shape[1] - width} new tokens, "
                               f"{new} asked")
        generated += len(chunk) * new
    wall = time.perf_counter() - start
    n = output_tokens(requests)
    return ThroughputResult("hf-static", len(requests), n, generated, wall, n / wall)


def _cb_config(opts: BatchLimits, requests: Sequence[Request]) -> Any:
    """Sized like pdserve: the same token budget a step and batch size, and a cache that
    holds every request at once (no preemption)."""
    from transformers import ContinuousBatchingConfig

    page = opts.block_size * 16
    pages = sum(math.ceil((len(r.prompt) + r.max_tokens) / page) for r in requests)
    return ContinuousBatchingConfig(
        page_size=page,
        num_blocks=pages + 8,
        max_batch_tokens=opts.max_num_batched_tokens,
        max_requests_per_batch=opts.max_num_seqs,
    )


def warm_hf_cb(model: Any, opts: BatchLimits) -> None:
    """One tiny ``generate_batch`` call: proves the API runs here and warms it up."""
    reqs = [Request(list(range(FIRST_REGULAR_TOKEN, FIRST_REGULAR_TOKEN + 8)), 2)]
    out = model.generate_batch(
        [r.prompt for r in reqs], generation_config=_hf_generation_config(model, 2),
        continuous_batching_config=_cb_config(opts, reqs), max_new_tokens=2,
    )
    errors = [o.error for o in out.values() if o.error is not None]
    if len(out) != 1 or errors:
        raise RuntimeError(f"generate_batch warm-up failed: {errors or out}")


def run_hf_cb(model: Any, requests: Sequence[Request], opts: BatchLimits) -> ThroughputResult:
    """The continuous batching manager of ``generate_batch``, each request with its own
    ``max_new_tokens`` and no EOS (-1); timed from the first add to the last result.
    (Not under ``inference_mode``: the manager's thread updates the cache in place.)"""
    from transformers.generation.continuous_batching.utils import WorkloadHints

    hints = WorkloadHints(
        max_prompt_length=max(len(r.prompt) for r in requests),
        max_generated_length=max(r.max_tokens for r in requests),
        num_requests=len(requests),
    )
    got: dict[str, int] = {}
    with model.continuous_batching_context_manager(
        generation_config=_hf_generation_config(model, max(r.max_tokens for r in requests)),
        continuous_batching_config=_cb_config(opts, requests),
        workload_hints=hints, block=True, timeout=30,
    ) as manager:
        start = time.perf_counter()
        for i, r in enumerate(requests):
            manager.add_request(r.prompt, request_id=f"h{i}", max_new_tokens=r.max_tokens,
                                eos_token_id=-1)
        while len(got) < len(requests):
            res = manager.get_result(timeout=1.0)
            if res is None:
                if not manager.is_running():
                    raise RuntimeError("continuous batching thread stopped; "
                                       f"{len(got)}/{len(requests)} requests done")
                continue
            if res.error is not None:
                raise RuntimeError(f"hf-cb request {res.request_id}: {res.error}")
            if res.is_finished():
                got[res.request_id] = len(res.generated_tokens)
        wall = time.perf_counter() - start
    for i, r in enumerate(requests):
        if got.get(f"h{i}") != r.max_tokens:
            raise RuntimeError(f"hf-cb request {i}: {got.get(f'h{i}')} tokens, "
                               f"{r.max_tokens} asked")
    n = output_tokens(requests)
    return ThroughputResult("hf-cb", len(requests), n, sum(got.values()), wall, n / wall)


