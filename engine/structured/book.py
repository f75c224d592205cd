"""One engine's structured-output state: which requests wait for their grammar, the grammar
matcher of each constrained request, and the per-step batched token mask.

The engine calls, all from its own thread:
- ``submit(seq)`` when a constrained request arrives (compilation starts on the compiler's
  pool; the request must not be scheduled until ``ready``);
- ``start(seq)`` once ready: builds the matcher and feeds it the output the request already
  has (resumed output in the prompt, a first token sampled by another engine); ``ValueError``
  if the grammar failed to compile or that output does not fit it;
- ``apply(seqs, logits)`` before sampling: ONE bitmask for the step's constrained rows,
  applied in place (one ``apply_token_bitmask_inplace`` call);
- ``accept(seq, token)`` after sampling: advances the matcher; ``Verdict.TERMINATED`` when
  the grammar is complete (the request must finish), ``ValueError`` if the token was not
  allowed (a bug or a stop token the grammar does not know);
- ``forget(request_id)`` when the request ends.
Not thread-safe (the compiler is): one engine thread owns it.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING, Any

from pdserve.engine.structured.grammar import GrammarCompiler

if TYPE_CHECKING:
    import torch

    from pdserve.engine.sequence import Sequence

logger = logging.getLogger(__name__)


class Verdict(enum.Enum):
    GOING = "going"
    TERMINATED = "terminated"


class GrammarBook:
    """Matchers of one engine's constrained requests."""

    def __init__(self, tokenizer_info: Callable[[], Any], vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.compiler = GrammarCompiler(tokenizer_info)
        self._futures: dict[str, Future[Any]] = {}
        self._matchers: dict[str, Any] = {}
        self._bitmask: Any = None
        self.masked_rows = 0  # rows masked, ever (for tests and stats)
        self.busy_s = 0.0  # time spent filling/applying masks and advancing matchers, ever

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._futures or request_id in self._matchers

    def submit(self, seq: Sequence) -> None:
        spec = seq.params.structured
        assert spec is not None
        self._futures[seq.request_id] = self.compiler.submit(spec)

    def ready(self, request_id: str) -> bool:
        fut = self._futures.get(request_id)
        return fut is None or fut.done()

    def wait(self, request_id: str, timeout: float | None = None) -> None:
        """Until ``request_id``'s grammar is compiled (or failed), at most ``timeout``."""
        fut = self._futures.get(request_id)
        if fut is not None:
            wait([fut], timeout)

    def start(self, seq: Sequence) -> Verdict:
        """Build ``seq``'s matcher and feed it the output ``seq`` already has."""
        import xgrammar as xgr

        rid = seq.request_id
        fut = self._futures.pop(rid)
        compiled = fut.result()  # ValueError from the compiler propagates
        matcher = xgr.GrammarMatcher(compiled)
        self._matchers[rid] = matcher
        spec = seq.params.structured
        assert spec is not None
        start = seq.num_prompt_tokens - spec.num_output_in_prompt
        verdict = Verdict.GOING
        for token in seq.token_ids[start:]:
            verdict = self.accept(seq, token)
        return verdict

    def accept(self, seq: Sequence, token: int) -> Verdict:
        matcher = self._matchers.get(seq.request_id)
        if matcher is None:
            return Verdict.GOING
        if matcher.is_terminated():
            return Verdict.TERMINATED
        start = time.perf_counter()
        ok = matcher.accept_token(int(token))
        self.busy_s += time.perf_counter() - start
        if not ok:
            raise ValueError(f"token {token} does not fit the request's structured output "
                             "constraint")
        return Verdict.TERMINATED if matcher.is_terminated() else Verdict.GOING

    def apply(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Mask, in place, the rows of ``logits`` whose sequence is constrained."""
        rows = [i for i, s in enumerate(seqs) if s.request_id in self._matchers]
        if not rows:
            return
        import torch
        import xgrammar as xgr

        start = time.perf_counter()
        n = logits.shape[0]
        if self._bitmask is None or self._bitmask.shape[0] < n:
            self._bitmask = xgr.allocate_token_bitmask(max(n, 8), self.vocab_size)
        bitmask = self._bitmask[:n]
        for i in rows:
            self._matchers[seqs[i].request_id].fill_next_token_bitmask(bitmask, i)
        target = bitmask if logits.device.type == "cpu" else bitmask.to(logits.device,
                                                                        non_blocking=True)
        width = logits.shape[1]
        if width > self.vocab_size:  # padded vocabulary: ids past it are never allowed
            logits[:, self.vocab_size:].index_fill_(
                0, torch.tensor(rows, device=logits.device), float("-inf"))
            xgr.apply_token_bitmask_inplace(logits[:, : self.vocab_size], target,
                                            indices=rows)
        else:
            xgr.apply_token_bitmask_inplace(logits, target, vocab_size=width, indices=rows)
        self.masked_rows += len(rows)
        self.busy_s += time.perf_counter() - start

    def forget(self, request_id: str) -> None:
        self._futures.pop(request_id, None)
        self._matchers.pop(request_id, None)

    def close(self) -> None:
        self.compiler.close()
