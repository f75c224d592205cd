"""Logits processing before sampling: allowed tokens, bad words, min_tokens, logit_bias and
the presence / frequency / repetition penalties, as vLLM defines them (the order and the
semantics are stated on ``SamplingParams``).

``process_logits`` returns new logits for the rows whose parameters ask for processing and
leaves the others untouched; it never changes its input (the raw logits still give the
logprobs). Work is per processed row: a batch of plain requests costs nothing here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdserve.engine.sampling import SamplingParams


class TokenContext:
    """What a row's processing reads: the sequence's token ids so far (prompt then output)
    and where the output begins."""

    __slots__ = ("prompt_len", "token_ids")

    def __init__(self, token_ids: Sequence[int], prompt_len: int) -> None:
        self.token_ids = token_ids
        self.prompt_len = prompt_len


def _ids(ids: Sequence[int] | set[int], vocab: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([t for t in ids if 0 <= t < vocab], dtype=torch.long, device=device)


def process_row(row: torch.Tensor, p: SamplingParams, ctx: TokenContext,
                eos_ids: Sequence[int]) -> None:
    """Apply ``p``'s processing to one row of logits, in place."""
    vocab = row.shape[0]
    device = row.device
    tokens = ctx.token_ids
    output = tokens[ctx.prompt_len:]
    neg_inf = float("-inf")
    if p.allowed_token_ids:
        keep = torch.zeros(vocab, dtype=torch.bool, device=device)
        keep[_ids(p.allowed_token_ids, vocab, device)] = True
        row.masked_fill_(~keep, neg_inf)
    if p.bad_words_ids:
        banned = set()
        for word in p.bad_words_ids:
            prefix = word[:-1]
            if not prefix or (len(tokens) >= len(prefix)
                              and tuple(tokens[len(tokens) - len(prefix):]) == prefix):
                banned.add(word[-1])
        if banned:
            row[_ids(banned, vocab, device)] = neg_inf
    if p.min_tokens and len(output) < p.min_tokens:
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids))
        if stops:
            row[_ids(stops, vocab, device)] = neg_inf
    if p.logit_bias:
        pairs = [(t, b) for t, b in p.logit_bias if 0 <= t < vocab]
        if pairs:
            index = torch.tensor([t for t, _ in pairs], dtype=torch.long, device=device)
            bias = torch.tensor([b for _, b in pairs], dtype=row.dtype, device=device)
            row.index_add_(0, index, bias)
    if p.repetition_penalty != 1.0 and tokens:
        seen = torch.unique(torch.tensor(list(tokens), dtype=torch.long, device=device))
        seen = seen[seen < vocab]
        values = row[seen]
        row[seen] = torch.where(values > 0, values / p.repetition_penalty,
                                values * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and output:
        out = torch.tensor(list(output), dtype=torch.long, device=device)
        counts = torch.bincount(out[out < vocab], minlength=vocab).to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def process_logits(logits: torch.Tensor, params: Sequence[SamplingParams],
                   contexts: Sequence[TokenContext | None],
                   eos_ids: Sequence[int]) -> torch.Tensor:
    """``logits`` with each row processed by its parameters (the input itself when no row
    asks for processing; otherwise a copy)."""
    rows = [i for i, p in enumerate(params) if p.processes_logits]
    if not rows:
        return logits
    out = logits.clone()
    for i in rows:
        ctx = contexts[i]
        if ctx is None:
            raise ValueError("logits processing needs the sequence's tokens")
        process_row(out[i], params[i], ctx, eos_ids)
    return out
