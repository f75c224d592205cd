"""The offline ``LLM`` API: prefill and decode in this process, prompts run to completion."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq

from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.engine import Engine
from pdserve.engine.model.builtin import resolve_model
from pdserve.engine.model.checkpoint import load_model_config
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.tokenizer import Tokenizer


class LLM:
    """Offline generation: prefill and decode in one process.

    >>> llm = LLM(model="tiny")
    >>> out = llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))

    ``tensor_parallel_size=N`` (N > 1) runs the model over N ranks: this process is rank 0,
    N-1 spawned processes hold the other shards (see ``pdserve.engine.tp_local``); ``close()``
    stops them (they also end with this process).
    """

    def __init__(self, model: str = "tiny", dtype: str = "auto", device: str = "auto",
                 tensor_parallel_size: int = 1, **engine_kwargs: object) -> None:
        cache_keys = {"block_size", "num_blocks", "enable_prefix_caching", "cpu_cache_bytes",
                      "memory_fraction", "huge_pages"}
        sched_keys = {"max_num_batched_tokens", "max_num_seqs", "max_model_len"}
        unknown = (set(engine_kwargs) - cache_keys - sched_keys
                   - {"attention_backend", "detokenize"})
        if unknown:
            raise TypeError(f"unknown LLM option(s): {', '.join(sorted(unknown))}")
        cache = CacheConfig(**{k: v for k, v in engine_kwargs.items() if k in cache_keys})
        sched = SchedulerConfig(**{k: v for k, v in engine_kwargs.items() if k in sched_keys})
        backend = engine_kwargs.get("attention_backend")
        config = EngineConfig(
            model=model, dtype=dtype, device=device, cache=cache, scheduler=sched,
            attention_backend=backend if isinstance(backend, str) else None,
            detokenize=bool(engine_kwargs.get("detokenize", True)),
        )
        self._ranks = None
        if tensor_parallel_size != 1:
            from pdserve.engine.tp_layout import check_tp
            from pdserve.engine.tp_local import start_local_ranks

            mc = load_model_config(resolve_model(model))  # refuse a bad size before spawning
            check_tp(mc.num_heads, mc.num_kv_heads, mc.intermediate_size, tensor_parallel_size)
            self._ranks = start_local_ranks(config, tensor_parallel_size)
            try:
                self.engine = Engine(self._ranks.config, tp=self._ranks.group)
            except BaseException:
                self._ranks.group.close()
                self._ranks.join(timeout_s=1.0)
                raise
        else:
            self.engine = Engine(config)
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (a no-op without them)."""
        self.engine.close()
        if self._ranks is not None:
            self._ranks.join()
            self._ranks = None

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Seq[int] | Seq[str | Seq[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in prompt order."""
        if isinstance(prompts, str) or (
            prompts and isinstance(prompts, Seq) and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompt_list = list(prompts)  # type: ignore[arg-type]
        if isinstance(params, SamplingParams) or params is None:
            param_list = [params or SamplingParams()] * len(prompt_list)
        else:
            param_list = list(params)
            if len(param_list) != len(prompt_list):
                raise ValueError(
                    f"{len(prompt_list)} prompts but {len(param_list)} sampling params"
                )
        ids = [f"llm-{next(self._ids)}" for _ in prompt_list]
        try:
            for rid, prompt, p in zip(ids, prompt_list, param_list, strict=True):
                self.engine.add_request(rid, prompt, p)
            done: dict[str, RequestOutput] = {}
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return [done[rid] for rid in ids]
