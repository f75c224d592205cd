"""vLLM's engine as a benchmark peer, driven by ``pdserve.bench.engine`` over a pipe.

Run by vLLM's own interpreter (``--vllm-python``): this file imports vLLM and the standard
library only, never pdserve (the two do not share an environment). The harness starts it
as ``PYTHON vllm_engine.py --model PATH --dtype DTYPE [...]``, then writes one JSON command
per line on its stdin; each reply is one stdout line starting with ``REPLY_PREFIX``
followed by JSON (vLLM's own log lines are ignored by the harness).

Commands:
- ``{"op": "throughput", "requests": [[prompt_ids, max_tokens], ...]}``: add every request,
  step until all finished; replies wall seconds and tokens per request.
- ``{"op": "ttft", "requests": [...], "overlap": bool}``: send request i+1 when request i
  emitted its first token (``overlap``), or only once the engine is idle; replies each TTFT.
- ``{"op": "reset_prefix_cache"}``: forget every cached block (a fresh engine's state).
- ``{"op": "quit"}``.
Outputs are forced to their length (``ignore_eos``), greedy, as pdserve's are.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

REPLY_PREFIX = "PDSERVE-PEER "


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(REPLY_PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _params(max_tokens: int) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _prompt(ids: list[int]) -> Any:
    return {"prompt_token_ids": ids}


def run_throughput(engine: Any, requests: list[list[Any]], tag: str) -> dict[str, Any]:
    got: dict[str, int] = {}
    start = time.perf_counter()
    for i, (prompt, max_tokens) in enumerate(requests):
        engine.add_request(f"{tag}{i}", _prompt(prompt), _params(max_tokens))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = len(out.outputs[0].token_ids)
    wall = time.perf_counter() - start
    tokens = [got.get(f"{tag}{i}", 0) for i in range(len(requests))]
    return {"wall_s": wall, "tokens": tokens}


def run_ttft(engine: Any, requests: list[list[Any]], overlap: bool, tag: str) -> dict[str, Any]:
    ttfts: list[float] = []
    start = time.perf_counter()
    next_i = 0
    sent_at = 0.0
    waiting: str | None = None
    while next_i < len(requests) or engine.has_unfinished_requests():
        if waiting is None and next_i < len(requests) and (
                overlap or not engine.has_unfinished_requests()):
            waiting = f"{tag}{next_i}"
            sent_at = time.perf_counter()
            prompt, max_tokens = requests[next_i]
            engine.add_request(waiting, _prompt(prompt), _params(max_tokens))
            next_i += 1
        for out in engine.step():
            if out.request_id == waiting and out.outputs and out.outputs[0].token_ids:
                ttfts.append(time.perf_counter() - sent_at)
                waiting = None
    return {"wall_s": time.perf_counter() - start, "ttfts": ttfts}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--block-size", type=int, default=None,
                   help="KV block size (default: vLLM's choice; its CPU attention needs a "
                   "multiple of 32)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    args = p.parse_args()

    import vllm
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    start = time.perf_counter()
    engine_args = EngineArgs(
        model=args.model, dtype=args.dtype, seed=0, block_size=args.block_size,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching,
        disable_log_stats=True,
    )
    engine = LLMEngine.from_engine_args(engine_args)
    run_throughput(engine, [[[3] * 8, 2]], "warm")
    reply({"ready": True, "startup_s": time.perf_counter() - start,
           "version": vllm.__version__})
    runs = 0
    for line in sys.stdin:
        cmd = json.loads(line)
        runs += 1
        tag = f"r{runs}-"
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "throughput":
            reply(run_throughput(engine, cmd["requests"], tag))
        elif cmd["op"] == "ttft":
            reply(run_ttft(engine, cmd["requests"], bool(cmd["overlap"]), tag))
        elif cmd["op"] == "reset_prefix_cache":
            reply({"reset": bool(engine.reset_prefix_cache())})
        else:
            reply({"error": f"unknown op {cmd['op']!r}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
