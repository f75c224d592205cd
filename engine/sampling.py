"""Sampling parameters (validated, immutable) and the batched sampler.

Greedy rows take the argmax. Other rows apply temperature, then top-k, top-p and min-p
filters, and draw with the exponential-race trick (argmax of p / Exp(1) noise), which
equals sampling from p. A request with a ``seed`` draws its noise from its own generator,
so its tokens do not depend on what else shares the batch. Logprobs are those of the
model's raw distribution (before temperature and filters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

MAX_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop. Invalid values raise ``ValueError``.

    max_tokens: output tokens at most; None = up to the model's length.
    temperature: 0 = greedy. top_k: 0 or -1 = off. top_p: 1 = off. min_p: 0 = off.
    seed: per-request reproducible sampling. stop: strings that end the output (excluded
    from the text). stop_token_ids: token ids that end it (kept in ``token_ids``).
    ignore_eos: keep going past the end-of-sequence token. logprobs: if set, return the
    sampled token's logprob and the ``logprobs`` most likely alternatives per step.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k}")
        if not (0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if any((not isinstance(t, int)) or t < 0 for t in self.stop_token_ids):
            raise ValueError(
                f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}"
            )
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Logprob of the sampled token and the top alternatives, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


class Sampler:
    """Picks one token per row of float32 logits. Holds the per-request generators;
    ``forget(request_id)`` drops one when its request ends. Not thread-safe."""

    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, seed: int, device: torch.device) -> torch.Generator:
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
            self._generators[request_id] = gen
        return gen

    def skip_draw(
        self, request_id: str, params: SamplingParams, device: torch.device, vocab_size: int
    ) -> None:
        """Advance a seeded request's generator past one draw: the token that another
        engine sampled for it (the prefill side's first token), so its later tokens equal
        those of a single engine."""
        if params.seed is None or params.greedy:
            return
        gen = self._generator(request_id, params.seed, device)
        torch.empty(vocab_size, device=device).exponential_(generator=gen)

    def sample(
        self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Return the chosen token per row and, where asked for, its logprobs."""
        n = logits.shape[0]
        if all(p.greedy for p in params):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample_random(logits, request_ids, params)
        token_list = tokens.tolist()
        logprob_out: list[TokenLogprobs | None] = [None] * n
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if wanted:
            rows = torch.tensor(wanted, device=logits.device)
            logp = torch.log_softmax(logits[rows], dim=-1)
            k = max(params[i].logprobs or 0 for i in wanted)
            top_v, top_i = logp.topk(k, dim=-1) if k else (None, None)
            chosen = logp.gather(1, tokens[rows].unsqueeze(1)).squeeze(1).tolist()
            for j, i in enumerate(wanted):
                ki = params[i].logprobs or 0
                top = ()
                if ki and top_v is not None and top_i is not None:
                    top = tuple(zip(top_i[j, :ki].tolist(), top_v[j, :ki].tolist(), strict=True))
                logprob_out[i] = TokenLogprobs(token_list[i], chosen[j], top)
        return token_list, logprob_out

    def _sample_random(
        self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]
    ) -> torch.Tensor:
        device = logits.device
        temps = torch.tensor(
            [p.temperature if not p.greedy else 1.0 for p in params], device=device
        )
        scaled = logits / temps.unsqueeze(1)
        if any(p.top_k > 0 for p in params):
            vocab = logits.shape[1]
            ks = torch.tensor(
                [p.top_k if p.top_k > 0 else vocab for p in params], device=device
            ).clamp(max=vocab)
            sorted_desc = scaled.sort(dim=-1, descending=True).values
            kth = sorted_desc.gather(1, (ks - 1).unsqueeze(1))
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if any(p.top_p < 1.0 for p in params):
            top_ps = torch.tensor([p.top_p for p in params], device=device)
            sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always the first token).
            cum_before = sorted_p.cumsum(dim=-1) - sorted_p
            drop_sorted = cum_before >= top_ps.unsqueeze(1)
            drop = torch.zeros_like(drop_sorted).scatter(1, sorted_i, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        if any(p.min_p > 0 for p in params):
            min_ps = torch.tensor([p.min_p for p in params], device=device)
            threshold = probs.max(dim=-1, keepdim=True).values * min_ps.unsqueeze(1)
            probs = probs.masked_fill(probs < threshold, 0.0)
        noise = torch.empty_like(probs).exponential_()
        for i, (rid, p) in enumerate(zip(request_ids, params, strict=True)):
            if p.seed is not None:
                noise[i].exponential_(generator=self._generator(rid, p.seed, device))
        tokens = (probs / noise).argmax(dim=-1)
        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        if greedy_rows:
            rows = torch.tensor(greedy_rows, device=device)
            tokens[rows] = logits[rows].argmax(dim=-1)
        return tokens
