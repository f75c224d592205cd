"""Sequence: the one owner of a request's state inside an engine.

Token ids (prompt then output), how many of them have KV computed, the block table, the
status, and why it finished. The scheduler moves it between queues; the KV cache manager
owns its blocks; the engine appends sampled tokens. Pure Python, no torch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdserve.engine.sampling import SamplingParams, TokenLogprobs


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re)prefill; holds no blocks
    RUNNING = "running"  # scheduled every step, holds blocks
    AWAITING_KV = "awaiting_kv"  # decode role: blocks reserved, KV being written from outside
    PREFILLED = "prefilled"  # prefill role: first token sampled, blocks held until released
    FINISHED = "finished"

    @property
    def holds_blocks(self) -> bool:
        return self in (SequenceStatus.RUNNING, SequenceStatus.AWAITING_KV,
                        SequenceStatus.PREFILLED)


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's length
    ABORT = "abort"  # aborted by the caller
    PREFILL_DONE = "prefill_done"  # prefill-only request sampled its first token
    ERROR = "error"  # failed on its own (e.g. its sampling); ``RequestOutput.error`` says why


@dataclass(slots=True, eq=False)
class Sequence:
    """A request as the engine tracks it. ``token_ids`` is prompt + output so far."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    arrival_order: int
    prefill_only: bool = False
    token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first admission; -1 = not yet admitted
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    """With ``params.prompt_logprobs``: entry ``i`` is prompt token ``i + 1``'s (the first
    token has none)."""
    num_preemptions: int = 0
    first_token_time: float | None = None
    max_len: int = 0  # prompt + output tokens at most (set by the engine)
    priority: int = 0  # lower runs first under the "priority" scheduling policy
    user_data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def sort_key(self) -> tuple[float, int]:
        """Age order: older requests come first and are preempted last."""
        return (self.arrival_time, self.arrival_order)
