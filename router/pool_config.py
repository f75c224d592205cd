"""What a router's pools are: how many workers of each role, their engine, where Ray places
them, their tensor-parallel degrees and, on one host, their cores. Pure configuration: no
Ray calls."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.engine.config import EngineConfig
from pdserve.kvtransfer.factory import check_transport
from pdserve.worker.affinity import plan_cpu_sets


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """How many workers of each role, and where Ray places them."""

    engine: EngineConfig
    num_prefill: int = 1
    num_decode: int = 1
    ray_address: str | None = None
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    prefill_resources: dict[str, float] = field(default_factory=dict)
    decode_resources: dict[str, float] = field(default_factory=dict)
    kv_host: str = "127.0.0.1"
    kv_transport: str = "nixl"  # "nixl" or "nccl" (torch.distributed: NCCL on GPU, gloo on CPU)
    lease_s: float = 30.0
    stream_kv: bool = True  # prefill writes KV chunk by chunk; False: all blocks at the end
    ping_interval_s: float = 0.5
    attach: bool = False
    """Serve the pools another router created (found by the directory), creating none."""
    keep_pool: bool = False
    """A detached pool stays when this router stops last (``pdserve stop`` removes it)."""
    supervisor_lease_s: float = 3.0
    """Detached pool: a router that has not heartbeated the directory for this long loses
    the duty of replacing dead workers to another router (and counts as gone when the last
    router decides whether to remove the pool)."""
    ping_timeout_s: float = 10.0
    start_timeout_s: float = 300.0
    prefill_tp: int | tuple[int, ...] = 1
    """Tensor-parallel ranks per prefill worker (Ray actors on one node): one degree for
    every worker, or one per worker (a pool may mix degrees: KV moves between any two)."""
    decode_tp: int | tuple[int, ...] = 1
    # Pin each worker to its own cores (pdserve.worker.affinity): None = only when this
    # router starts a local Ray, i.e. every worker runs on this host.
    pin_cpus: bool | None = None
    share_idle_cores: bool = True
    """Pinned workers of one host lend their cores to a partner while idle
    (``pdserve.worker.idle_cores``)."""

    def __post_init__(self) -> None:
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError(
                f"need at least one prefill and one decode worker, got {self.num_prefill} + "
                f"{self.num_decode}"
            )
        check_transport(self.kv_transport)
        check_tp_pair(self.prefill_tp, self.decode_tp, self.kv_transport)
        for flag, tp, n in (("--prefill-tp", self.prefill_tp, self.num_prefill),
                            ("--decode-tp", self.decode_tp, self.num_decode)):
            if not isinstance(tp, int) and len(tp) != n:
                raise ValueError(f"{flag} names {len(tp)} degrees for {n} workers: give one "
                                 "degree, or one per worker")

    def tp(self, role: str, index: int = 0) -> int:
        """The tensor-parallel degree of worker ``index`` of ``role``'s pool."""
        tp = self.prefill_tp if role == "prefill" else self.decode_tp
        return tp if isinstance(tp, int) else tp[index]

    def total_ranks(self) -> int:
        return (sum(self.tp("prefill", i) for i in range(self.num_prefill))
                + sum(self.tp("decode", i) for i in range(self.num_decode)))


def check_tp_pair(prefill_tp: int | tuple[int, ...], decode_tp: int | tuple[int, ...],
                  transport: str) -> None:
    """``ValueError`` unless ``--prefill-tp``/``--decode-tp`` are usable degrees. Every pair
    of degrees that splits the model's KV heads moves KV rank to rank over either
    ``transport`` (the engine refuses a degree the model's heads do not split over)."""
    degrees = [*((prefill_tp,) if isinstance(prefill_tp, int) else prefill_tp),
               *((decode_tp,) if isinstance(decode_tp, int) else decode_tp)]
    if not degrees or min(degrees) < 1:
        raise ValueError(f"tensor-parallel sizes must be at least 1, got --prefill-tp "
                         f"{prefill_tp} and --decode-tp {decode_tp}")


def plan_worker_cpus(cores: Sequence[int], cfg: PoolConfig) -> dict[str, tuple[int, ...]]:
    """Each worker's cores on this host (prefill workers first, then decode): one share per
    rank, so a tensor-parallel worker gets one for each of its ranks (and divides them
    between its rank processes). Empty when there are fewer cores than ranks."""
    ids = [("prefill", i) for i in range(cfg.num_prefill)]
    ids += [("decode", i) for i in range(cfg.num_decode)]
    shares = [(f"{role}-{i}", r) for role, i in ids for r in range(cfg.tp(role, i))]
    per_rank = plan_cpu_sets(cores, [f"{w}/{r}" for w, r in shares])
    sets: dict[str, tuple[int, ...]] = {}
    for w, r in shares:
        if f"{w}/{r}" in per_rank:
            sets[w] = sets.get(w, ()) + per_rank[f"{w}/{r}"]
    return sets
