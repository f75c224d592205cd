"""The puller's side of the cluster-wide prefix pool: get a prompt's prefix from its holder.

When the router sends a prefill with a ``PullSource`` (another worker holds the prompt's
leading blocks and the balancer's cost model says reading them beats computing them), the
prefill worker, before it lets the engine see the request:

1. reserves blocks for that prefix (``Engine.reserve_prefix``: its own cached blocks are
   reused, the rest are allocated) and tells its connector to expect them, under the pull
   id ``<request id>/pull`` and a lease of the source's ``timeout_s``;
2. asks the holder to ``lend`` (the holder pins the blocks and writes them; the prefill
   worker's actor loop makes that call, see ``PrefillWorker``);
3. when its connector reports every block landed, puts them in its prefix cache
   (``Engine.commit_prefix``) and admits the request, which now hits them and computes
   only the rest; the reservation keeps them referenced until the request ends.

Any failure (the holder refuses, fails, dies or is slower than the lease, a transfer error)
admits the request at once to compute everything: the pull's blocks are never read, and are
freed only once no late write can land in them (``reuse_after``). Nothing unfinished is
ever cached, so a pull cannot produce a wrong token; at worst it costs the time it waited.

Driver thread only (the engine's and the connector's owner).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdserve.kvtransfer.base import PollResult
from pdserve.worker.protocol import LendRequest, PrefillRequest

if TYPE_CHECKING:
    from pdserve.engine.engine import Engine
    from pdserve.kvtransfer.base import KVConnector

logger = logging.getLogger(__name__)

_RATE_WEIGHT = 0.3  # weight of the newest pull in the measured rate (an EWMA)


def pull_id(request_id: str) -> str:
    """The transfer id of ``request_id``'s pull (never a request id of the router's)."""
    return f"{request_id}/pull"


@dataclass(slots=True)
class _Pull:
    request_id: str
    pull_id: str
    tokens: int
    """Prompt tokens the holder writes here."""
    started: float
    block_ids: list[int]
    """The reservation's blocks: the prompt's first ones, all computed once landed."""


class Puller:
    """Open pulls of one prefill worker, by request id."""

    def __init__(self, worker_id: str, engine: Engine, connector: KVConnector) -> None:
        self.worker_id = worker_id
        self.engine = engine
        self.connector = connector
        self._open: dict[str, _Pull] = {}
        self._by_pull_id: dict[str, str] = {}
        self._landed: dict[str, str] = {}  # request id -> pull id whose blocks it holds
        self._deferred: list[tuple[float, str]] = []  # (reuse after, pull id) to release
        self.pulled_tokens = 0
        """Prompt tokens whose KV landed from a holder instead of being computed."""
        self.pulls = 0
        self.failures = 0
        """Pulls that fell back to computing."""
        self.bytes_per_s = 0.0
        """Measured rate of landed pulls, request to last block (0: none yet)."""

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._open

    def idle(self) -> bool:
        """No pull open, landed or waiting to release its blocks."""
        return not (self._open or self._landed or self._deferred)

    def begin(self, req: PrefillRequest) -> LendRequest | None:
        """Reserve and expect ``req``'s pulled prefix; the lend to ask the holder for, or
        None when there is nothing to pull (already cached here, no room, too short)."""
        source = req.pull
        assert source is not None
        engine, bs = self.engine, self.engine.kv_spec.block_size
        prompt = req.prompt_token_ids
        num_blocks = min(source.num_blocks, (len(prompt) - 1) // bs)  # one token computed
        if num_blocks <= 0 or source.timeout_s <= 0:
            return None
        pid = pull_id(req.request_id)
        try:
            res = engine.reserve_prefix(pid, prompt[: num_blocks * bs])
        except ValueError as exc:
            logger.warning("%s: cannot pull for %s: %s", self.worker_id, req.request_id, exc)
            return None
        if res is None:
            return None
        first = res.num_cached_tokens // bs
        if first >= num_blocks:
            engine.release(pid)
            return None
        dst = res.block_ids[first:]
        self.connector.expect(pid, dst, source.timeout_s)
        self._open[req.request_id] = _Pull(req.request_id, pid, (num_blocks - first) * bs,
                                           time.monotonic(), list(res.block_ids))
        self._by_pull_id[pid] = req.request_id
        self.pulls += 1
        return LendRequest(pid, list(prompt[: num_blocks * bs]), first, num_blocks,
                           self.connector.describe(), dst, time.time() + source.timeout_s)

    def fail(self, request_id: str, reason: str, writes_done: bool) -> None:
        """Give up ``request_id``'s pull (the holder refused, failed or died; the request
        was aborted). ``writes_done``: no write of the holder can still land here. The next
        ``take`` reports it failed."""
        pull = self._open.get(request_id)
        if pull is None:
            return
        logger.info("%s: pull for %s abandoned: %s", self.worker_id, request_id, reason)
        self.connector.abort(pull.pull_id, writes_done=writes_done)

    def take(self, result: PollResult) -> tuple[list[tuple[str, int, list[int]]], list[str]]:
        """Take this puller's transfers out of ``result``: (requests whose prefix landed,
        with the tokens pulled and the blocks now holding the prompt's first blocks, referenced
        until ``finish``; requests whose pull failed). Both are to be admitted now."""
        landed: list[tuple[str, int, list[int]]] = []
        failed: list[str] = []
        if self._open:
            now = time.monotonic()
            keep = []
            for rec in result.received:
                rid = self._by_pull_id.pop(rec.request_id, None)
                if rid is None:
                    keep.append(rec)
                    continue
                pull = self._open.pop(rid)
                self.engine.commit_prefix(pull.pull_id)
                self._landed[rid] = pull.pull_id
                self.pulled_tokens += pull.tokens
                elapsed = now - pull.started
                if elapsed > 0:
                    rate = pull.tokens * self.engine.kv_spec.block_bytes / (
                        self.engine.kv_spec.block_size * elapsed)
                    self.bytes_per_s = rate if not self.bytes_per_s else (
                        _RATE_WEIGHT * rate + (1 - _RATE_WEIGHT) * self.bytes_per_s)
                landed.append((rid, pull.tokens, pull.block_ids))
            result.received = keep
            left = []
            for failure in result.failed:
                rid = self._by_pull_id.pop(failure.request_id, None)
                if rid is None:
                    left.append(failure)
                    continue
                self._open.pop(rid, None)
                self.failures += 1
                self._deferred.append((failure.reuse_after, failure.request_id))
                logger.warning("%s: pull for %s failed (%s): computing it instead",
                               self.worker_id, rid, failure.message)
                failed.append(rid)
            result.failed = left
        self._release_due()
        return landed, failed

    def finish(self, request_id: str) -> None:
        """``request_id`` ended: drop the reference its landed prefix held."""
        pid = self._landed.pop(request_id, None)
        if pid is not None:
            self.engine.release(pid)

    def _release_due(self) -> None:
        if not self._deferred:
            return
        now = time.monotonic()
        due = [pid for t, pid in self._deferred if t <= now]
        self._deferred = [(t, pid) for t, pid in self._deferred if t > now]
        for pid in due:
            self.engine.release(pid)

    def stats(self) -> dict[str, float]:
        return {"pool_pulled_tokens": self.pulled_tokens, "pool_pulls": self.pulls,
                "pool_pull_failures": self.failures, "pool_pulls_open": len(self._open),
                "pull_bytes_per_s": self.bytes_per_s}
