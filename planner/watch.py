"""``pdserve plan --watch``: read a running service's metrics, say which split it should move
to.

Two scrapes ``interval`` seconds apart (the router's ``GET /metrics``, or its gRPC
``GetStats``, which carries the same samples) give the request rate and the mean prompt and
output lengths of the traffic, and the live split (workers up per role). The planner then
searches the splits of the same number of workers for that traffic (a Poisson stream with
those means, or with the lengths of ``--trace`` when given) and prints the split it would
move to. With ``--json`` the answer is one JSON object per round, e.g.
``{"prefill_replicas": 3, "decode_replicas": 1, ...}``, for a controller that sets the
worker groups' replicas (deploy/helm/pdserve/README.md shows one for KubeRay).

Metric names are those of ``pdserve.router.metrics`` (``pdserve:requests_total``,
``pdserve:prompt_tokens_total``, ``pdserve:generation_tokens_total``,
``pdserve:worker_up``).
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from pdserve.planner.workload import Workload

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
FINISHED = ("stop", "length", "abort")


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples of a Prometheus text exposition: ``name{labels}`` -> value (labels as
    written, sorted), comments skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        key = m.group(1)
        if "{" in key:
            name, _, labels = key.partition("{")
            pairs = sorted(_LABEL.findall(labels.rstrip("}")))
            key = name + "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}" if pairs else name
        try:
            out[key] = float(m.group(2))
        except ValueError:
            continue
    return out


def _labels(key: str) -> dict[str, str]:
    return dict(_LABEL.findall(key.partition("{")[2]))


@dataclass(frozen=True, slots=True)
class Traffic:
    """What the service saw between two scrapes."""

    seconds: float
    requests: float
    prompt_tokens: float
    output_tokens: float
    prefill_workers: int
    decode_workers: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_prompt(self) -> float:
        return self.prompt_tokens / self.requests if self.requests else 0.0

    @property
    def mean_output(self) -> float:
        return self.output_tokens / self.requests if self.requests else 0.0


def _finished(samples: Mapping[str, float]) -> float:
    return sum(v for k, v in samples.items() if k.startswith("pdserve:requests_total")
               and _labels(k).get("outcome") in FINISHED)


def _workers(samples: Mapping[str, float], role: str) -> int:
    return sum(1 for k, v in samples.items() if k.startswith("pdserve:worker_up{")
               and _labels(k).get("role") == role and v > 0)


def traffic(before: Mapping[str, float], after: Mapping[str, float], seconds: float) -> Traffic:
    """The traffic between two scrapes (counters differenced; workers as of ``after``)."""

    def delta(name: str) -> float:
        return max(0.0, after.get(name, 0.0) - before.get(name, 0.0))

    return Traffic(seconds, max(0.0, _finished(after) - _finished(before)),
                   delta("pdserve:prompt_tokens_total"), delta("pdserve:generation_tokens_total"),
                   _workers(after, "prefill"), _workers(after, "decode"))


def scrape_http(url: str, api_key: str | None = None, timeout: float = 10.0
                ) -> dict[str, float]:
    """The samples of a ``/metrics`` URL (``api_key``: sent as a bearer token, for a router
    whose ``/metrics`` on its HTTP port needs the key)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 - user's URL
        return parse_prometheus(resp.read().decode("utf-8"))


def scrape_grpc(target: str, api_key: str | None = None) -> dict[str, float]:
    """The samples of the router's ``GetStats`` (needs the client SDK)."""
    from pdserve_client import Client

    with Client(target, api_key=api_key, retries=0) as client:
        return dict(client.stats().metrics)


def workload_for(t: Traffic, duration_s: float, seed: int = 0,
                 lengths: Workload | None = None) -> Workload:
    """A Poisson stream at the observed rate: lengths of ``lengths`` rescaled to the
    observed means, or geometric with those means."""
    rng = np.random.default_rng(seed)
    n = max(2, int(rng.poisson(t.rate * duration_s)))
    arrival = np.sort(rng.uniform(0, duration_s, n))
    if lengths is not None and len(lengths):
        pick = rng.integers(0, len(lengths), n)
        p = lengths.prompt_tokens[pick] * (t.mean_prompt / lengths.prompt_tokens.mean())
        o = lengths.output_tokens[pick] * (t.mean_output / lengths.output_tokens.mean())
    else:
        p = rng.geometric(1.0 / max(t.mean_prompt, 1.0), n)
        o = rng.geometric(1.0 / max(t.mean_output, 1.0), n)
    return Workload(arrival, np.maximum(1, np.rint(p)).astype(np.int64),
                    np.maximum(1, np.rint(o)).astype(np.int64), ((),) * n, 16,
                    f"observed {t.rate:.3g} req/s")


def watch(scrape: Callable[[], dict[str, float]], interval_s: float,
          on_round: Callable[[Traffic], None], rounds: int | None = None,
          sleep: Callable[[float], None] = time.sleep) -> None:
    """Scrape every ``interval_s`` and hand each interval's traffic to ``on_round``
    (``rounds`` times, forever if None)."""
    before = scrape()
    t0 = time.monotonic()
    done = 0
    while rounds is None or done < rounds:
        sleep(interval_s)
        after = scrape()
        t1 = time.monotonic()
        on_round(traffic(before, after, t1 - t0))
        before, t0 = after, t1
        done += 1
