"""The model runner of a tensor-parallel engine: rank 0 plans, every rank runs.

Rank 0's engine schedules as any engine does; before each forward pass its runner
broadcasts the step plan (input ids, positions, attention metadata, rows to sample: plain
integers, JSON over the group's CPU channel, no pickle) and runs its shard. The other ranks
sit in ``follow()``: they receive each plan, run their shard of the same forward pass
(taking part in its all-reduces and in the logits' all-gather) and wait for the next one.
Every rank thus writes its own KV heads into the same block ids. ``stop_followers()`` (rank 0)
ends the followers' loops; a rank that dies makes the others' next collective raise
(``pdserve.engine.tp_group.TPGroupError``) within the group's timeout.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata
from pdserve.engine.config import KVCacheSpec
from pdserve.engine.runner import ModelRunner, RunResult
from pdserve.engine.scheduler import ScheduledBatch
from pdserve.engine.thread_pinning import PoolPinning
from pdserve.engine.tp_group import TPGroup

logger = logging.getLogger(__name__)

_META_FIELDS = [f.name for f in dataclasses.fields(AttentionMetadata) if f.name != "backend_plan"]


def _encode(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
                "data": value.flatten().tolist()}
    return value


def _decode(value: Any, device: torch.device) -> Any:
    if isinstance(value, dict):
        t = torch.tensor(value["data"], dtype=getattr(torch, value["dtype"]), device=device)
        return t.reshape(value["shape"])
    return value


def encode_plan(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                rows: list[int], prompt_rows: list[tuple[int, int]] | None = None
                ) -> dict[str, Any]:
    """One step's forward pass as JSON-encodable data (``prompt_rows``: the ``(offset, n)``
    hidden rows whose logits the step also computes, for prompt logprobs)."""
    return {
        "input_ids": _encode(input_ids),
        "positions": _encode(positions),
        "meta": {name: _encode(getattr(meta, name)) for name in _META_FIELDS},
        "rows": rows,
        "prompt_rows": [list(r) for r in prompt_rows or ()],
    }


def decode_plan(plan: dict[str, Any], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int],
                           list[tuple[int, int]]]:
    meta = AttentionMetadata(**{k: _decode(v, device) for k, v in plan["meta"].items()})
    return (_decode(plan["input_ids"], device), _decode(plan["positions"], device), meta,
            list(plan["rows"]), [(int(o), int(n)) for o, n in plan.get("prompt_rows", ())])


class ParallelRunner(ModelRunner):
    """A ``ModelRunner`` whose model is one rank's shard (``ParallelCausalLM``). Rank 0 calls
    ``execute``; the other ranks call ``follow``. No CUDA graphs."""

    def __init__(self, model: torch.nn.Module, spec: KVCacheSpec, num_blocks: int,
                 device: torch.device, backend: AttentionBackend, group: TPGroup, *,
                 huge_pages: bool = False) -> None:
        super().__init__(model, spec, num_blocks, device, backend, cuda_graphs=False,
                         huge_pages=huge_pages)
        self.group = group
        self.pinning = PoolPinning(device, group.rank, group.world)

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
             rows: list[int], prompt_rows: list[tuple[int, int]]
             ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Every rank: the forward pass, then the logits of ``prompt_rows`` and of ``rows``
        in that order (each ``compute_logits`` is a collective: the same calls on every
        rank). Returns (logits of ``rows`` or None, the prompt rows' logits)."""
        with self.pinning.bound():
            step = self.backend.plan_step(meta)
            hidden = self.model(input_ids, positions, self.kv_cache, step, self.backend)
            prompt = [self.model.compute_logits(hidden[o : o + n]).float()
                      for o, n in prompt_rows]
            if not rows:
                return None, prompt
            if len(rows) != hidden.shape[0]:
                hidden = hidden[torch.tensor(rows, device=hidden.device)]
            return self.model.compute_logits(hidden), prompt

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> RunResult:
        input_ids, positions, meta, rows, sampled = self.build_inputs(batch)
        prompt_seqs, prompt_rows = [], []
        offset = len(batch.decodes)  # prefill chunks follow the decode rows, in order
        for seq, n in batch.prefills:
            start = seq.num_computed_tokens
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                prompt_seqs.append((seq, start))
                prompt_rows.append((offset, n))
            offset += n
        self.group.broadcast_json(encode_plan(input_ids, positions, meta, rows, prompt_rows))
        logits, prompt = self._run(input_ids, positions, meta, rows, prompt_rows)
        prompt_logits = [(seq, start, lg) for (seq, start), lg in zip(prompt_seqs, prompt,
                                                                      strict=True)]
        if logits is None:
            return RunResult([], torch.empty((0, 0), dtype=torch.float32, device=self.device),
                             prompt_logits)
        return RunResult(sampled, logits, prompt_logits)

    @torch.inference_mode()
    def copy_block(self, src: int, dst: int) -> None:
        """Every rank copies its heads of block ``src`` into ``dst`` (a forked sequence)."""
        self.group.broadcast_json({"copy": [src, dst]})
        super().copy_block(src, dst)

    @torch.inference_mode()
    def follow(self, handler: Callable[[Any], Any] | None = None) -> int:
        """Run rank 0's plans until it stops us; returns the number of steps run. Raises
        ``TPGroupError`` when the group fails (a sibling died). Rank 0's ``call_ranks``
        messages go to ``handler``, whose JSON answers rank 0 gathers."""
        steps = 0
        while True:
            plan = self.group.broadcast_json()
            if plan is None:
                logger.info("rank %d: stopped by rank 0 after %d steps", self.group.rank, steps)
                return steps
            if "call" in plan:
                reply = handler(plan["call"]) if handler is not None else None
                self.group.gather_json(reply)
                continue
            if "copy" in plan:
                super().copy_block(*plan["copy"])
                continue
            self._run(*decode_plan(plan, self.device))
            steps += 1

    def call_ranks(self, message: Any, own_reply: Any = None) -> list[Any]:
        """Rank 0: hand ``message`` to every other rank's ``follow`` handler between steps;
        returns the replies in rank order (``own_reply`` first)."""
        self.group.broadcast_json({"call": message})
        return self.group.gather_json(own_reply)

    def stop_followers(self) -> None:
        """Rank 0: end the other ranks' ``follow`` loops."""
        self.group.broadcast_json(None)
