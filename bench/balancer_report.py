"""Tables, targets and plots of the balancer harness's results (``pdserve.bench.balancer``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ORACLE = "oracle"
METRIC_KEYS = ("hit_rate", "ttft_mean", "ttft_p99", "imbalance")


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of the results (herding runs as extra rows)."""
    lines = [
        "| policy | routers | hit rate | pulled | saved | TTFT mean (s) | TTFT p99 (s) "
        "| imbalance | regret (s) | misrouted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(name: str, m: dict[str, Any]) -> str:
        return (
            f"| {name} | {m['routers']} | {m['hit_rate']:.3f} | {m['pulled_rate']:.3f} | "
            f"{m['saved_rate']:.3f} | {m['ttft_mean']:.3f} | "
            f"{m['ttft_p99']:.3f} | {m['imbalance']:.3f} | {m['regret_mean']:.4f} | "
            f"{m['misroute_rate']:.1%} |"
        )

    for name, m in results.items():
        lines.append(row(name, m))
    for name, m in results.items():
        if "herding" in m:
            lines.append(row(name, m["herding"]))
    return "\n".join(lines)


def check_targets(results: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's targets, each as 'PASS: ...' or 'FAIL: ...'."""
    out: list[str] = []
    if not all(p in results for p in ("prefix_aware", "round_robin", "least_loaded")):
        return out
    pa, rr, ll, orc = (results[p] for p in ("prefix_aware", "round_robin", "least_loaded", ORACLE))
    checks = [
        (
            f"prefix_aware hit rate {pa['hit_rate']:.3f} >= 0.9 x oracle {orc['hit_rate']:.3f}",
            pa["hit_rate"] >= 0.9 * orc["hit_rate"],
        ),
        (
            f"prefix_aware hit rate {pa['hit_rate']:.3f} >= 1.5 x round_robin {rr['hit_rate']:.3f}",
            pa["hit_rate"] >= 1.5 * rr["hit_rate"],
        ),
        (
            f"prefix_aware p99 TTFT {pa['ttft_p99']:.3f} s <= 1.1 x least_loaded "
            f"{ll['ttft_p99']:.3f} s",
            pa["ttft_p99"] <= 1.1 * ll["ttft_p99"],
        ),
    ]
    if "kv_pool" in results:
        kv = results["kv_pool"]
        checks += [
            (
                f"kv_pool tokens saved {kv['saved_rate']:.3f} >= 0.98 x oracle hit rate "
                f"{orc['hit_rate']:.3f}",
                kv["saved_rate"] >= 0.98 * orc["hit_rate"],
            ),
            (
                f"kv_pool mean TTFT {kv['ttft_mean']:.3f} s < prefix_aware {pa['ttft_mean']:.3f} s",
                kv["ttft_mean"] < pa["ttft_mean"],
            ),
        ]
    return [("PASS: " if ok else "FAIL: ") + text for text, ok in checks]


def plot(results: dict[str, dict[str, Any]], path: str | Path, title: str = "") -> None:
    """A PNG with one bar chart per metric, every policy and the oracle side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    labels = {
        "hit_rate": "prefix hit rate",
        "ttft_mean": "TTFT mean (s)",
        "ttft_p99": "TTFT p99 (s)",
        "imbalance": "busy max / mean",
    }
    fig, axes = plt.subplots(1, len(METRIC_KEYS), figsize=(4 * len(METRIC_KEYS), 3.6))
    for ax, key in zip(axes, METRIC_KEYS, strict=True):
        values = [results[n][key] for n in names]
        colors = ["tab:gray" if n == ORACLE else "tab:blue" for n in names]
        ax.bar(names, values, color=colors)
        ax.set_title(labels[key])
        ax.tick_params(axis="x", rotation=30)
        for i, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
