"""Smoke test of the engine benchmark: every system and workload at a tiny scale."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pdserve.bench.common import Progress
from pdserve.bench.engine import (
    BenchOptions,
    Sizes,
    main,
    min_prefill_tokens,
    report,
    run_benchmark,
    workload_shared_prefix,
)

TINY_SIZES = Sizes(
    a_requests=2, a_prompt=16, a_output=4,
    b_requests=3, b_length_divisor=128, b_max_output=4,
    c_requests=3, c_prefix=32, c_suffix=8, c_output=2,
    mfu_prompts=2, mfu_prompt_len=16, hf_batch=2, matmul_n=128,
)


def test_min_prefill_tokens_counts_first_prompt_then_unique_suffixes() -> None:
    reqs = workload_shared_prefix(4, prefix_len=32, suffix_len=8, output_len=1, vocab=512, seed=0)
    assert min_prefill_tokens([r.prompt for r in reqs]) == 40 + 3 * 8
    # a repeated prompt still computes its last token
    assert min_prefill_tokens([[5, 6, 7], [5, 6, 7]]) == 4


def test_bench_engine_tiny_run_reports_every_figure() -> None:
    opts = BenchOptions(model="tiny", dtypes=("float32",), sizes=TINY_SIZES,
                        max_num_batched_tokens=64, threads=1)
    result = run_benchmark(opts, Progress("test", enabled=False))
    res = result["results"]["float32"]
    assert res["matmul_peak_gflops"] > 0
    assert res["prefill"]["prefill_tokens_per_s"] > 0
    assert 0 < res["prefill"]["mfu"] < 1
    for name, n in (("a", 2), ("b", 3)):
        w = res[name]
        assert w["requests"] == n
        for system in ("pdserve", "hf-static", "hf-cb"):
            r = w["systems"][system]
            assert r["error"] is None, (name, system, r["error"])
            assert r["tokens_per_s"] > 0 and r["wall_s"] > 0
            assert r["generated"] >= r["output_tokens"] == w["output_tokens"]
        assert w["systems"]["pdserve"]["generated"] == w["output_tokens"]
        assert set(w["ratios"]) == {"pdserve/hf-static", "pdserve/hf-cb"}
        assert all(v > 0 for v in w["ratios"].values())
    assert set(res["b"]["targets"]) == {"b pdserve/hf-static", "b pdserve/hf-cb"}
    c = res["c"]
    assert c["min_prefill_tokens"] == 40 + 2 * 8
    assert c["off"]["prefill_tokens_computed"] == 3 * 40
    assert c["on"]["prefill_tokens_computed"] >= c["min_prefill_tokens"]
    for label in ("on", "off"):
        assert c[label]["ttft_mean_s"] > 0 and c[label]["ttft_median_s"] > 0
    assert math.isfinite(c["ttft_ratio"]) and c["ttft_ratio"] > 0
    assert set(c["targets"]) == {"c ttft off/on", "c prefill excess"}
    text = report(result)
    assert "pdserve / hf-static" in text and "prefill MFU" in text
    json.dumps(result)  # JSON-ready


def test_bench_engine_cli_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    argv = ["--dtype", "float32", "--workloads", "a", "--systems", "pdserve",
            "--model", "tiny", "--threads", "1", "--json", str(out)]
    assert main(argv, sizes=TINY_SIZES) == 0
    data = json.loads(out.read_text())
    assert data["results"]["float32"]["a"]["systems"]["pdserve"]["tokens_per_s"] > 0
