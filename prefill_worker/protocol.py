"""What the router asks a prefill worker, and what it answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from decode_worker.protocol import SamplingSpec
from kvtransfer.base import TransferTarget


@dataclass(frozen=True, slots=True)
class PrefillRequest:
    """Compute ``prompt_token_ids``' KV and first token; write blocks
    ``[skip_blocks, ...)`` of the prompt into ``dst_block_ids[skip_blocks:]`` of ``target``.

    ``write_deadline`` (``time.time()`` seconds): no write may START later, because the
    decode side's reservation lease has run out by then and its blocks may be reused once
    writes already under way can no longer land. A job past it fails instead of writing."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    target: TransferTarget
    dst_block_ids: list[int]
    skip_blocks: int
    write_deadline: float = float("inf")


@dataclass(frozen=True, slots=True)
class PrefillResult:
    """``ok`` once every block landed and the decode side was notified; otherwise ``error``
    says why (the decode side's reservation must then be aborted)."""

    request_id: str
    ok: bool
    first_token_id: int = -1
    first_logprobs: list[Any] | None = None
    num_cached_tokens: int = 0  # prompt tokens this worker served from its prefix cache
    prefill_s: float = 0.0  # from arrival on the worker to the first token
    transfer_tail_s: float = 0.0  # from the first token to the last write's completion
    error: str = ""
    retryable: bool = True
