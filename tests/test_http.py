"""The OpenAI-compatible HTTP front against a real running service, with the official
``openai`` package as the client: streamed and whole completions and chat completions,
greedy output equal to the gRPC path's token for token, errors in OpenAI's shape with the
right status, and a client disconnect freeing every worker's blocks."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import replace

import openai
import pytest

from pdserve_client import Client
from tests.service import SHARED_API_KEY as KEY
from tests.service import ServiceThread, shared_service

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def svc() -> ServiceThread:
    return shared_service("tiny")


@pytest.fixture(scope="module")
def client(svc: ServiceThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{svc.http_url}/v1", api_key=KEY, max_retries=0,
                         timeout=60)


def _extra(obj: object, name: str) -> object:
    return (obj.model_extra or {}).get(name)  # type: ignore[attr-defined]


def test_streamed_chat_equals_the_grpc_path_token_for_token(svc, client) -> None:
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
        extra_body={"return_token_ids": True, "ignore_eos": True})
    tokens: list[int] = []
    text = ""
    roles, finishes, usages = [], [], []
    for chunk in stream:
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            tokens += _extra(choice, "token_ids") or []
            text += choice.delta.content or ""
            roles.append(choice.delta.role)
            finishes.append(choice.finish_reason)
    prompt = svc.router.tokenizer.apply_chat_template(MESSAGES)
    with Client(svc.target, api_key=KEY) as grpc_client:
        ref = grpc_client.generate(prompt, max_tokens=24, temperature=0.0, ignore_eos=True)
    assert tokens == list(ref.token_ids) and len(tokens) == 24
    assert text == ref.text
    assert roles[0] == "assistant" and finishes[-1] == "length"
    assert all(f is None for f in finishes[:-1])
    assert len(usages) == 1
    assert (usages[0].prompt_tokens, usages[0].completion_tokens) == (len(prompt), 24)


def test_whole_and_streamed_completions_agree_with_logprobs(client) -> None:
    whole = client.completions.create(model="tiny", prompt="The quick brown fox",
                                      max_tokens=12, temperature=0, logprobs=2,
                                      extra_body={"ignore_eos": True})
    (choice,) = whole.choices
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 12
    assert len(choice.logprobs.tokens) == 12 and len(choice.logprobs.text_offset) == 12
    assert all(len(top) <= 2 + 1 for top in choice.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    chunks = list(client.completions.create(model="tiny", prompt="The quick brown fox",
                                            max_tokens=12, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_seeded_sampling_and_stop_strings(client) -> None:
    def run(**kw: object) -> str:
        out = client.completions.create(model="tiny", prompt="Once upon a time",
                                        max_tokens=20, extra_body={"ignore_eos": True}, **kw)
        return out.choices[0].text

    assert run(temperature=0.9, top_p=0.9, seed=7) == run(temperature=0.9, top_p=0.9, seed=7)
    full = run(temperature=0)
    stop = full[4:7]
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20,
                                    temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == full[: full.index(stop)]


def test_every_served_name_lists_and_answers_under_its_own_name(client) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-alias"]
    assert client.models.retrieve("tiny-alias").id == "tiny-alias"
    replies = [client.completions.create(model=name, prompt="The quick brown fox", max_tokens=6,
                                         temperature=0, extra_body={"ignore_eos": True})
               for name in ("tiny", "tiny-alias")]
    assert [r.model for r in replies] == ["tiny", "tiny-alias"]
    assert replies[0].choices[0].text == replies[1].choices[0].text
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist"):
        client.models.retrieve("nope")


def test_models_health_and_error_shapes(svc, client) -> None:
    with urllib.request.urlopen(f"{svc.http_url}/health") as resp:
        assert resp.status == 200
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt="hi", max_tokens=5000)
    assert bad.value.status_code == 400 and "exceeds the model's length" in bad.value.message
    assert bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist") as missing:
        client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)
    assert missing.value.status_code == 404 and missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="'best_of'") as refused:
        client.completions.create(model="tiny", prompt="hi", best_of=3)
    assert refused.value.body["param"] == "best_of"
    wrong = openai.OpenAI(base_url=f"{svc.http_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        wrong.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert auth.value.status_code == 401
    request = urllib.request.Request(f"{svc.http_url}/v1/completions", data=b"{not json",
                                     headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(request)
    assert http_err.value.code == 400
    assert json.loads(http_err.value.read())["error"]["message"] == "the request body is not JSON"


def test_overload_is_429_and_no_decode_worker_is_503(svc, client) -> None:
    router = svc.router
    flow_config = router.flow.config
    router.flow.config = replace(flow_config, max_waiting=0)  # every admission is refused
    try:
        with pytest.raises(openai.RateLimitError) as over:
            client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert over.value.status_code == 429 and "retry later" in over.value.message
    finally:
        router.flow.config = flow_config
    decode = router.cluster.pool("decode")

    async def set_alive(alive: bool) -> None:
        for h in decode:
            h.alive = alive

    svc.call(lambda: set_alive(False))
    # With no decode worker a request waits for a replacement, up to the lease: shorten it.
    router.flow.config = replace(flow_config, lease_s=0.5)
    try:
        with pytest.raises(openai.APIStatusError) as down:
            client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert down.value.status_code == 503 and "no decode worker" in down.value.message
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(f"{svc.http_url}/health")
        assert health.value.code == 503
    finally:
        router.flow.config = flow_config
        svc.call(lambda: set_alive(True))
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices


def test_client_disconnect_mid_stream_frees_every_block(svc, client) -> None:
    cancelled = svc.router.outcomes.get("cancelled", 0)
    stream = client.completions.create(model="tiny", prompt="0123456789 " * 30,
                                       max_tokens=1500, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    received = 0
    for chunk in stream:
        received += len(chunk.choices[0].text) if chunk.choices else 0
        if received >= 5:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while svc.router.outcomes.get("cancelled", 0) == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert svc.router.outcomes.get("cancelled", 0) == cancelled + 1
    stats = svc.wait_idle()
    assert {w: s["num_used_blocks"] for w, s in stats.items()} == {w: 0 for w in stats}
    assert all(s["num_running"] == 0 and s["num_awaiting_kv"] == 0 for s in stats.values())
    assert not svc.router._active
