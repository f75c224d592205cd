"""The engine step loop (schedule -> run -> sample -> apply).

``Engine`` is what workers drive: ``add_request``, ``step``, ``abort``, plus the two hooks
of disaggregated serving. Prefill role: ``add_request(..., prefill_only=True)`` stops after
the first token and keeps the request's blocks referenced (their ids are in the outputs)
until ``release``. Decode role: ``reserve`` allocates blocks for a prompt whose KV will be
written from outside, and ``commit_kv`` admits it, with its first token, into the decode
batch. Prefix pool: ``reserve_prefix`` / ``commit_prefix`` take a prompt's leading blocks
written by a peer into the prefix cache, and ``leases`` pins cached blocks a peer reads
(those hooks: ``pdserve.engine.handoff``). Not thread-safe: one thread owns an engine.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pdserve.engine.attention import get_attention_backend
from pdserve.engine.block_leases import BlockLeases
from pdserve.engine.block_pool import BlockPool
from pdserve.engine.config import EngineConfig, KVCacheSpec, ModelConfig
from pdserve.engine.handoff import HandoffMixin
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.kv_events import KVEvent
from pdserve.engine.logits_processing import TokenContext
from pdserve.engine.model.builtin import resolve_model
from pdserve.engine.model.checkpoint import load_model_config
from pdserve.engine.model.cpu_linear import pack_model
from pdserve.engine.model.loader import load_model
from pdserve.engine.outputs import RequestMetrics, RequestOutput, StopChecker
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampler import Sampler
from pdserve.engine.sampling import SamplingParams, TokenLogprobs
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import FinishReason, Sequence, SequenceStatus
from pdserve.engine.structured.book import GrammarBook, Verdict
from pdserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from pdserve.engine.tp_group import TPGroup

logger = logging.getLogger(__name__)

# Upper bound on auto-sized caches: the blocks all running sequences could use, twice over
# (the rest keeps prefixes cached).
_AUTO_BLOCKS_HEADROOM = 2


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_awaiting_kv: int
    num_prefilled_held: int
    num_blocks: int
    num_used_blocks: int
    num_cached_blocks: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    prefill_tokens_computed: int
    num_preemptions: int


@dataclass(slots=True, eq=False)
class _Request:
    seq: Sequence
    stop: StopChecker
    metrics: RequestMetrics
    reported_tokens: int = 0
    reported_logprobs: int = 0
    parent_id: str | None = None  # a forked choice's request (n > 1)
    index: int = 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    return device


def _prompt_logprobs(seq: Sequence, start: int, logits: torch.Tensor) -> None:
    """Record the logprobs of prompt tokens ``start + 1 ..`` from the logits of positions
    ``start ..`` (a recomputed chunk replaces what an earlier pass recorded)."""
    prompt = seq.prompt_token_ids
    n = min(logits.shape[0], len(prompt) - 1 - start)
    if n <= 0:
        return
    logp = torch.log_softmax(logits[:n], dim=-1)
    targets = torch.tensor(prompt[start + 1 : start + 1 + n], device=logp.device)
    chosen = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    ranks = (logp > chosen.unsqueeze(1)).sum(dim=1) + 1
    k = seq.params.prompt_logprobs or 0
    top_v, top_i = logp.topk(k, dim=-1) if k else (None, None)
    out = []
    for j, (token, lp, rank) in enumerate(zip(targets.tolist(), chosen.tolist(),
                                              ranks.tolist(), strict=True)):
        top: tuple[tuple[int, float], ...] = ()
        if top_v is not None and top_i is not None:
            top = tuple(zip(top_i[j].tolist(), top_v[j].tolist(), strict=True))
        out.append(TokenLogprobs(token, lp, top, rank))
    del seq.prompt_logprobs[start:]
    seq.prompt_logprobs.extend(out)


def _context(seq: Sequence) -> TokenContext | None:
    """What logits processing reads of ``seq`` (None when its parameters ask for none)."""
    p = seq.params
    if not p.processes_logits:
        return None
    return TokenContext(seq.token_ids, seq.num_prompt_tokens if p.prompt_len is None
                        else p.prompt_len)


class Engine(HandoffMixin):
    """One model, one KV cache, one scheduler.

    With ``tp`` (a tensor-parallel group of more than one rank) the engine is one rank of a
    worker: it holds that rank's shard of the model and of every KV block (``kv_spec`` names
    the rank's KV heads). Rank 0 schedules and steps as usual, the others run ``follow()``
    (see ``pdserve.engine.tp_runner``); ``close()`` on rank 0 stops them."""

    def __init__(self, config: EngineConfig | None = None, tp: TPGroup | None = None) -> None:
        config = config or EngineConfig()
        self.config = config
        self.tp = tp if tp is not None and tp.world > 1 else None
        self.device = resolve_device(config.device)
        dtype = config.dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = dtype
        if self.device.type == "cpu" and dtype in ("bfloat16", "float16"):
            from pdserve.engine import cpu_kernels

            if cpu_kernels.half_matmuls_emulated():
                logger.warning("%s on a CPU without AVX-512: torch's %s matmuls are emulated "
                               "here, hundreds of times slower than float32 (use --dtype "
                               "float32)", dtype, dtype)
        self.model_path = resolve_model(config.model)
        self.model_config: ModelConfig = load_model_config(self.model_path)
        if self.tp is not None:
            from pdserve.engine.model.parallel import load_parallel_model

            self.model = load_parallel_model(self.model_path, getattr(torch, dtype),
                                             self.device, self.tp)
        else:
            self.model = load_model(self.model_path, dtype, self.device)
        if self.device.type == "cpu":
            pack_model(self.model)
        self.tokenizer = Tokenizer(self.model_path) if config.detokenize else None
        mc = self.model_config
        self.kv_spec = KVCacheSpec(
            num_layers=mc.num_layers,
            num_kv_heads=self.model.config.num_kv_heads,  # this rank's, with tensor parallelism
            head_dim=mc.head_dim,
            block_size=config.cache.block_size,
            dtype=dtype,
        )
        sched = config.scheduler
        model_len = min(sched.max_model_len or mc.max_position_embeddings,
                        mc.max_position_embeddings)
        num_blocks = config.cache.num_blocks or self._auto_num_blocks(model_len)
        if self.tp is not None:  # every rank holds every block id: agree on the count
            num_blocks = self.tp.min_int(num_blocks)
        self.num_blocks = num_blocks
        self.max_model_len = min(model_len, num_blocks * config.cache.block_size)
        self.pool = BlockPool(num_blocks, config.cache.block_size,
                              config.cache.enable_prefix_caching)
        self.kv = KVCacheManager(self.pool)
        self.leases = BlockLeases(self.pool)
        """Cached blocks pinned while a peer worker reads them (prefix pool)."""
        self.scheduler = Scheduler(sched, self.kv)
        backend = get_attention_backend(config.attention_backend, self.device)
        if self.tp is not None:
            from pdserve.engine.tp_runner import ParallelRunner

            self.runner: ModelRunner = ParallelRunner(self.model, self.kv_spec, num_blocks,
                                                      self.device, backend, self.tp,
                                                      huge_pages=config.cache.huge_pages)
        else:
            self.runner = ModelRunner(self.model, self.kv_spec, num_blocks, self.device,
                                      backend, cuda_graphs=config.cuda_graphs,
                                      max_num_seqs=sched.max_num_seqs,
                                      max_model_len=self.max_model_len,
                                      huge_pages=config.cache.huge_pages)
        self.sampler = Sampler()
        eos = set(mc.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self._requests: dict[str, _Request] = {}
        self._families: dict[str, set[str]] = {}  # n > 1: request id -> its live choices
        self._order = itertools.count()
        self._grammars: GrammarBook | None = None  # created by the first constrained request
        self._awaiting_grammar: list[Sequence] = []  # not schedulable until compiled
        self.num_preemptions = 0
        logger.info(
            "engine ready: %s %s on %s, %d KV blocks of %d tokens (%.1f MiB), backend %s",
            mc.architecture, dtype, self.device, num_blocks, self.kv_spec.block_size,
            num_blocks * self.kv_spec.block_bytes / 2**20, backend.name,
        )

    def _auto_num_blocks(self, model_len: int) -> int:
        cache = self.config.cache
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * cache.memory_fraction)
        else:
            budget = cache.cpu_cache_bytes
        by_memory = budget // self.kv_spec.block_bytes
        per_seq = -(-model_len // cache.block_size)
        useful = per_seq * self.config.scheduler.max_num_seqs * _AUTO_BLOCKS_HEADROOM
        num = min(by_memory, useful)
        if num < per_seq:
            raise ValueError(
                f"KV cache of {budget} bytes holds {by_memory} blocks; one sequence of "
                f"{model_len} tokens needs {per_seq}"
            )
        return int(num)

    # ------------------------------------------------------------------ tensor parallelism

    @property
    def tp_rank(self) -> int:
        return 0 if self.tp is None else self.tp.rank

    def follow(self, handler: Callable[[Any], Any] | None = None) -> int:
        """Ranks other than 0: run rank 0's steps until it calls ``close()``; returns the
        number of steps. Raises ``TPGroupError`` when a sibling rank dies. ``handler``
        answers rank 0's ``ParallelRunner.call_ranks`` messages (its worker's KV ops)."""
        from pdserve.engine.tp_runner import ParallelRunner

        if self.tp is None or self.tp.rank == 0 or not isinstance(self.runner, ParallelRunner):
            raise RuntimeError("follow() is for the ranks other than 0 of a parallel engine")
        return self.runner.follow(handler)

    def close(self) -> None:
        """Release the engine's group: rank 0 first stops the other ranks' loops. Safe to
        call twice; a no-op without tensor parallelism."""
        tp, self.tp = self.tp, None
        if tp is None:
            return
        from pdserve.engine.tp_runner import ParallelRunner

        try:
            if tp.rank == 0 and isinstance(self.runner, ParallelRunner):
                self.runner.stop_followers()
        except Exception:  # a dead sibling: nothing left to stop
            logger.warning("could not stop the other tensor-parallel ranks", exc_info=True)
        finally:
            tp.close()

    # ------------------------------------------------------------------ requests

    def _new_sequence(
        self,
        request_id: str,
        prompt: str | Seq[int],
        params: SamplingParams,
        prefill_only: bool,
        arrival_time: float | None,
        priority: int = 0,
    ) -> Sequence:
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.n > 1 and params.structured is not None:
            # Each forked choice would need its own matcher; refused rather than unchecked.
            raise ValueError("'n' > 1 cannot be combined with structured output")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (detokenize=True)")
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = [int(t) for t in prompt]
            vocab = self.model_config.vocab_size
            bad = [t for t in token_ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"token ids out of range [0, {vocab}): {bad[:5]}")
        n = len(token_ids)
        if n == 0:
            raise ValueError("prompt is empty")
        if n >= self.max_model_len:
            raise ValueError(
                f"prompt has {n} tokens; the model's length is {self.max_model_len}, "
                "which leaves no room for output"
            )
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - n
        elif n + max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                f"length of {self.max_model_len} tokens"
            )
        seq = Sequence(
            request_id=request_id,
            prompt_token_ids=token_ids,
            params=params,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            arrival_order=next(self._order),
            prefill_only=prefill_only,
            priority=priority,
        )
        seq.max_len = n + (1 if prefill_only else max_tokens)
        detok = None
        if self.tokenizer is not None and not prefill_only:
            detok = IncrementalDetokenizer(self.tokenizer, token_ids,
                                           skip_special_tokens=params.skip_special_tokens)
        self._requests[request_id] = _Request(
            seq, StopChecker(seq, detok, self.eos_token_ids), RequestMetrics(seq.arrival_time)
        )
        if params.prompt_len is not None and params.seed is not None and not params.greedy:
            # Resumed: the output in the prompt took one draw per token where it was sampled.
            self.sampler.resume(request_id, n - params.prompt_len,
                                self.model_config.vocab_size)
        return seq

    def _drop_new(self, request_id: str) -> None:
        """Forget a request that ``_new_sequence`` made and that was never admitted."""
        del self._requests[request_id]
        self.sampler.forget(request_id)

    def add_request(
        self,
        request_id: str,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        *,
        prefill_only: bool = False,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> None:
        """Queue a request. Bad input raises ``ValueError`` with the reason.

        ``prefill_only``: compute the prompt's KV and the first token, then hold the blocks
        (status PREFILLED) until ``release``. ``priority``: lower runs first under the
        "priority" scheduling policy (ignored under "fcfs")."""
        params = params or SamplingParams()
        if params.n > 1 and not prefill_only:
            raise ValueError("'n' > 1 is served by the decode role (reserve + commit_kv), "
                             "which forks the choices from the prompt's KV")
        seq = self._new_sequence(request_id, prompt, params, prefill_only, arrival_time,
                                 priority)
        if seq.params.structured is not None:
            # Compiled on the grammar pool; joins the scheduler's queue once ready (step).
            self.grammars.submit(seq)
            self._awaiting_grammar.append(seq)
            return
        self.scheduler.add(seq)

    @property
    def grammars(self) -> GrammarBook:
        """Structured-output state (xgrammar and the tokenizer load on first use)."""
        if self._grammars is None:
            self._grammars = GrammarBook(self._tokenizer_info, self.model_config.vocab_size)
        return self._grammars

    def _tokenizer_info(self) -> object:
        import xgrammar as xgr

        tokenizer = self.tokenizer or Tokenizer(self.model_path)
        return xgr.TokenizerInfo.from_huggingface(
            tokenizer.hf_tokenizer, vocab_size=self.model_config.vocab_size,
            stop_token_ids=list(self.eos_token_ids))

    def _admit_compiled(self) -> list[RequestOutput]:
        """Move requests whose grammar is compiled into the scheduler's queue; fail those
        whose grammar cannot be built."""
        if not self._awaiting_grammar:
            return []
        book = self.grammars
        failed: list[RequestOutput] = []
        ready = [s for s in self._awaiting_grammar if book.ready(s.request_id)]
        self._awaiting_grammar = [s for s in self._awaiting_grammar if s not in ready]
        for seq in ready:
            try:
                book.start(seq)
            except Exception as exc:
                req = self._requests[seq.request_id]
                seq.status = SequenceStatus.FINISHED  # in no queue: nothing to take it from
                failed.append(self._fail(req, f"{type(exc).__name__}: {exc}"))
                continue
            self.scheduler.add(seq)
        return failed

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free all it holds. False if unknown."""
        for member in self._families.pop(request_id, ()):
            if member != request_id:
                self.abort(member)
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        seq = req.seq
        if seq in self._awaiting_grammar:
            self._awaiting_grammar.remove(seq)
        else:
            self.scheduler.remove(seq)
        self.kv.free(seq)
        self.sampler.forget(request_id)
        if self._grammars is not None:
            self._grammars.forget(request_id)
        seq.status = SequenceStatus.FINISHED
        if seq.finish_reason is None:
            seq.finish_reason = FinishReason.ABORT
        return True

    def release(self, request_id: str) -> bool:
        """Free a prefilled request's blocks (prefill role, after its KV was sent)."""
        return self.abort(request_id)

    def request_status(self, request_id: str) -> str | None:
        """'waiting', 'running', 'awaiting_kv' or 'prefilled'; None if unknown or done."""
        req = self._requests.get(request_id)
        return None if req is None else req.seq.status.value

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self._awaiting_grammar)

    def holds_requests(self) -> bool:
        """Whether any request is still here, whatever its state (waiting for its KV,
        prefilled and waiting to be released, running)."""
        return bool(self._requests) or bool(self._awaiting_grammar)

    # ------------------------------------------------------------------ step loop

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and report every request that got a new
        token or finished (prefill-only requests also report chunk progress)."""
        failed = self._admit_compiled()
        batch = self.scheduler.schedule()
        self.num_preemptions += len(batch.preempted)
        if batch.is_empty:
            if not failed and self._awaiting_grammar:
                self.grammars.wait(self._awaiting_grammar[0].request_id, timeout=0.005)
            return failed
        now = time.monotonic()
        for seq, _ in batch.prefills:
            metrics = self._requests[seq.request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
        result = self.runner.execute(batch)
        for seq, start, rows in result.prompt_logits:
            _prompt_logprobs(seq, start, rows)
        for seq in batch.decodes:
            seq.num_computed_tokens += 1
            if seq.num_computed_tokens % self.kv.block_size == 0:
                self.kv.cache_computed_blocks(seq)
        for seq, n in batch.prefills:
            seq.num_computed_tokens += n
            self.kv.cache_computed_blocks(seq)
        outputs: list[RequestOutput] = failed
        for seq, tok, lp, error in self._sample(result.sampled, result.logits):
            req = self._requests[seq.request_id]
            if error is None:
                try:
                    finished = self._append(req, tok, lp)
                except Exception as exc:  # this request's own stop rules or text
                    error = f"{type(exc).__name__}: {exc}"
                else:
                    outputs.append(self._output(req, finished))
                    continue
            outputs.append(self._fail(req, error))
        sampled = set(map(id, result.sampled))
        for seq, _ in batch.prefills:
            if seq.prefill_only and id(seq) not in sampled:
                outputs.append(self._output(self._requests[seq.request_id], False))
        return outputs

    def _sample(
        self, seqs: list[Sequence], logits: torch.Tensor
    ) -> list[tuple[Sequence, int, TokenLogprobs | None, str | None]]:
        """(sequence, token, logprobs, error) per sampled row. A row whose parameters the
        sampler cannot run gets an error and draws nothing; the other rows are sampled as
        if it were not there (seeded rows stay reproducible)."""
        if not seqs:
            return []
        ids = [s.request_id for s in seqs]
        params = [s.params for s in seqs]
        contexts = [_context(s) for s in seqs]
        if self._grammars is not None:
            self._grammars.apply(seqs, logits)  # one batched mask for the constrained rows
        bad = self.sampler.check(ids, params, logits.device)
        keep = [i for i in range(len(seqs)) if i not in bad]
        tokens: dict[int, int] = {}
        lps: dict[int, TokenLogprobs | None] = {}
        if keep:
            rows = logits if not bad else logits[keep]
            try:
                got, got_lps = self.sampler.sample(rows, [ids[i] for i in keep],
                                                   [params[i] for i in keep],
                                                   [contexts[i] for i in keep],
                                                   self.eos_token_ids)
                tokens = dict(zip(keep, got, strict=True))
                lps = dict(zip(keep, got_lps, strict=True))
            except Exception:
                # Not foreseen by check(): find the culprit row by row (seeded rows drawn
                # before the failure may have advanced their generators).
                logger.exception("sampling a batch of %d rows failed; sampling row by row",
                                 len(keep))
                for i in keep:
                    try:
                        (tok,), (lp,) = self.sampler.sample(
                            logits[i : i + 1], [ids[i]], [params[i]], [contexts[i]],
                            self.eos_token_ids)
                        tokens[i], lps[i] = tok, lp
                    except Exception as exc:
                        bad[i] = f"{type(exc).__name__}: {exc}"
        return [(seq, tokens.get(i, -1), lps.get(i), bad.get(i)) for i, seq in enumerate(seqs)]

    def _fail(self, req: _Request, error: str) -> RequestOutput:
        """End a request that failed on its own (its sampling or stop rules), freeing what
        it holds; every other request goes on. A prefill-only request keeps its blocks until
        ``release``, as when it finishes (its KV may still be being sent)."""
        seq = req.seq
        logger.warning("request %s failed in the engine: %s", seq.request_id, error)
        seq.finish_reason = FinishReason.ERROR
        self.scheduler.remove(seq)
        self.sampler.forget(seq.request_id)
        if self._grammars is not None:
            self._grammars.forget(seq.request_id)
        req.metrics.finished_time = time.monotonic()
        if seq.prefill_only:
            seq.status = SequenceStatus.PREFILLED
        else:
            seq.status = SequenceStatus.FINISHED
            self.kv.free(seq)
        out = self._output(req, True)
        out.error = error
        return out

    def _append(self, req: _Request, token_id: int, lp: TokenLogprobs | None) -> bool:
        """Add a sampled token; apply stop rules; on finish, free or hold the blocks."""
        seq = req.seq
        seq.token_ids.append(token_id)
        if lp is not None:
            seq.output_logprobs.append(lp)
        now = time.monotonic()
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        verdict = Verdict.GOING
        if self._grammars is not None and not seq.prefill_only:
            verdict = self._grammars.accept(seq, token_id)  # ValueError: not allowed
        if seq.prefill_only:
            seq.finish_reason = FinishReason.PREFILL_DONE
        elif not req.stop.append(token_id):
            if verdict is not Verdict.TERMINATED:
                return False
            req.stop.finish(FinishReason.STOP)  # the constraint is complete
        self.scheduler.remove(seq)
        if self._grammars is not None:
            self._grammars.forget(seq.request_id)
        req.metrics.finished_time = now
        if seq.prefill_only:
            seq.status = SequenceStatus.PREFILLED  # blocks stay held until release()
        else:
            seq.status = SequenceStatus.FINISHED
            self.kv.free(seq)
            self.sampler.forget(seq.request_id)
        return True

    def _output(self, req: _Request, finished: bool) -> RequestOutput:
        seq = req.seq
        new_tokens = seq.output_token_ids[req.reported_tokens :]
        req.reported_tokens = seq.num_output_tokens
        new_lps = seq.output_logprobs[req.reported_logprobs :]
        req.reported_logprobs = len(seq.output_logprobs)
        if finished and seq.status is SequenceStatus.FINISHED:
            del self._requests[seq.request_id]
            family = self._families.get(req.parent_id or seq.request_id)
            if family is not None:
                family.discard(seq.request_id)
                if not family:
                    del self._families[req.parent_id or seq.request_id]
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=seq.output_token_ids,
            new_token_ids=new_tokens,
            text=req.stop.text,
            delta_text=req.stop.take_delta(finished),
            finished=finished,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            stop_reason=seq.stop_reason,
            num_cached_tokens=max(seq.num_cached_tokens, 0),
            num_computed_tokens=seq.num_computed_tokens,
            block_ids=list(seq.block_ids) if seq.prefill_only else [],
            logprobs=list(seq.output_logprobs),
            new_logprobs=new_lps,
            metrics=req.metrics,
            parent_id=req.parent_id,
            index=req.index,
            prompt_logprobs=list(seq.prompt_logprobs) if finished else [],
        )

    # ------------------------------------------------------------------ introspection

    def take_kv_events(self) -> list[KVEvent]:
        return self.pool.take_events()

    def stats(self) -> EngineStats:
        statuses = [r.seq.status for r in self._requests.values()]
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_awaiting_kv=statuses.count(SequenceStatus.AWAITING_KV),
            num_prefilled_held=statuses.count(SequenceStatus.PREFILLED),
            num_blocks=self.num_blocks,
            num_used_blocks=self.pool.num_used_blocks,
            num_cached_blocks=self.pool.num_cached_blocks,
            prefix_queried_tokens=self.kv.queried_tokens,
            prefix_hit_tokens=self.kv.hit_tokens,
            prefill_tokens_computed=self.scheduler.prefill_tokens_computed,
            num_preemptions=self.num_preemptions,
        )
