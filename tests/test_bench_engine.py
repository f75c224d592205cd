"""Smoke test of the engine benchmark: every system and workload at a tiny scale."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

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
    decode_batches=(1, 3), decode_context=40, decode_steps=2, bandwidth_mib=8,
)


def test_min_prefill_tokens_counts_first_prompt_then_unique_suffixes() -> None:
    reqs = workload_shared_prefix(4, prefix_len=32, suffix_len=8, output_len=1, vocab=512, seed=0)
    assert min_prefill_tokens([r.prompt for r in reqs]) == 40 + 3 * 8
    # a repeated prompt still computes its last token
    assert min_prefill_tokens([[5, 6, 7], [5, 6, 7]]) == 4


def test_bench_engine_tiny_run_reports_every_figure() -> None:
    opts = BenchOptions(model="tiny", dtypes=("float32",), sizes=TINY_SIZES,
                        max_num_batched_tokens=64, threads=1, huge_pages=False)
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
        assert [r["system"] for r in w["runs"]] == ["pdserve", "hf-static", "hf-cb"]
    assert set(res["b"]["targets"]) == {"b pdserve/hf-static", "b pdserve/hf-cb"}
    c = res["c"]
    assert c["min_prefill_tokens"] == 40 + 2 * 8
    assert c["off"]["prefill_tokens_computed"] == 3 * 40
    assert c["on"]["prefill_tokens_computed"] >= c["min_prefill_tokens"]
    for label in ("on", "off"):
        assert c[label]["ttft_mean_s"] > 0 and c[label]["ttft_median_s"] > 0
    assert math.isfinite(c["ttft_ratio"]) and c["ttft_ratio"] > 0
    assert set(c["targets"]) == {"c prefill excess"}  # the ratio targets need vLLM's
    d = res["d"]
    assert [r["batch"] for r in d["rows"]] == [1, 3]
    assert d["bandwidth_gbs"] > 0 and d["peak_gflops"] == res["matmul_peak_gflops"]
    for row in d["rows"]:
        assert row["step_s"] > 0 and 0 < row["fraction"] and row["bound"] in ("memory", "compute")
        assert row["kv_bytes"] == row["batch"] * 40 * 2 * 2 * 2 * 32 * 4  # tiny, fp32
        # Every row against the run's best bandwidth and peak (measured again after each
        # batch's steps), the ones reported.
        assert (row["bandwidth_gbs"], row["peak_gflops"]) == (d["bandwidth_gbs"],
                                                              d["peak_gflops"])
        assert row["roofline_s"] == pytest.approx(max(
            (row["weight_bytes"] + row["kv_bytes"]) / (d["bandwidth_gbs"] * 1e9),
            row["flops"] / (d["peak_gflops"] * 1e9)))
    assert res["prefill"]["peak_gflops"] == res["matmul_peak_gflops"]
    assert set(d["targets"]) == set()  # batch 64 was not measured
    text = report(result)
    assert "pdserve / hf-static" in text and "prefill MFU" in text
    assert "roofline" in text and "off / on" in text
    json.dumps(result)  # JSON-ready


def test_repeats_interleave_systems_and_keep_per_run_ratios() -> None:
    opts = BenchOptions(model="tiny", dtypes=("float32",), workloads=("a",),
                        systems=("pdserve", "hf-static"), sizes=TINY_SIZES, repeats=2,
                        max_num_batched_tokens=64, threads=1, huge_pages=False)
    a = run_benchmark(opts, Progress("test", enabled=False))["results"]["float32"]["a"]
    assert [(r["system"], r["run"]) for r in a["runs"]] == [
        ("pdserve", 0), ("hf-static", 0), ("pdserve", 1), ("hf-static", 1)]
    runs = a["systems"]["pdserve"]["runs_tokens_per_s"]
    assert len(runs) == 2 and a["systems"]["pdserve"]["tokens_per_s"] in runs
    per_run = a["run_ratios"]["pdserve/hf-static"]
    expected = [p / h for p, h in zip(runs, a["systems"]["hf-static"]["runs_tokens_per_s"],
                                      strict=True)]
    assert per_run == expected


def test_cli_refuses_vllm_without_its_python(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("PDSERVE_VLLM_PYTHON", raising=False)
    with pytest.raises(SystemExit):
        main(["--systems", "pdserve,vllm", "--model", "tiny"])
    assert "--vllm-python" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--systems", "pdserve,sglang"])
    assert "unknown system sglang" in capsys.readouterr().err



def test_bench_engine_cli_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    argv = ["--dtype", "float32", "--workloads", "a", "--systems", "pdserve",
            "--model", "tiny", "--threads", "1", "--huge-pages", "off", "--json", str(out)]
    assert main(argv, sizes=TINY_SIZES) == 0
    data = json.loads(out.read_text())
    assert data["results"]["float32"]["a"]["systems"]["pdserve"]["tokens_per_s"] > 0


def test_decode_step_is_timed_on_the_whole_batch_however_long_its_prefill() -> None:
    from pdserve.bench.roofline import measure_decode_step
    from pdserve.engine.config import EngineConfig, SchedulerConfig
    from pdserve.engine.engine import Engine

    # 16 prompts of 63 tokens through a 64-token budget: the first prompts decode for 15
    # steps while the last are prefilled; every timed step must still decode all 16.
    engine = Engine(EngineConfig(model="tiny", dtype="float32", device="cpu",
                                 detokenize=False,
                                 scheduler=SchedulerConfig(max_num_batched_tokens=64,
                                                           max_num_seqs=32)))
    seen: list[int] = []
    step = engine.step

    def counting_step():  # type: ignore[no-untyped-def]
        outputs = step()
        seen.append(len(outputs))
        return outputs

    engine.step = counting_step  # type: ignore[method-assign]
    assert measure_decode_step(engine, batch=16, context=64, steps=4) > 0
    assert seen[-4:] == [16] * 4
    assert not engine.has_unfinished()  # its requests are gone after


@pytest.mark.timeout(300)
def test_compile_eval_times_the_engines_layer_against_its_compiled_reference() -> None:
    from pdserve.bench.compile_eval import evaluate
    from pdserve.engine import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("the engine's C++ kernels are not built")
    (row,) = evaluate("small", "bfloat16", [4], threads=1, repeats=3)
    assert row["rows"] == 4 and row["compile_s"] > 0
    assert min(row["engine_us"], row["reference_us"], row["compiled_us"]) > 0
    # The compiled plain-torch layer computes what the engine's fused ops do (bf16 roundings).
    assert row["max_abs_diff"] < 0.1


def test_attention_kernel_bench_times_one_layer_cached_and_from_memory() -> None:
    from pdserve.bench.attention_kernel import decode_attention
    from pdserve.engine import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("the engine's C++ kernels are not built")
    row = decode_attention("smollm2", "bfloat16", batch=4, context=100, block_size=16,
                           layers=3, repeats=3)
    # 4 sequences x 100 tokens x 3 KV heads x 64 dims, keys and values, 2 bytes each.
    assert row["kv_bytes"] == 4 * 100 * 3 * 64 * 2 * 2
    for name in ("cached", "memory"):
        assert row[f"{name}_ms"] > 0
        assert row[f"{name}_gbs"] == pytest.approx(row["kv_bytes"] / row[f"{name}_ms"] / 1e6)
        assert row[f"{name}_ns_per_key_head"] == pytest.approx(
            row[f"{name}_ms"] * 1e6 / (4 * 100 * 3))
