"""The router's view of its pools' load, which the balancer decides on.

Each worker's latest load as it pushed it (with its KV events, ``on_load``), else its last
polled stats, installed into one ``LoadView`` per pool. Event loop only.
"""

from __future__ import annotations

from pdserve.router.balancer import LoadView, WorkerLoad
from pdserve.router.cluster import Cluster, WorkerHandle


class PoolLoads:
    """The prefill and decode pools' loads (``prefill_view``, ``decode_view``)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.prefill_view = LoadView()
        self.decode_view = LoadView()
        self.pushed: dict[str, dict[str, float]] = {}
        """Each worker's latest load as it pushed it (``on_load``), by worker id."""

    def refresh(self) -> None:
        """Install every worker's latest load (pushed, else its last polled stats)."""
        prefill, decode = [], []
        for h in self.cluster.workers.values():
            (prefill if h.role == "prefill" else decode).append(self.load_of(h))
        self.prefill_view.update(prefill)
        self.decode_view.update(decode)

    def on_load(self, worker_id: str, load: dict[str, float]) -> None:
        """A worker pushed its load (with its KV events): install it at once."""
        self.pushed[worker_id] = load
        h = self.cluster.workers.get(worker_id)
        if h is None:
            return
        view = self.prefill_view if h.role == "prefill" else self.decode_view
        view.set_one(self.load_of(h))

    def load_of(self, h: WorkerHandle) -> WorkerLoad:
        s: dict[str, float] = self.pushed.get(h.worker_id) or h.stats
        if h.role == "prefill":
            return WorkerLoad(
                h.worker_id, pending_prefill_tokens=int(s.get("pending_prefill_tokens", 0)),
                prefill_tokens_per_s=float(s.get("prefill_tokens_per_s", 0.0)), alive=h.alive,
                pull_bytes_per_s=float(s.get("pull_bytes_per_s", 0.0)))
        total = int(s.get("num_blocks", h.info.get("num_blocks", 0)))
        used = int(s.get("num_used_blocks", 0))
        return WorkerLoad(
            h.worker_id, free_blocks=total - used, total_blocks=total,
            running_seqs=int(s.get("num_running", 0)) + int(s.get("num_awaiting_kv", 0)),
            max_running_seqs=self.cluster.config.engine.scheduler.max_num_seqs, alive=h.alive)

    def missing_pools(self) -> list[str]:
        """Roles with no live worker in the balancer's view (refreshed from the handles when
        one looks empty, so that a replacement counts as soon as it is ready)."""
        missing = []
        for role, view in (("decode", self.decode_view), ("prefill", self.prefill_view)):
            if not self.alive(view.current()):
                self.refresh()
                if not self.alive(view.current()):
                    missing.append(role)
        return missing

    def alive(self, loads: list[WorkerLoad]) -> list[WorkerLoad]:
        """``loads`` of the workers alive now."""
        alive = {h.worker_id for h in self.cluster.workers.values() if h.alive}
        return [ld for ld in loads if ld.worker_id in alive]
