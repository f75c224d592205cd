"""The holder's side of the cluster-wide prefix pool: lend cached blocks to a puller.

A prefill worker that chose to pull a prompt's prefix instead of computing it reserves
blocks for it and asks the worker that holds it (prefill or decode) to ``lend``: the
holder pins the cached blocks (``engine.leases``), writes them into the puller's reserved
blocks over its KV connector as one transfer named by the pull id, and gives the pin back
when the connector reports that transfer sent or failed (the connector's lease bounds
that, so no pin outlives it). It never touches blocks it does not hold cached: a missing
block refuses the whole lend and the puller computes instead.

Driver thread only (the engine's and the connector's owner).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from pdserve.kvtransfer.base import PollResult
from pdserve.worker.protocol import LendRequest

if TYPE_CHECKING:
    from pdserve.engine.engine import Engine
    from pdserve.kvtransfer.base import KVConnector

logger = logging.getLogger(__name__)


class Lender:
    """Pins, writes and gives back the blocks this worker lends."""

    def __init__(self, worker_id: str, engine: Engine, connector: KVConnector) -> None:
        self.worker_id = worker_id
        self.engine = engine
        self.connector = connector
        self.lent_tokens = 0
        """Tokens of KV sent to pullers (transfers completed)."""
        self.lends_failed = 0
        self._tokens: dict[str, int] = {}  # pull id -> tokens being sent

    def idle(self) -> bool:
        """No lent blocks are being written."""
        return not self._tokens

    def lend(self, req: LendRequest) -> str:
        """Start writing ``req``'s blocks; "" once the writes are posted, else why not
        (nothing was pinned nor written: the puller may reuse its blocks at once)."""
        if time.time() > req.write_deadline:
            return "the puller's deadline passed"
        leases = self.engine.leases
        try:
            src = leases.lend(req.pull_id, req.token_ids, req.first_block, req.num_blocks)
        except ValueError as exc:
            return str(exc)
        if src is None:
            return "blocks no longer cached here"
        if len(src) != len(req.dst_block_ids):
            leases.give_back(req.pull_id)
            return f"{len(src)} blocks to send, {len(req.dst_block_ids)} destinations"
        try:
            self.connector.write_blocks(req.target, req.pull_id, src, req.dst_block_ids,
                                        last=True)
        except ValueError as exc:
            leases.give_back(req.pull_id)
            return f"cannot write: {exc}"
        self._tokens[req.pull_id] = len(src) * self.engine.kv_spec.block_size
        return ""

    def take(self, result: PollResult) -> None:
        """Remove this lender's transfers from ``result`` and give their blocks back."""
        if not self._tokens:
            return
        sent = {rid for rid in result.sent if rid in self._tokens}
        for rid in sent:
            self.lent_tokens += self._tokens.pop(rid)
            self.engine.leases.give_back(rid)
        failed = {f.request_id for f in result.failed if f.request_id in self._tokens}
        for failure in result.failed:
            if failure.request_id in failed:
                self._tokens.pop(failure.request_id)
                self.engine.leases.give_back(failure.request_id)
                self.lends_failed += 1
                logger.warning("%s: lending %s failed: %s", self.worker_id,
                               failure.request_id, failure.message)
        if sent:
            result.sent = [rid for rid in result.sent if rid not in sent]
        if failed:
            result.failed = [f for f in result.failed if f.request_id not in failed]

    def stats(self) -> dict[str, int]:
        return {"pool_lent_tokens": self.lent_tokens, "pool_lends_failed": self.lends_failed,
                "pool_lends_open": len(self._tokens)}
