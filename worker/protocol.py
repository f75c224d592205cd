"""What the router and the workers say to each other.

The router asks a decode worker to ``reserve`` blocks for a prompt (``ReserveRequest`` ->
``ReserveResult``), then a prefill worker to compute the prompt and write its KV into them
(``PrefillRequest`` -> ``PrefillResult``). Calls (reserve, prefill, abort, stats) go
through Ray; generated tokens come back over ZMQ: after every decode step the decode worker
pushes ONE message per router holding the new tokens of all that router's requests
(``encode_batch``), so the per-token cost does not grow with the number of streams.

Pure Python (no torch): the router imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from pdserve.engine.sampling import SamplingParams, TokenLogprobs
from pdserve.engine.structured.spec import StructuredSpec
from pdserve.kvtransfer.base import TransferTarget


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """Sampling as plain fields (a ``SamplingParams`` without stop strings: the router
    applies those, since it owns the text)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    """Output tokens still to come before EOS or a stop token id may end the output."""
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    allowed_token_ids: tuple[int, ...] = ()
    n: int = 1
    prompt_logprobs: int | None = None
    prompt_len: int | None = None
    """Where the output begins in the prompt sent (a resumed request's prompt holds the
    output already streamed; penalties count output tokens from here)."""
    structured: StructuredSpec | None = None
    """The output's constraint; both roles apply it (the prefill side's first token obeys
    it, the decode side rebuilds the matcher from the tokens so far)."""


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    reply_to: str  # the router's ZMQ PULL endpoint for this request's tokens
    lease_s: float
    priority: int = 0  # lower runs first (``--scheduling-policy priority``)
    wait_s: float = 0.0
    """How long the decode worker may keep the request when its blocks are held by
    reservations of lower priority whose KV is still in flight (they cannot be preempted
    yet): it answers once their KV landed and it preempted them, instead of refusing."""


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """Blocks reserved on the decode worker. Blocks ``[0, num_cached_tokens //
    block_size)`` already hold the prompt's KV there; the prefill side writes the rest."""

    request_id: str
    target: TransferTarget
    block_ids: list[int]
    num_cached_tokens: int
    block_size: int


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """New tokens of one request after one step; ``finish_reason`` set on its last record;
    ``error`` set (and nothing else) if the request failed on the worker: ``retryable``
    if the worker or its KV transfer failed (the router resumes it elsewhere), not if the
    request failed on its own (the router fails it)."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[Any] | None = None  # [token, logprob, [[token, logprob], ...]] per token
    error: str | None = None
    retryable: bool = True
    index: int = 0
    """The choice these tokens belong to (``n`` > 1)."""


@dataclass(frozen=True, slots=True)
class PullSource:
    """Where a prefill worker may get a prompt's leading blocks instead of computing them
    (the cluster-wide prefix pool): ``holder`` (the Ray actor of worker ``worker_id``, a
    prefill or decode worker) holds blocks ``[0, num_blocks)`` of the prompt in its prefix
    cache, per the router's index. The prefill worker asks it for the ones it lacks
    (``LendRequest``) and computes from there; if they have not all landed after
    ``timeout_s`` (or the holder refuses, fails or dies) it computes them instead."""

    worker_id: str
    holder: Any
    num_blocks: int
    timeout_s: float


@dataclass(frozen=True, slots=True)
class LendRequest:
    """Write the cached blocks ``[first_block, num_blocks)`` of the prompt ``token_ids``
    (its first ``num_blocks`` full blocks) into ``dst_block_ids`` of ``target``, as transfer
    ``pull_id`` (the puller expects exactly those blocks under that id). The holder pins the
    blocks until its connector reports the transfer sent or failed; no write may start
    after ``write_deadline`` (``time.time()``), when the puller stops waiting."""

    pull_id: str
    token_ids: list[int]
    first_block: int
    num_blocks: int
    target: TransferTarget
    dst_block_ids: list[int]
    write_deadline: float


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
    priority: int = 0  # lower runs first (``--scheduling-policy priority``)
    pull: PullSource | None = None
    """Another worker's cached blocks of the prompt to pull instead of computing them."""


@dataclass(frozen=True, slots=True)
class PrefillResult:
    """``ok`` once every block landed and the decode side was notified; otherwise ``error``
    says why (the decode side's reservation must then be aborted)."""

    request_id: str
    ok: bool
    first_token_id: int = -1
    first_logprobs: list[Any] | None = None
    num_cached_tokens: int = 0  # prompt tokens this worker served from its prefix cache
    pulled_tokens: int = 0  # of which pulled from another worker for this request
    prefill_s: float = 0.0  # from arrival on the worker to the first token
    transfer_tail_s: float = 0.0  # from the first token to the last write's completion
    error: str = ""
    retryable: bool = True
    prompt_logprobs: list[Any] | None = None
    """With ``prompt_logprobs`` asked for: ``[token, logprob, top, rank]`` of prompt tokens
    1 .. (``prompt_logprobs_to_wire``)."""


def resolve_host(host: str) -> str:
    """The address to bind side channels to: ``"auto"`` means this node's IP as Ray sees it
    (so that peers on other nodes reach it); anything else is used as given."""
    if host != "auto":
        return host
    import ray

    return ray.util.get_node_ip_address()


def token_channel(endpoint: str) -> str:
    """The ``ChannelKey`` channel of token batches sent to the inbox at ``endpoint``."""
    return f"tokens/{endpoint}"


def encode_batch(records: list[TokenRecord]) -> bytes:
    return msgpack.packb(
        [[r.request_id, r.token_ids, r.finish_reason, r.logprobs, r.error, r.retryable,
          r.index] for r in records]
    )


def decode_batch(raw: bytes) -> list[TokenRecord]:
    """The records of one batch; ``ValueError`` if it is not one (the sender is
    authenticated, so this means a bug, not an attack)."""
    try:
        return [TokenRecord(*fields) for fields in msgpack.unpackb(raw)]
    except (TypeError, ValueError, msgpack.ExtraData) as exc:
        raise ValueError(f"not a token batch: {exc!r}") from None


def sampling_params(spec: SamplingSpec) -> SamplingParams:
    return SamplingParams(
        max_tokens=spec.max_tokens, temperature=spec.temperature, top_p=spec.top_p,
        top_k=spec.top_k, min_p=spec.min_p, seed=spec.seed,
        stop_token_ids=spec.stop_token_ids, ignore_eos=spec.ignore_eos, logprobs=spec.logprobs,
        presence_penalty=spec.presence_penalty, frequency_penalty=spec.frequency_penalty,
        repetition_penalty=spec.repetition_penalty, logit_bias=spec.logit_bias,
        min_tokens=spec.min_tokens, bad_words_ids=spec.bad_words_ids,
        allowed_token_ids=spec.allowed_token_ids, prompt_len=spec.prompt_len, n=spec.n,
        prompt_logprobs=spec.prompt_logprobs, structured=spec.structured,
    )


def logprobs_to_wire(lps: list[TokenLogprobs]) -> list[Any] | None:
    if not lps:
        return None
    return [[lp.token_id, lp.logprob, [list(t) for t in lp.top]] for lp in lps]


def prompt_logprobs_to_wire(lps: list[TokenLogprobs]) -> list[Any]:
    return [[lp.token_id, lp.logprob, [list(t) for t in lp.top], lp.rank] for lp in lps]


def prompt_logprobs_from_wire(raw: list[Any]) -> list[TokenLogprobs]:
    return [TokenLogprobs(int(t), float(p), tuple((int(a), float(b)) for a, b in top),
                          None if rank is None else int(rank)) for t, p, top, rank in raw]


def logprobs_from_wire(raw: list[Any] | None) -> TokenLogprobs | None:
    if not raw:
        return None
    token, logprob, top = raw
    return TokenLogprobs(int(token), float(logprob), tuple((int(t), float(p)) for t, p in top))
