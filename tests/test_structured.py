"""Structured output (xgrammar): JSON schemas, json_object, guided_choice, regex and EBNF,
on the colocated engine and through the disaggregated service (HTTP with the official
``openai`` client, and gRPC), plus the request fields' parsing and the 400s.

The model is the built-in "tiny" checkpoint (random weights): whatever it prefers, the
grammar must hold every output to its constraint, which is what these tests assert (50
schema requests validated with ``jsonschema``). The shared service is the one the HTTP
tests use.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pytest

from pdserve.bench.structured_cases import CHOICES, REGEX, json_cases
from pdserve.engine import LLM, SamplingParams
from pdserve.engine.structured.spec import StructuredSpec
from pdserve.router.flow import RequestError
from pdserve.router.openai_structured import structured_output
from tests.service import SHARED_API_KEY, shared_service

pytestmark = pytest.mark.timeout(300)

MAX_TOKENS = 120


# ------------------------------------------------------------------ request fields (pure)


def test_response_format_and_vllm_fields_parse_to_one_spec() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert structured_output({"response_format": {"type": "text"}}) is None
    assert structured_output({}) is None
    assert structured_output({"response_format": {"type": "json_object"}}) == \
        StructuredSpec("json_object")
    want = StructuredSpec.json_schema(schema)
    assert structured_output({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema, "strict": True}}}) == want
    assert structured_output({"guided_json": schema}) == want
    assert structured_output({"guided_json": json.dumps(schema)}).kind == "json"
    assert structured_output({"structured_outputs": {"json": schema}}) == want
    assert structured_output({"guided_choice": ["a", "b"]}).choices() == ["a", "b"]
    assert structured_output({"structured_outputs": {"choice": ["x"]}}).choices() == ["x"]
    assert structured_output({"guided_regex": "a+"}) == StructuredSpec("regex", "a+")
    assert structured_output({"guided_grammar": 'root ::= "x"'}).kind == "grammar"
    assert structured_output({"guided_json": schema,
                              "guided_decoding_backend": "xgrammar"}) == want


@pytest.mark.parametrize("body, field", [
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a", 3]}, "guided_choice"),
    ({"guided_regex": 5}, "guided_regex"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
    ({"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"yaml": "x"}}, "structured_outputs.yaml"),
    ({"guided_decoding_backend": "outlines", "guided_regex": "a"},
     "guided_decoding_backend"),
    ({"guided_whitespace_pattern": " ", "guided_json": {}}, "guided_whitespace_pattern"),
])
def test_malformed_structured_fields_are_refused_naming_the_field(body: dict[str, Any],
                                                                   field: str) -> None:
    with pytest.raises(RequestError) as info:
        structured_output(body)
    assert info.value.code == "invalid_argument"
    assert f"'{field}'" in info.value.message


# ------------------------------------------------------------------ colocated engine


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="tiny", dtype="float32", device="cpu")


def _check_json(schema: dict[str, Any], text: str, finish: str | None) -> None:
    assert finish == "stop", (finish, text)
    jsonschema.validate(json.loads(text), schema)


def test_engine_fifty_json_schema_requests_all_validate(llm: LLM) -> None:
    cases = json_cases()
    assert len(cases) == 50
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0 if i % 2 else 0.9,
                             seed=i, structured=StructuredSpec.json_schema(schema))
              for i, (schema, _) in enumerate(cases)]
    outs = llm.generate([prompt for _, prompt in cases], params)
    for (schema, _), out in zip(cases, outs, strict=True):
        _check_json(schema, out.text, out.finish_reason)
    book = llm.engine.grammars
    assert book.compiler.compiled <= 10  # one compilation per distinct schema (cached)
    assert book.masked_rows >= sum(len(o.token_ids) for o in outs) - 50


def test_engine_json_keys_come_in_the_schema_order(llm: LLM) -> None:
    """Properties are generated in the order the schema lists them (as OpenAI's strict mode
    does), not sorted: the schema travels in its own key order."""
    props = {"zeta": {"type": "integer"}, "mid": {"type": "boolean"},
             "alpha": {"type": "string", "maxLength": 8}}
    schema = {"type": "object", "properties": props, "required": list(props),
              "additionalProperties": False}
    spec = StructuredSpec.json_schema(schema)
    assert list(json.loads(spec.value)["properties"]) == ["zeta", "mid", "alpha"]
    outs = llm.generate(["order"] * 3, [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8,
                                                       seed=i, structured=spec)
                                        for i in range(3)])
    for out in outs:
        _check_json(schema, out.text, out.finish_reason)
        assert list(json.loads(out.text)) == ["zeta", "mid", "alpha"], out.text


def test_engine_choice_regex_grammar_and_json_object(llm: LLM) -> None:
    n = 8
    choice = [SamplingParams(max_tokens=20, temperature=1.0, seed=i,
                             structured=StructuredSpec.choice(CHOICES)) for i in range(n)]
    regex = [SamplingParams(max_tokens=20, temperature=1.0, seed=i,
                            structured=StructuredSpec("regex", REGEX)) for i in range(n)]
    ebnf = [SamplingParams(max_tokens=20, temperature=1.0, seed=i, structured=StructuredSpec(
        "grammar", 'root ::= "(" [0-9] [0-9]? ")" | "none"')) for i in range(n)]
    obj = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, seed=i,
                          structured=StructuredSpec("json_object")) for i in range(2)]
    # (any JSON object is unbounded: a random model may still be inside one at max_tokens)
    params = choice + regex + ebnf + obj
    outs = llm.generate([f"Say something {i}" for i in range(len(params))], params)
    texts = [o.text for o in outs]
    assert all(t in CHOICES for t in texts[:n]), texts[:n]
    assert len(set(texts[:n])) > 1  # sampled, not a fixed answer
    assert all(re.fullmatch(REGEX, t) for t in texts[n:2 * n]), texts[n:2 * n]
    assert all(re.fullmatch(r"\([0-9]{1,2}\)|none", t) for t in texts[2 * n:3 * n])
    for out in outs[3 * n:]:
        assert out.text.startswith("{")
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
        else:
            assert out.finish_reason == "length" and len(out.token_ids) == MAX_TOKENS


def test_engine_unconstrained_requests_share_the_batch_unchanged(llm: LLM) -> None:
    plain = SamplingParams(max_tokens=12, temperature=0.0)
    alone = llm.generate(["Hello there"], plain)[0].token_ids
    mixed = llm.generate(["Hello there", "Hello there"], [
        plain, SamplingParams(max_tokens=12, temperature=0.0,
                              structured=StructuredSpec.choice(["yes", "no"]))])
    assert mixed[0].token_ids == alone
    assert mixed[1].text in ("yes", "no")


def test_engine_bad_grammar_fails_only_that_request(llm: LLM) -> None:
    outs = llm.generate(["a", "b"], [
        SamplingParams(max_tokens=5, structured=StructuredSpec("grammar", "root ::= ")),
        SamplingParams(max_tokens=5, temperature=0.0)])
    assert outs[0].finish_reason == "error" and "grammar" in (outs[0].error or "")
    assert outs[1].finish_reason == "length"


# ------------------------------------------------------------------ disaggregated service


@pytest.fixture(scope="module")
def client() -> openai.OpenAI:
    service = shared_service("tiny")
    return openai.OpenAI(base_url=f"{service.http_url}/v1", api_key=SHARED_API_KEY,
                         max_retries=0, timeout=120)


def test_service_fifty_json_schema_requests_all_validate(client: openai.OpenAI) -> None:
    cases = json_cases()

    def one(i: int) -> tuple[dict[str, Any], Any]:
        schema, prompt = cases[i]
        if i % 3 == 0:  # OpenAI's response_format on chat
            out = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": prompt}],
                max_tokens=MAX_TOKENS, temperature=0.7, seed=i,
                response_format={"type": "json_schema", "json_schema": {
                    "name": f"s{i}", "schema": schema, "strict": True}})
            choice = out.choices[0]
            return schema, (choice.message.content, choice.finish_reason)
        extra = ({"guided_json": schema} if i % 3 == 1
                 else {"structured_outputs": {"json": schema}})
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS,
                                        temperature=0.0 if i % 2 else 1.0, seed=i,
                                        extra_body=extra)
        return schema, (out.choices[0].text, out.choices[0].finish_reason)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(len(cases))))
    for schema, (text, finish) in results:
        _check_json(schema, text, finish)


def test_service_choice_and_regex_and_streaming(client: openai.OpenAI) -> None:
    def one(i: int) -> str:
        extra = {"guided_choice": CHOICES} if i % 2 else {"guided_regex": REGEX}
        out = client.completions.create(model="tiny", prompt=f"Item {i}:", max_tokens=20,
                                        temperature=1.0, seed=i, extra_body=extra)
        return out.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(16)))
    assert all(t in CHOICES for t in texts[1::2]), texts
    assert all(re.fullmatch(REGEX, t) for t in texts[0::2]), texts
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Sentiment?"}], max_tokens=20,
        stream=True, extra_body={"structured_outputs": {"choice": CHOICES}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text in CHOICES


def test_service_refuses_a_schema_the_backend_cannot_compile(client: openai.OpenAI) -> None:
    bad = [
        ({"guided_json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}},
         "JSON schema"),
        ({"guided_regex": "(unclosed"}, "regex"),
        ({"guided_grammar": "root ::= ("}, "grammar"),
        ({"guided_json": "{not json"}, "not valid JSON"),
    ]
    for extra, words in bad:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="tiny", prompt="x", max_tokens=5,
                                      extra_body=extra)
        assert words in info.value.message
        assert info.value.param == next(iter(extra))  # the field that carried it


def test_n_above_one_with_structured_output_or_tools_is_a_400_naming_n(
        client: openai.OpenAI) -> None:
    """Each forked choice would need its own grammar matcher and tool-call parser: the
    combination is refused (as vLLM users would see a 400), never served unconstrained."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}}
    for extra in ({"guided_choice": CHOICES}, {"response_format": {"type": "json_object"}}):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="tiny", prompt="x", max_tokens=5, n=2,
                                      extra_body=extra)
        assert info.value.param == "n" and "structured output" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                "content": "x"}],
                                       max_tokens=5, n=2, tools=[tool],
                                       tool_choice="required")
    assert info.value.param == "n" and "'tools'" in info.value.message
    # Either alone is served.
    out = client.completions.create(model="tiny", prompt="x", max_tokens=5, n=2,
                                    temperature=1.0, seed=1)
    assert sorted(c.index for c in out.choices) == [0, 1]
    out = client.completions.create(model="tiny", prompt="x", max_tokens=20,
                                    extra_body={"guided_choice": CHOICES})
    assert out.choices[0].text in CHOICES


def test_engine_refuses_n_above_one_with_structured_output() -> None:
    engine = _tiny_engine()
    params = SamplingParams(max_tokens=4, n=2, structured=StructuredSpec.choice(CHOICES))
    with pytest.raises(ValueError, match="'n' > 1"):
        engine.reserve("r", [1, 2, 3], params)
    assert engine.reserve("ok", [1, 2, 3], SamplingParams(max_tokens=4, n=2)) is not None


def test_grpc_structured_field() -> None:
    import grpc

    from pdserve.protos.pdserve.v1 import generation_pb2 as pb
    from pdserve.protos.pdserve.v1 import generation_pb2_grpc as pb_grpc

    service = shared_service("tiny")
    md = [("authorization", f"Bearer {SHARED_API_KEY}")]
    with grpc.insecure_channel(service.target) as channel:
        stub = pb_grpc.GenerationStub(channel)

        def text(sampling: pb.SamplingParams, prompt: str) -> str:
            replies = stub.Generate(pb.GenerateRequest(text=prompt, sampling=sampling),
                                    metadata=md, timeout=60)
            return "".join(r.text for r in replies)

        texts = []
        for i in range(4):
            sampling = pb.SamplingParams(max_tokens=20, temperature=1.0, seed=i)
            sampling.structured.choice.choices.extend(CHOICES)
            texts.append(text(sampling, f"x{i}"))
        assert all(t in CHOICES for t in texts), texts
        schema = json_cases()[3][0]
        sampling = pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
        sampling.structured.json_schema = json.dumps(schema)
        jsonschema.validate(json.loads(text(sampling, "json")), schema)
        bad = pb.SamplingParams(max_tokens=5)
        bad.structured.regex = "(("
        with pytest.raises(grpc.RpcError) as info:
            text(bad, "x")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "regex" in (info.value.details() or "")
        forked = pb.SamplingParams(max_tokens=5, n=2)
        forked.structured.choice.choices.extend(CHOICES)
        with pytest.raises(grpc.RpcError) as info:
            text(forked, "x")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'n'" in (info.value.details() or "")


def _tiny_engine() -> Any:
    from pdserve.engine.config import CacheConfig, EngineConfig
    from pdserve.engine.engine import Engine

    return Engine(EngineConfig(model="tiny", dtype="float32", device="cpu",
                               cache=CacheConfig(block_size=16, num_blocks=64)))


def test_disaggregated_hooks_and_resume_equal_the_colocated_engine(llm: LLM) -> None:
    """The prefill engine's first token obeys the grammar; the decode engine, which rebuilds
    the matcher from that token, continues to the same greedy output as one engine; a
    request resumed with part of its output in its prompt finishes it the same way."""
    import torch

    schema = json_cases()[30][0]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                            structured=StructuredSpec.json_schema(schema))
    prompt = llm.tokenizer.encode("Return the order as JSON:")
    want = llm.generate([prompt], params)[0]
    jsonschema.validate(json.loads(want.text), schema)

    prefill, decode = _tiny_engine(), _tiny_engine()
    reservation = decode.reserve("r", prompt, params)
    assert reservation is not None
    prefill.add_request("r", prompt, params, prefill_only=True)
    first = None
    while first is None:
        first = next((o for o in prefill.step() if o.finished), None)
    src = torch.tensor(first.block_ids)
    decode.runner.kv_cache[torch.tensor(reservation.block_ids)] = prefill.runner.kv_cache[src]
    prefill.release("r")
    assert first.token_ids[0] == want.token_ids[0]
    outs = [decode.commit_kv("r", first.token_ids[0])]
    while not outs[-1].finished:
        outs += [o for o in decode.step() if o.request_id == "r"]
    assert outs[-1].token_ids == want.token_ids
    assert decode.stats().num_used_blocks == 0

    k = len(want.token_ids) // 2
    resumed = llm.generate([prompt + want.token_ids[:k]], SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0,
        structured=StructuredSpec("json", params.structured.value, num_output_in_prompt=k)))
    assert resumed[0].token_ids == want.token_ids[k:]
