"""The batched sampler: one token per row of logits.

Greedy rows take the argmax. Other rows apply temperature, then top-k, top-p and min-p
filters, and draw with the exponential-race trick (argmax of p / Exp(1) noise), which
equals sampling from p. A request with a ``seed`` draws its noise from its own generator,
so its tokens do not depend on what else shares the batch: its ``k``-th output token takes
the generator's ``k``-th draw, wherever that token is sampled (a prefill worker's first
token, a decode worker's next ones, a resumed request's continuation). Rows whose
parameters ask for logits processing (penalties, logit_bias, min_tokens, bad words, allowed
tokens) are processed first (``pdserve.engine.logits_processing``). Logprobs are those of
the model's raw distribution (before processing, temperature and filters).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from pdserve.engine.logits_processing import TokenContext, process_logits
from pdserve.engine.sampling import SamplingParams, TokenLogprobs

if TYPE_CHECKING:
    from pdserve.engine.sequence import Sequence


@functools.cache
def _cpu_argmax() -> bool:
    from pdserve.engine import cpu_kernels

    return cpu_kernels.available()


CPU_ARGMAX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` of a 2-D tensor: the index of each row's first maximum (NaN
    counting as the maximum). On the CPU the C++ kernel (``argmax_rows``) reads the rows at
    memory speed; without it ``max(dim=-1)`` gives the same indices several times faster
    than ``argmax``. Measured on two cores for 64 x 49,152 float32 logits (a batch-64
    decode step of SmolLM2): argmax 2.4-2.7 ms, max(dim=-1) the same on an AMD EPYC (0.18 ms
    for 16 rows on a Xeon, against argmax's 0.6-4 ms), the kernel 0.15-0.16 ms."""
    if x.device.type == "cpu":
        if (x.dim() == 2 and x.shape[1] and x.stride(-1) == 1 and x.dtype in CPU_ARGMAX_DTYPES
                and _cpu_argmax()):
            return torch.ops.pdserve_cpu.argmax_rows(x)
        return x.max(dim=-1).indices
    return x.argmax(dim=-1)


def compares_only(seqs: Iterable[Sequence]) -> bool:
    """Whether sampling every one of ``seqs`` only compares its logits: greedy, without
    logprobs, logits processing or a structured-output mask. Logits in the model's dtype
    then pick the same tokens as their float32 conversion (exact, so order-preserving), and
    the step skips that conversion: 1.8-2.5 ms for the 64 x 49,152 logits of a batch-64
    SmolLM2 step on two cores."""
    return all(s.params.greedy and s.params.logprobs is None and not s.params.processes_logits
               and s.params.structured is None for s in seqs)


def _advance(gen: torch.Generator, draws: int, vocab_size: int) -> None:
    """Move ``gen`` past ``draws`` samplings of ``vocab_size`` noise values, one call per
    token (a draw's size sets how far it moves the generator)."""
    if draws:
        noise = torch.empty(vocab_size, device=gen.device)
        for _ in range(draws):
            noise.exponential_(generator=gen)


class Sampler:
    """Picks one token per row of float32 logits (or logits in the model's dtype for rows
    that only compare them: ``compares_only``). Holds the per-request generators;
    ``forget(request_id)`` drops one when its request ends. Not thread-safe.

    ``resume`` says that a request's first draws were made elsewhere (its output so far,
    sampled before a failover): its generator starts past them, so that the rest of its
    output equals that of a run without the failover.

    ``check`` finds the rows a batch cannot sample (their parameters are out of what torch
    can run, e.g. a seed wider than 64 bits when validation was bypassed) BEFORE anything is
    drawn, so the engine can fail those requests alone and sample the rest unchanged."""

    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}
        self._drawn: dict[str, tuple[int, int]] = {}  # request id -> (draws, vocab size)

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self._drawn.pop(request_id, None)

    def resume(self, request_id: str, draws: int, vocab_size: int) -> None:
        """``request_id``'s next ``draws`` tokens were sampled elsewhere (a resumed request's
        output so far, which ends its prompt; the prefill side's first token): its generator
        is advanced past as many draws of ``vocab_size`` noise values as sampling them took
        (one per token), when it is made or at once if it exists. Only seeded requests have
        a generator; ``forget`` drops what is pending."""
        if draws <= 0:
            return
        gen = self._generators.get(request_id)
        if gen is not None:
            _advance(gen, draws, vocab_size)
            return
        pending, _ = self._drawn.get(request_id, (0, 0))
        self._drawn[request_id] = (pending + draws, vocab_size)

    def _generator(self, request_id: str, seed: int, device: torch.device) -> torch.Generator:
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
            draws, vocab_size = self._drawn.pop(request_id, (0, 0))
            _advance(gen, draws, vocab_size)
            self._generators[request_id] = gen
        return gen

    def check(self, request_ids: list[str], params: list[SamplingParams],
              device: torch.device) -> dict[int, str]:
        """Row index -> why that row cannot be sampled. Creates the seeded rows'
        generators (where an out-of-range seed fails); draws nothing."""
        bad: dict[int, str] = {}
        for i, (rid, p) in enumerate(zip(request_ids, params, strict=True)):
            try:
                if p.greedy:
                    continue
                if not 0 < p.temperature < float("inf"):
                    raise ValueError(f"temperature {p.temperature!r} cannot be sampled")
                if p.seed is not None:
                    self._generator(rid, p.seed, device)
            except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
                bad[i] = f"{type(exc).__name__}: {exc}"
        return bad

    def sample(
        self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams],
        contexts: list[TokenContext | None] | None = None, eos_ids: tuple[int, ...] = (),
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Return the chosen token per row and, where asked for, its logprobs.
        ``contexts``: each row's tokens so far, needed by rows that process logits."""
        n = logits.shape[0]
        chosen_from = process_logits(logits, params, contexts or [None] * n, eos_ids)
        if all(p.greedy for p in params):
            tokens = argmax(chosen_from)
        else:
            tokens = self._sample_random(chosen_from, request_ids, params)
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
                [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=device
            )
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
            if p.seed is not None and not p.greedy:
                noise[i].exponential_(generator=self._generator(rid, p.seed, device))
        tokens = argmax(probs / noise)
        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        if greedy_rows:
            rows = torch.tensor(greedy_rows, device=device)
            tokens[rows] = argmax(logits[rows])
        return tokens
