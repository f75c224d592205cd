"""The sampling options through the real service (router, prefill and decode workers, KV over
NIXL), on the shared test service: penalties, logit_bias, min_tokens and bad words give the
colocated engine's tokens; ``n`` > 1 is forked from ONE prefill (asserted from the workers'
prefill counters) and reproducible with a seed; batch prompts; stop options; chat template
options; ``param`` in errors; ``/tokenize``, ``/detokenize``, ``/version`` and their gRPC
equivalents.
"""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from typing import Any

import grpc
import pytest

from pdserve._version import __version__
from pdserve.engine.llm import LLM
from pdserve.engine.sampling import SamplingParams
from pdserve.protos.pdserve.v1 import generation_pb2 as pb
from pdserve.protos.pdserve.v1 import generation_pb2_grpc as pb_grpc
from pdserve_client import Client
from tests.service import SHARED_API_KEY as KEY
from tests.service import ServiceThread, shared_service

AUTH = (("authorization", f"Bearer {KEY}"),)


@pytest.fixture(scope="module")
def svc() -> ServiceThread:
    return shared_service("tiny")


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("tiny", device="cpu", dtype="float32", block_size=16)


def _post(svc: ServiceThread, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"{svc.http_url}{path}", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {KEY}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _get(svc: ServiceThread, path: str) -> dict[str, Any]:
    req = urllib.request.Request(f"{svc.http_url}{path}",
                                 headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _prompt(seed: int, n: int = 21) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 400) for _ in range(n)]


def test_penalties_bias_min_tokens_and_bad_words_through_the_service_equal_the_engine(
        svc, llm) -> None:
    prompt = _prompt(1)
    plain = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    first = plain.token_ids[0]
    word = svc.router.tokenizer.decode([first]).strip()
    cases = [
        {"repetition_penalty": 1.7, "presence_penalty": 1.0, "frequency_penalty": 0.5},
        {"logit_bias": {str(first): -100, "77": 5}},
        {"min_tokens": 5, "logit_bias": {str(svc.router.tokenizer.eos_token_id): 100}},
        {"bad_words": [word]} if word else {"allowed_token_ids": [5, 6, 7]},
    ]
    for extra in cases:
        status, body = _post(svc, "/v1/completions", {
            "model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "return_token_ids": True, **extra})
        assert status == 200, body
        got = body["choices"][0]["token_ids"]
        args = {k: v for k, v in extra.items() if k not in ("logit_bias", "bad_words")}
        if "logit_bias" in extra:
            args["logit_bias"] = tuple((int(k), float(v)) for k, v in
                                       extra["logit_bias"].items())
        if "bad_words" in extra:
            prepared = svc.call(lambda e=extra: svc.router.prepare(  # type: ignore[misc]
                "", prompt, _args(e)))
            args["bad_words_ids"] = prepared.params.bad_words_ids
            assert all(t != first for t in got)
        ref = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, **args))[0]
        assert got == ref.token_ids, extra
        assert got != plain.token_ids, extra
    # The EOS bias alone ends the output at once; min_tokens held it off for 5 tokens.
    bias = {k: v for k, v in cases[2].items() if k != "min_tokens"}
    _, early = _post(svc, "/v1/completions", {"model": "tiny", "prompt": prompt,
                                              "max_tokens": 12, "temperature": 0, **bias})
    _, held = _post(svc, "/v1/completions", {"model": "tiny", "prompt": prompt,
                                             "max_tokens": 12, "temperature": 0, **cases[2]})
    assert early["usage"]["completion_tokens"] < 5 <= held["usage"]["completion_tokens"]
    assert held["choices"][0]["finish_reason"] == "stop"


def _args(extra: dict[str, Any]):
    from pdserve.router.validation import SamplingArgs

    return SamplingArgs(max_tokens=12, temperature=0.0, bad_words=tuple(extra["bad_words"]))


def test_n4_is_forked_from_one_prefill_and_reproducible_with_a_seed(svc) -> None:
    prompt = _prompt(2, 37)  # never seen: no prefix cache hit anywhere
    before = svc.wait_idle()
    body = {"model": "tiny", "prompt": prompt, "n": 4, "seed": 1234, "temperature": 1.0,
            "max_tokens": 10, "ignore_eos": True, "return_token_ids": True}
    status, first = _post(svc, "/v1/completions", body)
    assert status == 200, first
    after = svc.wait_idle()
    computed = {w: after[w]["prefill_tokens_computed"] - before[w]["prefill_tokens_computed"]
                for w in after}
    roles = {w: after[w]["role"] for w in after}
    assert sum(c for w, c in computed.items() if roles[w] == "prefill") == len(prompt)
    assert sum(c for w, c in computed.items() if roles[w] == "decode") == 0
    choices = sorted(first["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    outputs = [tuple(c["token_ids"]) for c in choices]
    assert all(len(o) == 10 for o in outputs) and len(set(outputs)) > 1
    assert first["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 40,
                              "total_tokens": len(prompt) + 40,
                              "prompt_tokens_details": {"cached_tokens": 0}}
    status, again = _post(svc, "/v1/completions", body)
    assert [tuple(c["token_ids"]) for c in sorted(again["choices"], key=lambda c: c["index"])
            ] == outputs
    # Choice 0 is the request with its own seed: what n=1 with that seed gives.
    status, one = _post(svc, "/v1/completions", {**body, "n": 1})
    assert tuple(one["choices"][0]["token_ids"]) == outputs[0]


def test_greedy_forked_choices_equal_the_unforked_output_streamed_over_grpc(svc) -> None:
    prompt = _prompt(3, 32)  # the last prompt token ends a full block: it is copied too
    with Client(svc.target, api_key=KEY) as client:
        ref = client.generate(prompt, max_tokens=8, temperature=0.0, ignore_eos=True)
        got: dict[int, list[int]] = {}
        finished = []
        for chunk in client.stream(prompt, max_tokens=8, temperature=0.0, ignore_eos=True,
                                   sampling={"n": 3}):
            got.setdefault(chunk.index, []).extend(chunk.token_ids)
            if chunk.finish_reason:
                assert chunk.usage is not None
                finished.append((chunk.index, chunk.usage.completion_tokens))
    assert got == {i: list(ref.token_ids) for i in range(3)}
    assert sorted(finished) == [(0, 8), (1, 8), (2, 8)]
    stats = svc.wait_idle()
    assert all(s["num_used_blocks"] == 0 for s in stats.values())


def test_batch_prompts_give_one_choice_each(svc, llm) -> None:
    prompts = [_prompt(4, 9), "Once upon a time", _prompt(5, 14)]
    status, body = _post(svc, "/v1/completions", {"model": "tiny", "prompt": prompts,
                                                  "max_tokens": 6, "temperature": 0,
                                                  "return_token_ids": True})
    assert status == 200, body
    choices = sorted(body["choices"], key=lambda c: c["index"])
    refs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    assert [c["token_ids"] for c in choices] == [r.token_ids for r in refs]
    assert body["usage"]["completion_tokens"] == 18


def test_stop_echo_and_special_token_options(svc) -> None:
    base = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 24,
            "temperature": 0, "ignore_eos": True}
    _, plain = _post(svc, "/v1/completions", base)
    text = plain["choices"][0]["text"]
    stop = text[5:8]
    _, cut = _post(svc, "/v1/completions", {**base, "stop": [stop]})
    _, kept = _post(svc, "/v1/completions", {**base, "stop": [stop],
                                             "include_stop_str_in_output": True})
    assert kept["choices"][0]["text"] == cut["choices"][0]["text"] + stop
    _, echoed = _post(svc, "/v1/completions", {**base, "echo": True})
    assert echoed["choices"][0]["text"] == "Once upon a time" + text
    _, trunc = _post(svc, "/v1/completions", {**base, "truncate_prompt_tokens": 2,
                                              "max_tokens": 2})
    assert trunc["usage"]["prompt_tokens"] == 2


def test_chat_template_options(svc) -> None:
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello the"}]
    tok = svc.router.tokenizer
    base = {"model": "tiny", "messages": messages, "max_tokens": 1, "temperature": 0}
    _, cont = _post(svc, "/v1/chat/completions", {**base, "add_generation_prompt": False,
                                                  "continue_final_message": True})
    _, opened = _post(svc, "/v1/chat/completions", base)
    rendered = tok.apply_chat_template(messages, add_generation_prompt=False,
                                       continue_final_message=True)
    assert cont["usage"]["prompt_tokens"] == len(rendered)
    assert opened["usage"]["prompt_tokens"] == len(tok.apply_chat_template(messages))
    assert len(rendered) != len(tok.apply_chat_template(messages))
    status, err = _post(svc, "/v1/chat/completions", {**base, "chat_template": "{{ 1 }}"})
    assert status == 400 and err["error"]["param"] == "chat_template"


def test_errors_name_the_field_in_param(svc) -> None:
    for extra, param in (({"temperature": 500}, "temperature"), ({"best_of": 3}, "best_of"),
                         ({"guided_json": 5}, "guided_json"), ({"bogus": 1}, "bogus"),
                         ({"min_tokens": 50, "max_tokens": 4}, "min_tokens"),
                         ({"logit_bias": {"99999999": 1}}, "logit_bias"),
                         ({"priority": 2**40}, "priority"), ({"guided_regex": "(("},
                                                             "guided_regex"),
                         ({"response_format": {"type": "json_schema", "json_schema": {
                             "schema": {"type": "nonsense"}}}}, "response_format"),
                         ({"guided_choice": ["a"], "n": 2}, "n")):
        status, body = _post(svc, "/v1/completions", {"model": "tiny", "prompt": "Hi",
                                                      **extra})
        assert status == 400 and body["error"]["param"] == param, (extra, body)


def test_tokenize_detokenize_and_version_routes_and_grpc(svc) -> None:
    tok = svc.router.tokenizer
    status, body = _post(svc, "/tokenize", {"model": "tiny", "prompt": "Once upon a time",
                                            "return_token_strs": True})
    assert status == 200 and body["tokens"] == tok.encode("Once upon a time")
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"])
    assert body["max_model_len"] == svc.router.cluster.max_model_len()
    status, chat = _post(svc, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})
    assert chat["tokens"] == tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    status, text = _post(svc, "/detokenize", {"model": "tiny", "tokens": body["tokens"]})
    assert status == 200 and text["prompt"] == tok.decode(body["tokens"])
    status, bad = _post(svc, "/detokenize", {"tokens": [10**9]})
    assert status == 400 and bad["error"]["param"] == "tokens"
    assert _get(svc, "/version") == {"version": __version__}
    with Client(svc.target, api_key=KEY) as client:
        assert client.detokenize(body["tokens"]) == text["prompt"]
        assert client.version() == __version__
    with grpc.insecure_channel(svc.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        sampling = pb.SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.7,
                                     logit_bias={77: 5.0}, min_tokens=2)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(
                max_tokens=4, min_tokens=9)), metadata=AUTH))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "min_tokens" in info.value.details()
        msgs = list(stub.Generate(pb.GenerateRequest(text="Once upon a time",
                                                     sampling=sampling), metadata=AUTH))
    status, http = _post(svc, "/v1/completions", {
        "model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
        "repetition_penalty": 1.7, "logit_bias": {"77": 5.0}, "min_tokens": 2,
        "return_token_ids": True})
    assert [t for m in msgs for t in m.token_ids] == http["choices"][0]["token_ids"]


def test_prompt_logprobs_equal_transformers_and_echo_carries_them(svc) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(svc.router.model_path,
                                                 dtype=torch.float32).eval()
    prompt = _prompt(6, 19)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    for _ in range(2):  # the second time the prompt is in the prefix caches: still whole
        status, body = _post(svc, "/v1/completions", {
            "model": "tiny", "prompt": prompt, "max_tokens": 3, "temperature": 0,
            "prompt_logprobs": 2, "echo": True, "logprobs": 1})
        assert status == 200, body
        choice = body["choices"][0]
        got = choice["prompt_logprobs"]
        assert got[0] is None and len(got) == len(prompt)
        for i, token in enumerate(prompt[1:], 1):
            entry = got[i][str(token)]
            assert abs(entry["logprob"] - logp[i - 1, token].item()) < 1e-3
            assert entry["rank"] == int((logp[i - 1] > logp[i - 1, token]).sum()) + 1
            top = logp[i - 1].topk(2).indices.tolist()
            assert all(str(t) in got[i] for t in top)
        lps = choice["logprobs"]
        assert len(lps["tokens"]) == len(prompt) + 3
        assert lps["token_logprobs"][0] is None
        assert abs(lps["token_logprobs"][5] - logp[4, prompt[5]].item()) < 1e-3
    with grpc.insecure_channel(svc.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        msgs = list(stub.Generate(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=prompt),
            sampling=pb.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)),
            metadata=AUTH))
    lps_grpc = [lp for m in msgs for lp in m.prompt_logprobs]
    assert [lp.token_id for lp in lps_grpc] == prompt[1:]
    assert abs(lps_grpc[3].logprob - logp[3, prompt[4]].item()) < 1e-3
