"""What the router streams of a request: the decode worker's token records become
``Delta``s (text through the stop checker, logprobs off the wire), and what the workers are
told to sample with. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pdserve.engine.outputs import StopChecker
from pdserve.engine.sampling import SamplingParams, TokenLogprobs
from pdserve.engine.sequence import Sequence
from pdserve.worker.protocol import (
    PrefillResult,
    SamplingSpec,
    TokenRecord,
    logprobs_from_wire,
)


@dataclass(slots=True)
class Delta:
    """What one step added to a request's output (the last one has ``finish_reason``)."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    timing: dict[str, float] = field(default_factory=dict)
    prefill_worker: str = ""
    """The last delta's: the worker whose prefill the request's output came from."""
    decode_worker: str = ""
    index: int = 0
    """The choice this delta belongs to (``n`` > 1: 0 .. n - 1)."""
    prompt_logprobs: list[TokenLogprobs] | None = None
    """On the request's first delta, with ``prompt_logprobs`` asked for: prompt token
    ``i + 1``'s logprobs at ``i``."""


def first_record(attempt_id: str, result: PrefillResult,
                 params: SamplingParams) -> TokenRecord | None:
    """The first token as the prefill worker sampled it, for the client at once: the
    prefill result comes back when every block landed, before the decode worker's step
    in progress ends and it commits the KV and pushes the same token (which ``generate``
    then skips). Only for a single choice (with ``n`` > 1 the decode worker forks the
    others' first tokens). If the decode side fails later, the token is part of what
    was sent, so the retry resumes after it as after any other."""
    if params.n != 1 or result.first_token_id < 0:
        return None
    lps = [result.first_logprobs] if result.first_logprobs is not None else None
    return TokenRecord(attempt_id, [result.first_token_id], logprobs=lps)


def without_first(record: TokenRecord) -> TokenRecord:
    """``record`` less its first token (and that token's logprobs)."""
    lps = record.logprobs[1:] if record.logprobs else record.logprobs
    return replace(record, token_ids=record.token_ids[1:], logprobs=lps)


def apply_record(seq: Sequence, stop: StopChecker, record: TokenRecord) -> Delta:
    """Append ``record``'s tokens to ``seq`` through its stop checker (up to a stop) and say
    what they added."""
    tokens: list[int] = []
    logprobs: list[TokenLogprobs] = []
    finished = False
    for i, token in enumerate(record.token_ids):
        seq.token_ids.append(token)
        tokens.append(token)
        if record.logprobs:
            lp = logprobs_from_wire(record.logprobs[i])
            if lp is not None:
                logprobs.append(lp)
        if stop.append(token):
            finished = True
            break
    reason = None
    if finished:
        assert seq.finish_reason is not None
        reason = seq.finish_reason.value
    elif record.finish_reason is not None:
        reason = record.finish_reason  # the worker stopped for a reason we did not see
    return Delta(tokens, stop.take_delta(reason is not None), logprobs, reason,
                 seq.stop_reason)


def sampling_spec(seq: Sequence, params: SamplingParams) -> SamplingSpec:
    """What the workers sample ``seq`` with, its output so far carried in its prompt."""
    structured = params.structured
    if structured is not None and seq.num_output_tokens:
        # Resumed: the output so far travels in the prompt; the matcher replays it.
        structured = replace(structured, num_output_in_prompt=seq.num_output_tokens)
    return SamplingSpec(
        max_tokens=seq.max_len - seq.num_tokens, temperature=params.temperature,
        top_p=params.top_p, top_k=params.top_k, min_p=params.min_p, seed=params.seed,
        stop_token_ids=params.stop_token_ids, ignore_eos=params.ignore_eos,
        logprobs=params.logprobs, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty, logit_bias=params.logit_bias,
        min_tokens=params.min_tokens, bad_words_ids=params.bad_words_ids,
        allowed_token_ids=params.allowed_token_ids,
        # A resumed request's prompt holds the output already sent: the penalties and
        # min_tokens count the output from the original prompt's end.
        prompt_len=seq.num_prompt_tokens if seq.num_output_tokens else None,
        # Resumed, the client has the prompt's logprobs (from the first prefill), and
        # asking for them again would turn off the prefix cache for the whole prompt.
        n=params.n, structured=structured,
        prompt_logprobs=None if seq.num_output_tokens else params.prompt_logprobs,
    )
