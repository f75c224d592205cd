"""The engine's hooks for disaggregated serving: KV written into this engine's cache from
outside (a decode worker's reservations, the prefix pool's pulls), and the ``n`` > 1 fork of
a request admitted that way.

``HandoffMixin`` is part of ``Engine`` (``pdserve.engine.engine``) and uses its state: the
KV cache manager, the scheduler, the sampler, the requests. Same contract as the engine:
one thread owns it.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling import SamplingParams, TokenLogprobs
from pdserve.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from pdserve.engine.engine import Engine


@dataclass(frozen=True, slots=True)
class Reservation:
    """Blocks reserved for a prompt whose KV arrives from outside. The first
    ``num_cached_tokens`` tokens' KV is already in this engine's cache: only blocks from
    index ``num_cached_tokens // block_size`` on need writing."""

    request_id: str
    block_ids: list[int]
    num_cached_tokens: int


class HandoffMixin:
    """``Engine``'s methods for KV that other workers write (see the module docstring)."""

    def reserve(
        self: Engine, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams,
        priority: int = 0,
    ) -> Reservation | None:
        """Decode role: reserve blocks for a prompt whose KV will be written from outside,
        reusing this engine's own cached prefix blocks. None if the blocks are not free now
        (the caller queues or refuses); ValueError for bad input. Under the "priority"
        policy, running requests of strictly lower priority are preempted (worst first;
        they recompute here later) when that makes the blocks free."""
        seq = self._new_sequence(request_id, prompt_token_ids, params, False, None, priority)
        n = seq.num_tokens
        prefix = self.kv.match_prefix(seq)
        short = self.kv.shortfall(seq, n - prefix.num_tokens, prefix)
        if short and self.scheduler.reclaimable(seq, self.kv.num_exclusive) < short:
            self._drop_new(request_id)  # preempting would not make room: preempt none
            return None

        def fits() -> bool:
            nonlocal prefix
            prefix = self.kv.match_prefix(seq)  # a victim's freed blocks may be cached
            return self.kv.allocate(seq, n - prefix.num_tokens, prefix)

        fitted, preempted = self.scheduler.make_room(seq, fits)
        self.num_preemptions += len(preempted)
        if not fitted:
            self._drop_new(request_id)
            return None
        if self.pool.num_free_blocks < params.n - 1:  # one block per forked choice
            self.kv.free(seq)
            self._drop_new(request_id)
            return None
        if params.structured is not None:
            self.grammars.submit(seq)  # compiles while the KV is being written
        seq.status = SequenceStatus.AWAITING_KV
        seq.num_computed_tokens = prefix.num_tokens
        seq.num_cached_tokens = prefix.num_tokens
        self.kv.record_lookup(n, prefix.num_tokens)
        return Reservation(request_id, list(seq.block_ids), prefix.num_tokens)

    def blocks_in_flight(self: Engine, priority: int) -> int:
        """Decode role: blocks held by reservations awaiting their KV whose priority is
        strictly lower than ``priority`` (higher values) under the "priority" policy: once
        their KV lands, a reservation of ``priority`` may preempt them. 0 under FCFS."""
        if not self.scheduler.by_priority:
            return 0
        return sum(self.kv.num_exclusive(r.seq) for r in self._requests.values()
                   if r.seq.status is SequenceStatus.AWAITING_KV and r.seq.priority > priority)

    def reserve_prefix(self: Engine, pull_id: str, token_ids: Seq[int]) -> Reservation | None:
        """Prefill role, prefix pool: reserve blocks for the leading full blocks
        ``token_ids`` of a prompt whose KV a peer worker will write here, reusing this
        engine's own cached prefix (those blocks are not written). None if the blocks are not
        free now (the caller computes instead). The reservation is no request: it is never
        scheduled; ``commit_prefix`` puts its blocks in the prefix cache and ``release``
        drops it."""
        bs = self.kv.block_size
        if not token_ids or len(token_ids) % bs:
            raise ValueError(f"a prefix of {len(token_ids)} tokens is not whole blocks of {bs}")
        seq = self._new_sequence(pull_id, token_ids, SamplingParams(max_tokens=1), False,
                                 None)
        # match_prefix leaves the last token to compute; the whole prefix may be cached here.
        seq.token_ids.append(0)
        prefix = self.kv.match_prefix(seq)
        seq.token_ids.pop()
        if not self.kv.allocate(seq, len(token_ids) - prefix.num_tokens, prefix):
            del self._requests[pull_id]
            return None
        seq.status = SequenceStatus.AWAITING_KV
        seq.num_computed_tokens = seq.num_cached_tokens = prefix.num_tokens
        return Reservation(pull_id, list(seq.block_ids), prefix.num_tokens)

    def commit_prefix(self: Engine, pull_id: str) -> int:
        """Prefill role, prefix pool: every block of ``pull_id``'s reservation now holds its
        KV; put them in the prefix cache (a request of that prefix admitted from now on hits
        them). The reservation keeps its blocks referenced until ``release``. Returns the
        tokens that were written here (not already cached)."""
        req = self._requests.get(pull_id)
        if req is None or req.seq.status is not SequenceStatus.AWAITING_KV:
            raise KeyError(f"no prefix reservation awaiting KV named {pull_id!r}")
        seq = req.seq
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.kv.cache_computed_blocks(seq)
        seq.status = SequenceStatus.PREFILLED
        return seq.num_prompt_tokens - seq.num_cached_tokens

    def commit_kv(
        self: Engine, request_id: str, first_token_id: int,
        first_logprobs: TokenLogprobs | None = None,
    ) -> RequestOutput:
        """Decode role: every reserved block now holds the prompt's KV; admit the request
        with the first token sampled by the prefill side. Returns the first output."""
        req = self._requests.get(request_id)
        if req is None or req.seq.status is not SequenceStatus.AWAITING_KV:
            raise KeyError(f"no reservation awaiting KV for request {request_id!r}")
        seq = req.seq
        if seq.params.structured is not None:
            # Usually compiled by now (it started at reserve); the matcher replays the
            # output this request already has, then takes the first token in _append.
            self.grammars.wait(request_id)
            self.grammars.start(seq)
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.kv.cache_computed_blocks(seq)
        for index in range(1, seq.params.n):
            self._fork(seq, index)
        # The prefill side drew the first token.
        self.sampler.resume(request_id, 1, self.model_config.vocab_size)
        seq.status = SequenceStatus.RUNNING
        finished = self._append(req, first_token_id, first_logprobs)
        if not finished:
            self.scheduler.add_running(seq)
        return self._output(req, finished)

    def _fork(self: Engine, parent: Sequence, index: int) -> None:
        """Choice ``index`` of a request with ``n`` > 1, forked from its computed prompt: it
        shares the prompt's KV blocks (the block holding the last prompt token is copied,
        since both write after it) and recomputes only that last position, as a decode row,
        to draw its own first token. Its seed is the request's plus ``index``. When no block
        is free, it waits and recomputes its prompt here (mostly from the prefix cache)."""
        params = parent.params.choice(index)
        child_id = f"{parent.request_id}#{index}"
        child = self._new_sequence(child_id, parent.prompt_token_ids, params, False,
                                   parent.arrival_time, parent.priority)
        child.max_len = parent.max_len
        self._requests[child_id].parent_id = parent.request_id
        self._requests[child_id].index = index
        self._families.setdefault(parent.request_id, set()).update((parent.request_id,
                                                                    child_id))
        copy = self.kv.fork(parent, child)
        if copy is None:
            self.scheduler.add(child)
            return
        self.runner.copy_block(*copy)
        child.num_computed_tokens = child.num_tokens - 1
        child.num_cached_tokens = parent.num_cached_tokens
        self.scheduler.add_running(child)
