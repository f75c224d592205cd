"""What one worker's engine steps, KV transfers and service overheads cost on some hardware:
the planner's cost model, read from a JSON file.

A costs file holds *measurements* (engine step times from ``pdserve.bench.costs`` on CPU or
``pdserve.bench.gpu`` on CUDA, the link rate from ``pdserve.bench.kvtransfer``) and the
planner fits its step model to them when the file is loaded:

    prefill step:  p0 + p1 * tokens + p2 * attention_pairs
                   attention_pairs = sum over the step's sequences of chunk * context
                                     + chunk * (chunk + 1) / 2   (causal, over cached context)
    decode step:   d0 + d1 * batch + d2 * context_tokens        (summed over the batch)

Each fit is a non-negative least squares on relative errors (a step of 1 ms matters as much
as one of 100 ms). ``overheads`` are what the service adds around the engine (router, RPCs,
token streaming, the workers' loops around their steps), measured on a running service
(see ``Overheads`` for each term); ``host`` describes workers sharing one
machine's cores (a CPU test box), absent for one accelerator per worker.

Pure Python and numpy; no torch. Bad files raise ``ValueError`` naming the field.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = "pdserve.planner.costs/1"
HARDWARE_DIR = Path(__file__).resolve().parent / "hardware"
"""The costs files shipped with the planner (``--costs NAME`` finds them by stem)."""


def attention_pairs(chunk: int, context: int) -> int:
    """Query-key pairs a chunk of ``chunk`` new tokens attends over ``context`` cached ones."""
    return chunk * context + chunk * (chunk + 1) // 2


@dataclass(frozen=True, slots=True)
class LinearFit:
    """``seconds = coef . features``, fitted by ``fit_nonnegative``."""

    coef: tuple[float, ...]
    max_rel_error: float
    """Largest |fit - measured| / measured over the points it was fitted on."""


def fit_nonnegative(features: np.ndarray, seconds: np.ndarray) -> LinearFit:
    """Non-negative least squares of ``seconds`` on ``features`` (rows: points), weighting
    each point by 1 / its value; exact for a handful of columns (every column subset is
    tried and the best all-non-negative solution kept)."""
    n_points, n_cols = features.shape
    if n_points == 0:
        raise ValueError("no measurements to fit")
    if np.any(seconds <= 0):
        raise ValueError("step times must be positive")
    w = 1.0 / seconds
    a = features * w[:, None]
    b = seconds * w
    best: tuple[float, np.ndarray] | None = None
    for k in range(n_cols, 0, -1):
        for cols in itertools.combinations(range(n_cols), k):
            sol, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if np.any(sol < 0):
                continue
            coef = np.zeros(n_cols)
            coef[list(cols)] = sol
            err = float(np.sum((a @ coef - b) ** 2))
            if best is None or err < best[0] - 1e-15:
                best = (err, coef)
    assert best is not None  # a single column with positive targets always fits
    coef = best[1]
    rel = np.abs(features @ coef - seconds) / seconds
    return LinearFit(tuple(float(c) for c in coef), float(rel.max()))


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """The engine configuration the step times were measured with (per worker)."""

    block_size: int = 16
    num_blocks: int = 4096
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 128


@dataclass(frozen=True, slots=True)
class Overheads:
    """Seconds the service adds around the engine steps, measured on a running service
    (``pdserve.bench.plan_check`` calibrates them on lightly loaded requests)."""

    admission_s: float = 0.0
    """Per request, before its prefill is sent: the router's admission and its decode
    reservation (one actor call). Measured: the median of the router's ``Timing.queue_s``."""
    router_cpu_s: float = 0.0
    """Per request, CPU seconds of the router's process to take it up and answer its first
    token (validation, hashing, balancing, its actor calls): the simulation serves requests
    one at a time for this long at admission, so that a burst queues at the router as it
    does for real, and the router takes a core meanwhile. Measured: the router process's
    CPU time over requests of one output token / their number."""
    router_admit_share: float = 1.0
    """Share of ``router_cpu_s`` spent admitting the request, before its prefill is sent (one
    request after another in a burst); the rest is spent on the prefill's answer (the
    first token, and what a request of one token costs at its end). Measured: the slope of a
    burst's sorted ``Timing.queue_s`` over their rank, over ``router_cpu_s``."""
    router_receive_share: float = 0.0
    """Share of ``router_cpu_s`` spent receiving the request, before its decode reservation
    goes out: the router takes every request of a burst in before it takes up the first
    reservation's answer (its event loop runs what is ready in order), so a burst's first
    admission comes this long per request of the burst later than a lone one. The
    admission's own work (``router_admit_share``) follows the reservation's answer.
    Measured: how much later than a lone request's the first admission of a burst comes
    (the intercept of its sorted ``Timing.queue_s`` over their rank), per other request of
    the burst, over ``router_cpu_s``."""
    router_token_s: float = 0.0
    """CPU seconds of the router's process per further streamed token: on a shared host, the
    simulation counts it as busy cores at the token rate of the moment (the decode batches
    over their step times), so that it weighs while a burst streams. Measured with
    ``router_step_s``."""
    router_step_s: float = 0.0
    """CPU seconds of the router's process per decode step's message of tokens (a decode
    worker sends the tokens of a step together), beyond ``router_token_s`` for each token
    in it; counted as that at the step rate of the moment. Measured with
    ``router_token_s``: the router's CPU over the lightly loaded requests (a token a step)
    and over replayed trace traffic (several a step), less ``router_cpu_s`` a request,
    fitted to their decode steps and further tokens."""
    request_s: float = 0.0
    """Per request, on its TTFT after the KV landed: the prefill call's trip and the first
    token's trip through the router to the client. Measured as what remains of the lightly
    loaded requests' median TTFT once the simulation (with every other term) has accounted
    for the rest."""
    answer_wait_s: float = 0.0
    """Per request, on its first token and the stream behind it, for each other request
    still waiting for its first token when its prefill answers: the answers of a burst cross
    the same processes (the prefill worker's event loop, Ray, the router's loop, the client)
    one after another. Measured as what remains of replayed trace traffic's median TTFT
    once the simulation with every other term accounts for the rest, per request
    waiting."""
    prefill_step_s: float = 0.0
    """Per prefill step, beyond the engine's step: the worker's loop around it (KV writes,
    transfer polling, KV event pushes) and what else a step costs in a burst. Measured: the
    prefill workers' loop CPU seconds per step (``pdserve:engine_hook_cpu_seconds_total`` /
    ``pdserve:engine_steps_total``), plus what remains of replayed trace traffic's median
    prefill time (router ``Timing.prefill_s``) once the simulation with every other term
    accounts for the rest, per step."""
    decode_join_s: float = 0.0
    """Per request joining a decode worker's batch: the worker's own work on it outside its
    steps (its reservation, its KV landing, its stream's start), which holds up the batch's
    next step. Measured as what remains of replayed trace traffic's median TPOT once the
    simulation with every other term accounts for the rest, per request joining."""
    decode_step_s: float = 0.0
    """Per decode step, beyond the engine's step (token batches to the router, polling, the
    worker's other threads on its core): the decode workers' loop CPU seconds per step, as
    ``prefill_step_s``, plus what remains of the lightly loaded requests' median TPOT once
    the simulation with every other term accounts for the rest."""


YIELD_FLOOR = 0.05
"""Share of the cores low-priority workers keep however busy the others are (what the
kernel's scheduler gives niceness 15 against 0, about 3.5%, rounded up)."""


@dataclass(frozen=True, slots=True)
class Host:
    """Workers sharing one machine's cores: a step runs ``stretch`` times slower while more
    threads are busy than there are cores."""

    cores: float
    threads_per_worker: float = 1.0
    background_threads: float = 0.0
    """Cores kept busy while requests are in flight by what the simulation does not run
    itself: the clients (a load generator on the same machine), Ray's daemons. (The router's
    work is ``Overheads.router_cpu_s``, a core while it works.)"""
    worker_background: float = 0.0
    """Cores each worker process keeps busy besides its steps, whatever it does: its
    engine loop's and transfer agent's polling, its Ray threads."""
    client_token_s: float = 0.0
    """CPU seconds per streamed token of what shares the cores outside the service (a load
    generator on the same machine reading the streams); added to the router's
    ``Overheads.router_token_s`` at the token rate of the moment."""
    client_step_s: float = 0.0
    """CPU seconds of what shares the cores outside the service per decode step whose
    tokens it reads (one wake-up for the tokens of a step, however many streams they go
    to); added to the router's ``Overheads.router_step_s`` at the step rate of the
    moment."""
    workers_yield: bool = False
    """The workers run at a lower priority than the router and the clients (Ray starts its
    worker processes at niceness 15, a driver keeps its own): the workers share the cores
    the others leave, rather than all sharing them alike."""

    def stretch(self, busy_workers: int, active: bool, busy_threads: int = 0,
                workers: int = 0, token_cores: float = 0.0) -> float:
        """How much slower than alone a step runs with ``busy_workers`` of ``workers``
        workers stepping, ``busy_threads`` other single-threaded processes of the service
        (the router) at work, and ``token_cores`` cores streaming tokens at the rate the
        decode steps would have alone (the rate, and so that load, falls by the stretch:
        ``s = demand / cores + token_cores / (s * cores)``, solved for ``s``)."""
        background = self.background_threads if active else 0.0
        if self.workers_yield:
            # The others take what they need first; the workers' steps, and the tokens they
            # stream (whose work falls with their rate: s = (workers + token_cores) /
            # left), share the rest.
            left = max(self.cores - busy_threads - background, YIELD_FLOOR * self.cores)
            demand = (busy_workers * self.threads_per_worker + workers * self.worker_background
                      + token_cores)
            return max(1.0, demand / left)
        background += workers * self.worker_background
        demand = busy_workers * self.threads_per_worker + busy_threads + background
        if token_cores <= 0.0:
            return max(1.0, demand / self.cores)
        stretch = (demand + (demand * demand + 4.0 * self.cores * token_cores) ** 0.5) / (
            2.0 * self.cores)
        return max(1.0, stretch)


@dataclass(frozen=True, slots=True)
class HardwareCosts:
    """One worker's costs on one kind of hardware, at one tensor-parallel degree ``tp``."""

    name: str
    prefill: LinearFit
    """Over (1, tokens, attention_pairs)."""
    decode: LinearFit
    """Over (1, batch, context_tokens)."""
    kv_bytes_per_token: int
    link_bytes_per_s: float
    link_latency_s: float = 0.0
    engine: EngineLimits = field(default_factory=EngineLimits)
    overheads: Overheads = field(default_factory=Overheads)
    host: Host | None = None
    tp: int = 1
    """GPUs per worker these costs were measured with (a worker is a TP group)."""
    source: str = ""

    def prefill_step_s(self, tokens: int, pairs: int) -> float:
        c = self.prefill.coef
        return c[0] + c[1] * tokens + c[2] * pairs + self.overheads.prefill_step_s

    def decode_step_s(self, batch: int, context_tokens: int) -> float:
        c = self.decode.coef
        return c[0] + c[1] * batch + c[2] * context_tokens + self.overheads.decode_step_s

    def transfer_s(self, tokens: int) -> float:
        """Seconds to move ``tokens`` tokens' KV from a prefill to a decode worker."""
        if self.link_bytes_per_s <= 0:
            return 0.0
        return self.link_latency_s + tokens * self.kv_bytes_per_token / self.link_bytes_per_s


def _num(obj: Mapping[str, Any], key: str, where: str, *, positive: bool = False,
         default: float | None = None) -> float:
    if key not in obj:
        if default is None:
            raise ValueError(f"{where}: missing {key!r}")
        return default
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}.{key} must be a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{where}.{key} must be {'positive' if positive else '>= 0'}, "
                         f"got {value}")
    return float(value)


def _points(data: Mapping[str, Any], key: str, cols: Sequence[str]) -> list[dict[str, float]]:
    rows = data.get(key)
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"costs: {key!r} must be a non-empty list of measured steps")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"costs: {key}[{i}] must be an object")
        out.append({c: _num(row, c, f"{key}[{i}]", positive=c == "ms") for c in cols})
    return out


def fit_prefill(points: Sequence[Mapping[str, float]]) -> LinearFit:
    """The prefill model fitted to ``{"tokens", "context", "ms"}`` points."""
    feats = np.array([[1.0, p["tokens"], attention_pairs(int(p["tokens"]), int(p["context"]))]
                      for p in points])
    return fit_nonnegative(feats, np.array([p["ms"] / 1000.0 for p in points]))


def fit_decode(points: Sequence[Mapping[str, float]]) -> LinearFit:
    """The decode model fitted to ``{"batch", "context", "ms"}`` points (``context`` per
    sequence)."""
    feats = np.array([[1.0, p["batch"], p["batch"] * p["context"]] for p in points])
    return fit_nonnegative(feats, np.array([p["ms"] / 1000.0 for p in points]))


def parse_costs(data: Mapping[str, Any], source: str = "") -> HardwareCosts:
    """A ``HardwareCosts`` from a costs file's JSON object (see the module docstring)."""
    if data.get("schema") != SCHEMA:
        raise ValueError(f"costs: 'schema' must be {SCHEMA!r}, got {data.get('schema')!r}")
    eng = data.get("engine", {})
    engine = EngineLimits(
        block_size=int(_num(eng, "block_size", "engine", positive=True, default=16)),
        num_blocks=int(_num(eng, "num_blocks", "engine", positive=True, default=4096)),
        max_num_batched_tokens=int(_num(eng, "max_num_batched_tokens", "engine", positive=True,
                                        default=512)),
        max_num_seqs=int(_num(eng, "max_num_seqs", "engine", positive=True, default=128)),
    )
    transfer = data.get("transfer", {})
    ov = data.get("overheads", {})
    overheads = Overheads(**{k: _num(ov, k, "overheads", default=0.0)
                             for k in ("admission_s", "router_cpu_s", "router_token_s",
                                       "router_step_s", "request_s", "answer_wait_s",
                                       "prefill_step_s", "decode_join_s",
                                       "decode_step_s")},
                          router_admit_share=_num(ov, "router_admit_share", "overheads",
                                                  default=1.0),
                          router_receive_share=_num(ov, "router_receive_share", "overheads",
                                                    default=0.0))
    if not 0.0 <= overheads.router_admit_share <= 1.0:
        raise ValueError("overheads.router_admit_share must be within [0, 1], got "
                         f"{overheads.router_admit_share}")
    if overheads.router_admit_share + overheads.router_receive_share > 1.0:
        raise ValueError("overheads.router_receive_share + router_admit_share must be at "
                         f"most 1, got {overheads.router_receive_share} + "
                         f"{overheads.router_admit_share}")
    host = None
    if data.get("host"):
        h = data["host"]
        host = Host(cores=_num(h, "cores", "host", positive=True),
                    threads_per_worker=_num(h, "threads_per_worker", "host", default=1.0),
                    background_threads=_num(h, "background_threads", "host", default=0.0),
                    worker_background=_num(h, "worker_background", "host", default=0.0),
                    client_token_s=_num(h, "client_token_s", "host", default=0.0),
                    client_step_s=_num(h, "client_step_s", "host", default=0.0),
                    workers_yield=bool(h.get("workers_yield", False)))
    return HardwareCosts(
        name=str(data.get("name", "unnamed")),
        prefill=fit_prefill(_points(data, "prefill_steps", ("tokens", "context", "ms"))),
        decode=fit_decode(_points(data, "decode_steps", ("batch", "context", "ms"))),
        kv_bytes_per_token=int(_num(data, "kv_bytes_per_token", "costs", positive=True)),
        link_bytes_per_s=_num(transfer, "link_bytes_per_s", "transfer", default=0.0),
        link_latency_s=_num(transfer, "latency_s", "transfer", default=0.0),
        engine=engine, overheads=overheads, host=host,
        tp=int(_num(data, "tp", "costs", positive=True, default=1)),
        source=source or str(data.get("source", "")),
    )


def resolve_costs_path(name_or_path: str) -> Path:
    """A path, or the stem of a file shipped in ``planner/hardware``."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = HARDWARE_DIR / f"{name_or_path}.json"
    if shipped.exists():
        return shipped
    names = ", ".join(sorted(p.stem for p in HARDWARE_DIR.glob("*.json")))
    raise FileNotFoundError(f"costs file {name_or_path!r} not found; give a path or one of: "
                            f"{names}")


def load_costs(name_or_path: str) -> HardwareCosts:
    """Read and fit a costs file (path or shipped name); ValueError for a bad one."""
    path = resolve_costs_path(name_or_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a costs file is a JSON object")
    try:
        return parse_costs(data, source=str(data.get("source", path.name)))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
