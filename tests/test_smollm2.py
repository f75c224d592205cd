"""SmolLM2-135M-Instruct, the built-in real model, for real.

The GGUF file is fetched once into the model cache (``builtin_checkpoint("smollm2")``, the
same cache every later run reuses). The offline engine's greedy tokens and logprobs equal
transformers' on the same dequantized weights; then ``pdserve serve --model smollm2`` runs as
a process, as a user starts it, and the official ``openai`` client, the ``pdserve`` CLI and
the gRPC SDK talk to it: the answer to the capital of France, the served name, 404s for
unknown models, the access and stats log lines, the vLLM-named metrics (parsed with
prometheus_client) and the Grafana dashboard's queries against what it exports. Structured
output on the real model: 50 JSON-schema requests, guided choices and regexes, on the
colocated engine and through the service, all obey their constraint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import numpy as np
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from pdserve.bench.structured_cases import CHOICES, REGEX, json_cases
from pdserve.engine import LLM, SamplingParams
from pdserve.engine.model.builtin import builtin_checkpoint
from pdserve.engine.ports import free_ports
from pdserve.engine.structured.spec import StructuredSpec
from pdserve_client import Client, NotFound
from tests.gguf_files import _GLOBAL, _LAYER
from tests.procs import Lines, stop_pids_using

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DASHBOARD = REPO / "deploy" / "grafana" / "pdserve-dashboard.json"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return builtin_checkpoint("smollm2")


# ------------------------------------------------------------------------ exactness


def _reference_model(path: Path) -> torch.nn.Module:
    """transformers' Llama with the file's weights: each tensor dequantized by the gguf
    package's reference, q/k rows restored by transformers' own GGUF tensor processor."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from pdserve.engine.model.gguf import read_gguf  # its offsets are checked in test_gguf

    g = read_gguf(path)
    meta = g.metadata
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    config = LlamaConfig(
        vocab_size=meta["llama.vocab_size"], hidden_size=meta["llama.embedding_length"],
        intermediate_size=meta["llama.feed_forward_length"],
        num_hidden_layers=meta["llama.block_count"], num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=meta["llama.context_length"],
        rms_norm_eps=meta["llama.attention.layer_norm_rms_epsilon"],
        rope_parameters={"rope_type": "default", "rope_theta": meta["llama.rope.freq_base"]},
        tie_word_embeddings="output.weight" not in g.tensors,
        bos_token_id=meta["tokenizer.ggml.bos_token_id"],
        eos_token_id=meta["tokenizer.ggml.eos_token_id"])
    to_hf = {v: k for k, v in _GLOBAL.items()}
    processor = LlamaTensorProcessor(config={"num_attention_heads": heads,
                                             "num_key_value_heads": kv_heads})
    data = np.memmap(path, dtype=np.uint8, mode="r")
    state = {}
    for name, info in g.tensors.items():
        raw = data[info.offset:info.offset + info.nbytes]
        if info.ggml_type != int(gguf.GGMLQuantizationType.F32):
            raw = raw.reshape(info.shape[0] if len(info.shape) > 1 else 1, -1)
        weights = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(info.ggml_type))
        weights = processor.process(weights.reshape(info.shape), name).weights
        if name in to_hf:
            hf = to_hf[name]
        else:
            _, layer, rest = name.split(".", 2)
            hf = f"model.layers.{layer}.{next(k for k, v in _LAYER.items() if v == rest)}"
        state[hf] = torch.from_numpy(np.array(weights, dtype=np.float32))  # a writable copy
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def llm(smollm2: Path) -> LLM:
    """The colocated engine on the real model (shared by this module's engine tests)."""
    return LLM(model=str(smollm2), dtype="float32", device="cpu", num_blocks=256)


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Single-threaded matmuls for this test: on a busy 2-core machine two OpenMP threads
    wait on each other at every GEMM (measured 50x slower than one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def test_greedy_tokens_and_logprobs_equal_transformers_on_the_same_weights(
        smollm2, llm, one_thread) -> None:
    prompts = [[{"role": "user", "content": text}] for text in (
        "What is the capital of France?", "Write a haiku about the sea.",
        "List three primary colours.")]
    tok = llm.tokenizer
    assert tok is not None
    ids = [tok.apply_chat_template(p) for p in prompts]
    outs = llm.generate(ids, SamplingParams(max_tokens=24, temperature=0, logprobs=0))
    ref = _reference_model(smollm2)
    eos = tok.eos_token_id
    for prompt_ids, out in zip(ids, outs, strict=True):
        gen = ref.generate(torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False,
                           eos_token_id=eos, pad_token_id=eos, output_logits=True,
                           return_dict_in_generate=True,
                           attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
        expected = gen.sequences[0, len(prompt_ids):].tolist()
        assert out.token_ids == expected, (tok.decode(out.token_ids), tok.decode(expected))
        ref_lp = [float(step[0].float().log_softmax(-1)[t])
                  for step, t in zip(gen.logits, expected, strict=True)]
        ours = [lp.logprob for lp in out.logprobs]
        assert np.abs(np.array(ours) - np.array(ref_lp)).max() < 1e-3
    assert "Paris" in outs[0].text


# ------------------------------------------------------------------------ the service


@dataclass(frozen=True)
class Served:
    grpc: str
    http: str
    logs: Lines


@pytest.fixture(scope="module")
def served(smollm2: Path) -> Iterator[Served]:
    """`pdserve serve --model smollm2 --http-port PORT` as its own process (free ports; its
    own Ray temp dir, so that it and its Ray are stopped alone)."""
    port, http_port = free_ports(2)
    temp = tempfile.mkdtemp(prefix="pdsm-", dir="/tmp")  # Ray's socket paths stay short
    env = {**os.environ, "RAY_TMPDIR": temp, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(BIN / "pdserve"), "serve", "--model", "smollm2", "--http-port", str(http_port),
         "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    logs = Lines(proc)
    try:
        assert logs.wait_for("pdserve: serving", timeout=240), logs.text()
        yield Served(f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}", logs)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        stop_pids_using(temp)
        shutil.rmtree(temp, ignore_errors=True)
    assert logs.wait_for("pdserve: stopped", timeout=1), logs.text()


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.http}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def metrics(served: Served) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of /metrics, parsed by prometheus_client: name -> labels -> value."""
    with urllib.request.urlopen(f"{served.http}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def total(samples: dict[str, dict], name: str, **labels: str) -> float:
    return sum(v for key, v in samples.get(name, {}).items()
               if labels.items() <= dict(key).items())


def test_the_openai_client_asks_the_capital_of_france(served, client) -> None:
    before = metrics(served)
    reply = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.model == "smollm2" and reply.choices[0].finish_reason == "stop"
    after = metrics(served)
    usage = reply.usage
    delta = lambda name, **kw: total(after, name, **kw) - total(before, name, **kw)  # noqa: E731
    m = {"model_name": "smollm2"}
    assert delta("vllm:prompt_tokens_total", **m) == usage.prompt_tokens
    assert delta("vllm:generation_tokens_total", **m) == usage.completion_tokens
    assert delta("vllm:request_success_total", finished_reason="stop", **m) == 1
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_time_per_output_token_seconds"):
        assert delta(f"vllm:{hist}_count", **m) == 1, hist
    assert delta("vllm:request_prompt_tokens_sum", **m) == usage.prompt_tokens
    assert 1 <= delta("vllm:inter_token_latency_seconds_count", **m) < usage.completion_tokens
    assert delta("pdserve:requests_total", outcome="stop") == 1  # pdserve's own, beside


def test_per_worker_engine_metrics_carry_vllm_labels(served) -> None:
    samples = metrics(served)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total"):
        engines = {dict(key).get("engine"): dict(key) for key in samples[name]}
        assert {"prefill-0", "decode-0"} <= set(engines), name
        assert engines["decode-0"] == {"model_name": "smollm2", "engine": "decode-0",
                                       "role": "decode"}
    assert total(samples, "vllm:num_requests_waiting", engine="router") == 0
    assert 0 <= total(samples, "vllm:kv_cache_usage_perc", engine="decode-0") <= 1


def test_the_served_name_lists_retrieves_and_unknown_models_are_404(served, client) -> None:
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    card = client.models.retrieve("smollm2")
    assert card.id == "smollm2" and card.model_extra["max_model_len"] == 8192
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert "'gpt-4o' does not exist" in missing.value.message
    with pytest.raises(openai.NotFoundError) as wrong:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=4)
    assert wrong.value.body["code"] == "model_not_found"
    with Client(served.grpc) as sdk:
        assert [m.id for m in sdk.list_models()] == ["smollm2"]
        with pytest.raises(NotFound, match="'gpt-4o' does not exist"):
            sdk.generate("Hello", model="gpt-4o", max_tokens=2)


def test_pdserve_generate_streams_a_real_answer(served) -> None:
    out = subprocess.run(
        [str(BIN / "pdserve"), "generate", "The capital of France is", "--target", served.grpc,
         "--max-tokens", "8"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The capital of France is") and "Paris" in out.stdout
    assert re.search(r"\[\d+ tokens, finish_reason=(length|stop)\]", out.stderr)


def test_the_dashboard_queries_only_metrics_pdserve_exports(served) -> None:
    exported = set(metrics(served))
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = {p["title"] for p in panels}
    assert {"KV transfer bytes / s", "Balancer decisions / s", "Worker load by role"} <= titles
    queried = set()
    for panel in panels:
        exprs = [t["expr"] for t in panel["targets"]]
        assert exprs, panel["title"]
        for expr in exprs:
            names = set(re.findall(r"\b((?:vllm|pdserve):[A-Za-z0-9_:]+)", expr))
            assert names, (panel["title"], expr)
            assert names <= exported, (panel["title"], sorted(names - exported))
            queried |= names
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    definition = variables["model_name"]["definition"]
    (variable_metric,) = re.findall(r"label_values\(([^,]+),", definition)
    assert variable_metric in exported
    assert {"vllm:time_to_first_token_seconds_bucket", "vllm:kv_cache_usage_perc",
            "pdserve:kv_transfer_bytes_total"} <= queried


def test_logs_name_each_request_the_startup_steps_and_the_load(served, client) -> None:
    client.completions.create(model="smollm2", prompt="Hello", max_tokens=3, temperature=0)
    logs = served.logs
    # Earlier tests' requests logged lines of their own: wait for this one's (3 tokens).
    assert logs.wait_for(" output=3 ", timeout=10), logs.text()
    (line,) = [ln for ln in logs.matching("pdserve.access") if " output=3 " in ln][-1:]
    assert re.search(r"request \w+ model=smollm2 status=length prompt=\d+ output=3 cached=\d+ "
                     r"ttft=\d+\.\d+s e2e=\d+\.\d+s prefill=prefill-0 decode=decode-0", line)
    for step in ("tokenizer and config read in", "Ray: started a local instance in",
                 "workers loaded the model and are ready in", "ready in"):
        assert logs.matching(step), step
    assert logs.wait_for("pdserve.stats: throughput:", timeout=15), logs.text()
    assert "Traceback" not in logs.text(500)


# ------------------------------------------------------------------------ structured output

STRUCTURED_MAX_TOKENS = 120  # the schemas bound every output well inside it


def _valid(schema: dict, text: str, finish: str | None) -> None:
    assert finish == "stop", (finish, text)
    jsonschema.validate(json.loads(text), schema)


def test_engine_structured_output_on_the_real_model(llm, one_thread) -> None:
    """50 JSON-schema requests (greedy and sampled), guided choices and regexes in one
    batch: every output obeys its constraint."""
    cases = json_cases()
    tok = llm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for _, p in cases]
    params = [SamplingParams(max_tokens=STRUCTURED_MAX_TOKENS, temperature=0.0 if i % 2
                             else 0.8, seed=i, structured=StructuredSpec.json_schema(s))
              for i, (s, _) in enumerate(cases)]
    for i in range(6):
        prompts.append(tok.apply_chat_template([{"role": "user", "content":
                                                 f"Is review {i} positive or negative?"}]))
        params.append(SamplingParams(max_tokens=8, temperature=1.0, seed=i,
                                     structured=StructuredSpec.choice(CHOICES)))
        prompts.append(tok.apply_chat_template([{"role": "user", "content":
                                                 f"Give product code number {i}."}]))
        params.append(SamplingParams(max_tokens=16, temperature=1.0, seed=i,
                                     structured=StructuredSpec("regex", REGEX)))
    outs = llm.generate(prompts, params)
    for (schema, _), out in zip(cases, outs[:len(cases)], strict=True):
        _valid(schema, out.text, out.finish_reason)
    rest = [o.text for o in outs[len(cases):]]
    assert all(t in CHOICES for t in rest[0::2]), rest
    assert all(re.fullmatch(REGEX, t) for t in rest[1::2]), rest


def test_service_structured_output_on_the_real_model(client) -> None:
    """The same through the disaggregated service (1 prefill + 1 decode worker: the prefill
    worker's first token obeys the grammar, the decode worker continues it), sent at once
    so that they batch: chat ``response_format`` and vLLM's fields on completions."""
    cases = json_cases()

    def one(i: int) -> tuple[str, str | None]:
        if i >= len(cases):  # guided choices and regexes
            k = i - len(cases)
            extra = {"guided_choice": CHOICES} if k % 2 else {"guided_regex": REGEX}
            out = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": f"Rate item {k}."}],
                max_tokens=16, temperature=1.0, seed=k, extra_body=extra)
            return out.choices[0].message.content, out.choices[0].finish_reason
        schema, prompt = cases[i]
        if i % 2 == 0:
            out = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": prompt}],
                max_tokens=STRUCTURED_MAX_TOKENS, temperature=0.8, seed=i,
                response_format={"type": "json_schema", "json_schema": {
                    "name": f"s{i}", "schema": schema, "strict": True}})
            return out.choices[0].message.content, out.choices[0].finish_reason
        extra = {"guided_json": schema} if i % 4 == 1 else {"structured_outputs":
                                                            {"json": schema}}
        out = client.completions.create(model="smollm2", prompt=prompt, temperature=0.0,
                                        max_tokens=STRUCTURED_MAX_TOKENS, extra_body=extra)
        return out.choices[0].text, out.choices[0].finish_reason

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(len(cases) + 12)))
    for (schema, _), (text, finish) in zip(cases, results[:len(cases)], strict=True):
        _valid(schema, text, finish)
    rest = [text for text, _ in results[len(cases):]]
    assert all(t in CHOICES for t in rest[1::2]), rest
    assert all(re.fullmatch(REGEX, t) for t in rest[0::2]), rest
