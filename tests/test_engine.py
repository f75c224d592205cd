"""The engine end to end on CPU: exact against transformers, prefix caching, preemption,
disaggregation hooks, no leaks, clear errors."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pdserve.engine import LLM, SamplingParams, cpu_kernels
from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.engine import Engine
from pdserve.engine.model.loader import CheckpointError
from tests.checkpoints import hf_classes, make_hf_checkpoint

MAX_NEW = 8
PROMPT_LENGTHS = (1, 7, 16, 33, 100, 300)
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=0)

VARIANTS = {
    "llama3-rope": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "llama-mqa-tied": ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
}

# (block_size, max_num_batched_tokens, num_blocks): whole prompts; chunked prefill with
# small blocks; a block budget so small that running requests must be preempted.
ENGINE_SETUPS = {
    "whole": (16, 1024, None),
    "chunked": (8, 48, None),
    "preempting": (4, 96, 110),
}


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENGTHS]
    prompts.append(prompts[4][:64] + [rng.randrange(3, vocab) for _ in range(20)])  # shares 64
    return prompts


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def reference(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A random checkpoint and transformers' greedy tokens and logprobs for each prompt."""
    arch, overrides = VARIANTS[request.param]
    path = make_hf_checkpoint(arch, tmp_path_factory.mktemp(request.param), seed=7,
                              max_position_embeddings=512, eos_token_id=None, **overrides)
    _, model_cls = hf_classes(arch)
    model = model_cls.from_pretrained(path, dtype=torch.float32).eval()
    prompts = make_prompts(model.config.vocab_size)
    return path, prompts, [hf_greedy(model, prompt) for prompt in prompts]


@torch.no_grad()
def hf_greedy(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens for ``prompt`` and each one's logprob."""
    out = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
        return_dict_in_generate=True, pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item()
                for step, t in zip(out.logits, tokens, strict=True)]
    return tokens, logprobs


def engine_for(path: Path, setup: str, backend: str | None = None, **cache_kw) -> Engine:
    block_size, budget, num_blocks = ENGINE_SETUPS[setup]
    return Engine(EngineConfig(
        model=str(path), dtype="float32", device="cpu", detokenize=False,
        attention_backend=backend,
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, **cache_kw),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=16),
    ))


def run_all(engine: Engine, prompts: list[list[int]], tag: str = "r") -> list:
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}{i}", p, GREEDY)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[f"{tag}{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("setup", sorted(ENGINE_SETUPS))
def test_greedy_equals_transformers(reference, setup: str) -> None:
    path, prompts, expected = reference
    engine = engine_for(path, setup)
    outputs = run_all(engine, prompts)
    for out, (tokens, logprobs) in zip(outputs, expected, strict=True):
        assert out.token_ids == tokens
        ours = [lp.logprob for lp in out.logprobs]
        assert max(abs(a - b) for a, b in zip(ours, logprobs, strict=True)) < 1e-3
    stats = engine.stats()
    if setup == "preempting":
        assert stats.num_preemptions > 0
    assert stats.num_used_blocks == 0
    # The last prompt shares 64 tokens with an earlier one: prefix hits happened (the
    # second pass below hits on every prompt).
    again = run_all(engine, prompts, tag="again")
    assert [o.token_ids for o in again] == [t for t, _ in expected]
    assert engine.stats().prefix_hit_tokens > stats.prefix_hit_tokens
    assert engine.stats().num_used_blocks == 0


def test_shared_prefix_computes_only_the_suffix(reference) -> None:
    path, _, _ = reference
    engine = engine_for(path, "whole")
    rng = random.Random(3)
    shared = [rng.randrange(3, 100) for _ in range(200)]
    first = shared + [rng.randrange(3, 100) for _ in range(10)]
    second = shared + [rng.randrange(3, 100) for _ in range(25)]
    run_all(engine, [first], tag="a")
    before = engine.stats().prefill_tokens_computed
    (out,) = run_all(engine, [second], tag="b")
    computed = engine.stats().prefill_tokens_computed - before
    cached = (200 // 16) * 16  # the shared prefix's full blocks
    assert out.num_cached_tokens == cached
    assert computed == len(second) - cached
    # And the output is what a cold engine produces.
    cold = engine_for(path, "whole", enable_prefix_caching=False)
    (cold_out,) = run_all(cold, [second], tag="c")
    assert cold_out.token_ids == out.token_ids
    assert cold.stats().prefill_tokens_computed == len(second)


def test_decodes_sharing_a_prefix_attend_it_once_and_match_transformers(
    reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests on one cached 100-token system prompt decode in the same steps: the torch
    backend attends their shared blocks once per layer (cascade), and every token and
    logprob still equals transformers'."""
    import pdserve.engine.attention.torch_backend as torch_backend

    calls: list[int] = []
    real = torch_backend.cascade_decode_group

    def counted(query, *args, **kwargs):
        calls.append(query.shape[0])
        return real(query, *args, **kwargs)

    monkeypatch.setattr(torch_backend, "cascade_decode_group", counted)
    path, _, _ = reference
    rng = random.Random(11)
    shared = [rng.randrange(3, 100) for _ in range(100)]
    prompts = [shared + [rng.randrange(3, 100) for _ in range(n)] for n in (3, 1, 9, 17, 30)]
    engine = engine_for(path, "whole", backend="torch")
    outputs = run_all(engine, prompts[:1], tag="first") + run_all(engine, prompts[1:])
    assert calls and max(calls) == 4  # the four later requests, in one group
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outputs, strict=True):
        tokens, expected = hf_greedy(model, prompt)
        assert out.token_ids == tokens
        ours = [lp.logprob for lp in out.logprobs]
        assert max(abs(a - b) for a, b in zip(ours, expected, strict=True)) < 1e-3
    assert engine.stats().num_used_blocks == 0


def test_disaggregated_hooks_match_colocated(reference) -> None:
    """Prefill on one engine, copy its blocks into blocks another engine reserved, decode
    there: the tokens equal one engine doing both."""
    path, prompts, expected = reference
    prefill = engine_for(path, "chunked")
    decode = engine_for(path, "whole")
    params = GREEDY
    for i, prompt in enumerate(prompts):
        rid = f"pd{i}"
        reservation = decode.reserve(rid, prompt, params)
        assert reservation is not None
        prefill.add_request(rid, prompt, params, prefill_only=True)
        first = None
        while first is None:
            for out in prefill.step():
                if out.finished:
                    assert out.finish_reason == "prefill_done"
                    first = out
        assert prefill.stats().num_prefilled_held == 1
        skip = reservation.num_cached_tokens // 8
        src = torch.tensor(first.block_ids[skip:])
        # Block sizes differ (8 vs 16): copy token slots through a flat per-token view.
        src_kv = prefill.runner.kv_cache[src].transpose(1, 3).flatten(0, 1)
        dst_tokens = decode.runner.kv_cache.transpose(1, 3)  # [blocks, bs, 2, layers, ...]
        start = skip * 8
        for t in range(start, len(prompt)):
            dst_tokens[reservation.block_ids[t // 16], t % 16] = src_kv[t - start]
        prefill.release(rid)
        decode.commit_kv(rid, first.token_ids[0], first.logprobs[0])
        done = None
        while done is None:
            for out in decode.step():
                if out.finished:
                    done = out
        assert done.token_ids == expected[i][0]
    assert prefill.stats().num_used_blocks == 0
    assert decode.stats().num_used_blocks == 0


def test_abort_and_finish_mix_leaves_no_referenced_blocks(reference) -> None:
    path, prompts, _ = reference
    engine = engine_for(path, "chunked")
    for i, p in enumerate(prompts * 2):
        engine.add_request(f"m{i}", p, SamplingParams(max_tokens=12, temperature=0.8, seed=i))
    engine.reserve("held", prompts[3], GREEDY)
    engine.add_request("pre", prompts[2], GREEDY, prefill_only=True)
    for step in range(6):
        engine.step()
        if step == 2:
            assert engine.abort("m0") and engine.abort("m5") and engine.abort("m13")
            assert not engine.abort("nope")
    assert engine.stats().num_used_blocks > 0
    engine.abort("held")
    while engine.has_unfinished():
        engine.step()
    engine.release("pre")
    assert engine.stats().num_used_blocks == 0
    assert engine.stats().num_awaiting_kv == engine.stats().num_prefilled_held == 0


def test_seeded_sampling_is_reproducible_and_batch_independent(reference) -> None:
    path, prompts, _ = reference
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=20, seed=123)
    alone = engine_for(path, "whole")
    crowded = engine_for(path, "whole")
    for i, p in enumerate(prompts):
        crowded.add_request(f"x{i}", p, SamplingParams(max_tokens=10, temperature=1.0))
    crowded.add_request("seeded", prompts[2], params)
    alone.add_request("seeded-again", prompts[2], params)
    got = {}
    for eng in (crowded, alone):
        while eng.has_unfinished():
            for out in eng.step():
                if out.finished:
                    got[out.request_id] = out.token_ids
    assert got["seeded"] == got["seeded-again"]
    assert len(got["seeded"]) == 10


def test_seeded_request_resumed_from_its_output_continues_its_own_draws(reference) -> None:
    """A resumed request (its output so far ends its prompt, ``prompt_len`` says where) with
    a seed samples its next tokens as the uninterrupted request did: the generator starts
    past one draw per token already sampled."""
    path, prompts, _ = reference
    params = SamplingParams(max_tokens=16, temperature=50.0, seed=99)  # near uniform
    engine = engine_for(path, "whole")
    (whole,) = _run_one(engine, "whole", prompts[1], params)
    assert len(whole) == 16
    for done in (1, 7):
        resumed = replace(params, max_tokens=16 - done, prompt_len=len(prompts[1]))
        (rest,) = _run_one(engine, f"resumed{done}", prompts[1] + whole[:done], resumed)
        assert whole[:done] + rest == whole
    # Without the output's draws skipped the continuation differs (the check can fail).
    fresh = replace(params, max_tokens=9)
    (other,) = _run_one(engine, "fresh", prompts[1] + whole[:7], fresh)
    assert other != whole[7:]
    assert engine.stats().num_used_blocks == 0


def _run_one(engine: Engine, rid: str, prompt: list[int], params: SamplingParams) -> list:
    engine.add_request(rid, prompt, params)
    got = []
    while engine.has_unfinished():
        got += [out.token_ids for out in engine.step() if out.finished]
    return got


def test_sampler_argmax_takes_each_rows_first_maximum_like_torch_argmax() -> None:
    from pdserve.engine.sampler import argmax

    gen = torch.Generator().manual_seed(0)
    threads_before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for rows, vocab in ((1, 7), (16, 49152), (5, 1000), (3, 37)):
                ties = torch.randint(-2, 3, (rows, vocab), generator=gen).float()  # many ties
                nans = torch.randn(rows, vocab, generator=gen)
                nans[torch.rand(rows, vocab, generator=gen) < 0.01] = float("nan")
                nan_last = torch.randn(rows, vocab, generator=gen)
                nan_last[:, -1] = float("nan")  # past the last full SIMD vector (vocab 7, 37)
                flat = torch.full((rows, vocab), float("-inf"))
                zeros = torch.zeros(rows, vocab)
                zeros[:, ::3] = -0.0
                for x in (ties, nans, nan_last, flat, zeros, ties[::2], ties.t().contiguous().t(),
                          ties.to(torch.bfloat16), nans.to(torch.bfloat16),
                          ties.to(torch.float16), nan_last.to(torch.float16)):
                    assert torch.equal(argmax(x), x.argmax(dim=-1))
    finally:
        torch.set_num_threads(threads_before)
    assert argmax(torch.tensor([[1.0, 3.0, 3.0, 0.0]])).tolist() == [1]
    assert argmax(torch.tensor([[float("nan"), 3.0, float("nan")]])).tolist() == [0]


@pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels did not build")
def test_cpu_argmax_kernel_checks_its_input() -> None:
    op = torch.ops.pdserve_cpu.argmax_rows
    x = torch.randn(4, 100)
    assert torch.equal(op(x), x.argmax(dim=-1))
    with pytest.raises(RuntimeError, match="contiguous rows"):
        op(x.t())
    with pytest.raises(RuntimeError, match="at least one column"):
        op(torch.empty(4, 0))
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        op(torch.zeros(2, 3, dtype=torch.int32))


def test_builtin_tiny_text_generation_matches_transformers() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm = LLM(model="tiny", dtype="float32", device="cpu")
    prompt = "The quick brown fox jumps over the lazy dog"
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))
    path = llm.engine.model_path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == out.prompt_token_ids
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                         do_sample=False)
    ref_tokens = ref[0, ids.shape[1]:].tolist()
    eos = llm.engine.eos_token_ids
    if any(t in eos for t in ref_tokens):
        ref_tokens = ref_tokens[: next(i for i, t in enumerate(ref_tokens) if t in eos) + 1]
    assert out.token_ids == ref_tokens
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)


def test_stop_strings_are_excluded_and_never_streamed() -> None:
    llm = LLM(model="tiny", dtype="float32", device="cpu")
    base = llm.generate("Once upon a time", SamplingParams(max_tokens=24, temperature=0))[0]
    assert len(base.text) > 6
    stop = base.text[3:6]
    engine = llm.engine
    engine.add_request("s", "Once upon a time", SamplingParams(max_tokens=24, temperature=0,
                                                               stop=[stop]))
    streamed = ""
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            streamed += out.delta_text
            final = out
    assert final is not None and final.finish_reason == "stop" and final.stop_reason == stop
    assert final.text == base.text[: base.text.index(stop)]
    assert streamed == final.text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-3]}, "stop_token_ids"),
        ({"logprobs": 99}, "logprobs"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_prompts_are_refused_clearly(reference) -> None:
    path, _, _ = reference
    engine = engine_for(path, "whole")
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request("e", [], GREEDY)
    with pytest.raises(ValueError, match="leaves no room"):
        engine.add_request("long", [5] * 512, GREEDY)
    with pytest.raises(ValueError, match="exceeds the model's length"):
        engine.add_request("long2", [5] * 500, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="out of range"):
        engine.add_request("oov", [5, 10_000], GREEDY)
    engine.add_request("dup", [5, 6], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", [5, 6], GREEDY)
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        engine.add_request("text", "hello", GREEDY)


def test_broken_checkpoint_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither a built-in"):
        Engine(EngineConfig(model=str(tmp_path / "missing"), device="cpu"))
    path = make_hf_checkpoint("llama", tmp_path / "ck")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="safetensors"):
        Engine(EngineConfig(model=str(path), device="cpu"))


def test_plain_greedy_rows_take_logits_in_the_model_dtype_and_pick_the_same_tokens() -> None:
    """A batch whose rows only compare their logits (greedy, no logprobs, no processing)
    skips their float32 conversion; its tokens equal those of the same requests asking for
    logprobs, which take float32 logits, alone or mixed in one batch."""
    engine = Engine(EngineConfig(model="tiny", dtype="bfloat16", device="cpu",
                                 detokenize=False))
    dtypes: list[torch.dtype] = []
    execute = engine.runner.execute

    def execute_and_record(batch):
        result = execute(batch)
        if result.sampled:
            dtypes.append(result.logits.dtype)
        return result

    engine.runner.execute = execute_and_record
    prompts = make_prompts(engine.model_config.vocab_size, seed=3)[:6]
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    with_logprobs = replace(plain, logprobs=0)

    def run(params: list[SamplingParams]) -> list[list[int]]:
        dtypes.clear()
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            engine.add_request(f"q{i}", prompt, p)
        done = {}
        while engine.has_unfinished():
            done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        return [done[f"q{i}"] for i in range(len(prompts))]

    raw = run([plain] * len(prompts))
    assert set(dtypes) == {torch.bfloat16}
    assert run([with_logprobs] * len(prompts)) == raw
    assert set(dtypes) == {torch.float32}
    mixed = [plain if i % 2 else with_logprobs for i in range(len(prompts))]
    assert run(mixed) == raw
    assert set(dtypes) == {torch.float32}
