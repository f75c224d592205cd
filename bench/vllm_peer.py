"""vLLM's engine as a peer system of the engine benchmark, in its own process and venv.

pdserve never imports vLLM: ``VllmPeer`` starts ``bench/peers/vllm_engine.py`` with vLLM's
interpreter (``--vllm-python``, or ``$PDSERVE_VLLM_PYTHON``) and sends it the same requests
as pdserve gets, one JSON command a line; the peer answers one prefixed JSON line each (see
that script). The peer's own output (vLLM's logs) goes to a log file beside the results.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

PEER_SCRIPT = Path(__file__).with_name("peers") / "vllm_engine.py"
REPLY_PREFIX = "PDSERVE-PEER "
PYTHON_ENV = "PDSERVE_VLLM_PYTHON"
"""Environment variable naming vLLM's interpreter (the ``--vllm-python`` default)."""


class PeerError(RuntimeError):
    """The peer process failed to start or to answer; the message names its log file."""


def vllm_python(explicit: str | None = None) -> str | None:
    """The interpreter to run vLLM with: ``explicit``, else ``$PDSERVE_VLLM_PYTHON``."""
    return explicit or os.environ.get(PYTHON_ENV) or None


class VllmPeer:
    """One vLLM ``LLMEngine`` (in a child process) serving the harness's commands.

    ``start`` blocks until the engine is built and warmed up (vLLM compiles its model on
    the CPU: minutes) and records ``startup_s``. ``close`` stops it; use as a context
    manager. Not thread-safe."""

    def __init__(self, python: str, model: str, dtype: str, log_path: str | Path, *,
                 prefix_caching: bool = True, max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 256, max_model_len: int | None = None,
                 env: dict[str, str] | None = None, start_timeout_s: float = 3600.0) -> None:
        self.args = [python, str(PEER_SCRIPT), "--model", model, "--dtype", dtype,
                     "--max-num-batched-tokens", str(max_num_batched_tokens),
                     "--max-num-seqs", str(max_num_seqs)]
        if max_model_len is not None:
            self.args += ["--max-model-len", str(max_model_len)]
        if not prefix_caching:
            self.args.append("--no-prefix-caching")
        # vLLM's CPU backend sizes its KV cache from this (GiB); 2 is what pdserve's CPU
        # engine takes by default (CacheConfig.cpu_cache_bytes).
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", **(env or {})}
        self.log_path = Path(log_path)
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None
        self.startup_s = float("nan")
        self.version = "?"

    def __enter__(self) -> VllmPeer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", encoding="utf-8")
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, env=self.env, bufsize=1)
        ready = self._read(self.start_timeout_s)
        if not ready.get("ready"):
            raise PeerError(f"vLLM peer did not start: {ready} (log: {self.log_path})")
        self.startup_s = float(ready["startup_s"])
        self.version = str(ready.get("version", "?"))

    def _read(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        for line in self.proc.stdout:
            if line.startswith(REPLY_PREFIX):
                return json.loads(line[len(REPLY_PREFIX):])
            if self._log is not None:
                self._log.write(line)
            if time.monotonic() > deadline:
                break
        code = self.proc.poll()
        raise PeerError(f"vLLM peer gave no answer (exit code {code}); see {self.log_path}")

    def _call(self, command: dict[str, Any], timeout_s: float = 7200.0) -> dict[str, Any]:
        if self.proc is None or self.proc.stdin is None or self.proc.poll() is not None:
            raise PeerError(f"vLLM peer is not running; see {self.log_path}")
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        answer = self._read(timeout_s)
        if "error" in answer:
            raise PeerError(f"vLLM peer: {answer['error']}")
        return answer

    def throughput(self, requests: Sequence[tuple[Sequence[int], int]]) -> dict[str, Any]:
        """Run every request to its ``max_tokens``: ``{"wall_s", "tokens": [per request]}``."""
        return self._call({"op": "throughput",
                           "requests": [[list(p), n] for p, n in requests]})

    def ttft(self, requests: Sequence[tuple[Sequence[int], int]],
             overlap: bool) -> dict[str, Any]:
        """Each request sent at the previous one's first token (``overlap``) or once the
        engine is idle: ``{"wall_s", "ttfts": [seconds per request]}``."""
        return self._call({"op": "ttft", "overlap": overlap,
                           "requests": [[list(p), n] for p, n in requests]})

    def reset_prefix_cache(self) -> None:
        """Forget every cached block, as a fresh engine would start."""
        self._call({"op": "reset_prefix_cache"})

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None and self.proc.stdin is not None:
                try:
                    self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                    self.proc.stdin.close()
                    self.proc.wait(timeout=60)
                except (OSError, subprocess.TimeoutExpired):
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
