"""Markdown tables of an engine benchmark result (``pdserve.bench.engine``'s JSON)."""

from __future__ import annotations

from typing import Any

from pdserve.bench.common import markdown_table


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _fmt_target(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "-"
    mark = "ok" if entry["met"] else "MISSED"
    return f"{entry['value']:.2f} (>= {entry['target']:g}: {mark})"


def _runs(values: list[float | None] | None) -> str:
    if not values or len(values) < 2:
        return "-"
    return ", ".join(_num(v) for v in values)


def _throughput(result: dict[str, Any]) -> str | None:
    rows = []
    for dtype, res in result["results"].items():
        for name in ("a", "b"):
            w = res.get(name)
            if not w or "systems" not in w:
                continue
            systems, targets, ratios = w["systems"], w.get("targets", {}), w.get("ratios", {})

            def tps(s: str, systems: dict[str, Any] = systems) -> object:
                r = systems.get(s)
                if r is None:
                    return None
                return "error" if r["error"] else r["tokens_per_s"]

            def ratio(other: str, name: str = name, targets: dict[str, Any] = targets,
                      ratios: dict[str, Any] = ratios) -> str:
                key = f"pdserve/{other}"
                if f"{name} {key}" in targets:
                    return _fmt_target(targets[f"{name} {key}"])
                return _num(ratios.get(key))

            rows.append([
                dtype, name, w["requests"], w["output_tokens"], tps("pdserve"), tps("vllm"),
                tps("hf-static"), tps("hf-cb"), ratio("vllm"),
                _runs(w.get("run_ratios", {}).get("pdserve/vllm")),
                ratio("hf-static"), ratio("hf-cb"),
            ])
    if not rows:
        return None
    return markdown_table(
        ["dtype", "workload", "requests", "output tokens", "pdserve tok/s", "vllm tok/s",
         "hf-static tok/s", "hf-cb tok/s", "pdserve / vllm", "per run", "pdserve / hf-static",
         "pdserve / hf-cb"], rows)


def _prefix_caching(result: dict[str, Any]) -> list[str]:
    parts = []
    for kind, prefix, label in (("overlapping", "", "each request sent at the previous one's"
                                 " first token"), ("alone", "isolated_", "each request alone,"
                                 " the system prompt cached")):
        rows = []
        for dtype, res in result["results"].items():
            c = res.get("c")
            if not c:
                continue
            for system, figures in (("pdserve", c), ("vllm", c.get("vllm"))):
                if not figures or f"{prefix}on" not in figures:
                    continue
                key = f"{prefix}ttft_ratio"
                target = c.get("targets", {}).get(f"c {kind} ratio pdserve/vllm")
                rows.append([
                    dtype, system, figures[f"{prefix}on"]["requests"],
                    figures[f"{prefix}on"]["ttft_mean_s"] * 1e3,
                    figures[f"{prefix}off"]["ttft_mean_s"] * 1e3, _num(figures.get(key)),
                    _runs(figures.get(f"run_{key}s")),
                    _fmt_target(target) if system == "pdserve" else "",
                ])
        if rows:
            parts.append(f"Prefix caching, {label}:\n\n" + markdown_table(
                ["dtype", "system", "requests", "mean TTFT on ms", "mean TTFT off ms",
                 "off / on", "per run", "pdserve ratio / vllm ratio"], rows))
    rows = []
    for dtype, res in result["results"].items():
        c = res.get("c")
        if c and "prefill_excess" in c:
            met = "ok" if c["targets"]["c prefill excess"]["met"] else "MISSED"
            rows.append([dtype, c["on"]["prefill_tokens_computed"],
                         c["off"]["prefill_tokens_computed"], c["min_prefill_tokens"],
                         f"{c['prefill_excess']:+.2%} (<= 2%: {met})"])
    if rows:
        parts.append(markdown_table(
            ["dtype", "prefill tokens on", "prefill tokens off", "minimum", "on vs minimum"],
            rows))
    return parts


def _decode(result: dict[str, Any]) -> str | None:
    rows = []
    for dtype, res in result["results"].items():
        d = res.get("d")
        if not d:
            continue
        for r in d["rows"]:
            rows.append([dtype, r["batch"], d["context"], r["step_s"] * 1e3,
                         r["roofline_s"] * 1e3, f"{r['fraction']:.2f}", r["bound"],
                         r["tokens_per_s"], d["bandwidth_gbs"], d["peak_gflops"]])
    if not rows:
        return None
    return "Decode step against its roofline:\n\n" + markdown_table(
        ["dtype", "batch", "context", "step ms", "roofline ms", "fraction", "bound",
         "tok/s", "read GB/s", "matmul GFLOP/s"], rows)


def report(result: dict[str, Any]) -> str:
    """Markdown tables: throughput and ratios, prefix caching, decode roofline, MFU."""
    parts = [p for p in (_throughput(result),) if p]
    parts += _prefix_caching(result)
    decode = _decode(result)
    if decode:
        parts.append(decode)
    rows = []
    for dtype, res in result["results"].items():
        p = res.get("prefill")
        rows.append([
            dtype, res.get("matmul_peak_gflops"),
            p["prefill_tokens_per_s"] if p else None,
            p["model_gflops"] if p else None,
            f"{p['mfu']:.1%}" if p else None,
        ])
    if rows:
        parts.append(markdown_table(
            ["dtype", "matmul peak GFLOP/s", "prefill tok/s", "prefill model GFLOP/s",
             "prefill MFU"], rows))
    return "\n\n".join(parts)
