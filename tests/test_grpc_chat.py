"""The gRPC ``Chat`` call through a real service (router + 1 prefill + 1 decode worker, the
built-in tiny model) with the client SDK: tool calls for ``tool_choice`` "required", a named
function and "auto" (hermes parser), streamed deltas that reassemble to the final message
and equal the HTTP front's answer, refusals naming the field, and conversations with tool
calls and results rendered to the same prompt tokens as over HTTP.

A random tiny model writes no tool call of its own accord: "required" and named choices hold
its output to the tools' schemas (structured output), and the "auto" case scripts the model's
output with a guided choice of one string, a Hermes ``<tool_call>`` block, which the router's
hermes parser then reads like any model's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import grpc
import jsonschema
import openai
import pytest

import pdserve_client as pc
from pdserve.cli import TOOL_CALL_PARSERS, _router_config, build_parser
from pdserve.router.openai_tools import PARSERS
from tests.service import ServiceThread

pytestmark = pytest.mark.timeout(300)

KEY = "chat-test-key"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

# Renders every tool-related field, so that a field lost on the way shows in the prompt.
TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }}|"
    "{{ t.function.description }}|{{ t.function.parameters | tojson }};{% endfor %}\n"
    "{% endif %}{% if greeting is defined %}G:{{ greeting }}\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}{% if m.name %}:{{ m.name }}{% endif %}>"
    "{% for c in m.tool_calls or [] %}CALL {{ c.id }} {{ c.function.name }} "
    "{{ c.function.arguments | tojson }};{% endfor %}"
    "{% if m.role == 'tool' %}RESULT[{{ m.tool_call_id }}] {% endif %}"
    "{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")

HERMES = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
          '"unit": "celsius"}}\n</tool_call>')


@pytest.fixture(scope="module")
def service() -> Iterator[ServiceThread]:
    svc = ServiceThread("tiny", 1, 1, api_key=KEY, http=True, chat_template=TEMPLATE,
                        tool_call_parser="hermes")
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def client(service: ServiceThread) -> Iterator[pc.Client]:
    with pc.Client(service.target, api_key=KEY, timeout=120, retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def http(service: ServiceThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.http_url}/v1", api_key=KEY, max_retries=0,
                         timeout=120)


def _reassemble(chunks: list[pc.ChatChunk]) -> pc.ChatMessage:
    """A streamed message rebuilt from its deltas, as OpenAI's clients do."""
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for d in chunk.tool_calls:
            call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += d.id or ""
            call["name"] += d.name or ""
            call["arguments"] += d.arguments
    content = "".join(c.content for c in chunks)
    return pc.ChatMessage("assistant", content or None, tuple(
        pc.ToolCall(**calls[i]) for i in sorted(calls)))


def test_the_command_line_sets_the_tool_call_parser() -> None:
    assert TOOL_CALL_PARSERS == PARSERS
    base = ["serve", "--model", "tiny", "--port", "0", "--http-port", "0"]
    for extra, want in (([], None), (["--tool-call-parser", "hermes"], "hermes")):
        assert _router_config(build_parser().parse_args(base + extra)).tool_call_parser == want


def test_required_returns_calls_with_arguments_valid_for_their_schema(
        client: pc.Client) -> None:
    for seed in range(2):
        out = client.chat([{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
                          tool_choice="required", parallel_tool_calls=False, max_tokens=150,
                          temperature=0.8, seed=seed)
        assert out.finish_reason == "tool_calls", out
        (call,) = out.message.tool_calls
        assert call.id.startswith("call_") and out.message.content is None
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        assert out.usage is not None and out.usage.completion_tokens == len(out.token_ids)


def test_named_function_over_the_async_client(service: ServiceThread) -> None:
    async def main() -> pc.ChatCompletion:
        async with pc.AsyncClient(service.target, api_key=KEY, timeout=120) as c:
            return await c.chat([{"role": "user", "content": "Time?"}], tools=TOOLS,
                                tool_choice={"type": "function",
                                             "function": {"name": "get_time"}},
                                max_tokens=60, temperature=0.0)

    out = asyncio.run(main())
    (call,) = out.message.tool_calls
    assert call.name == "get_time" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_time"])
    assert out.finish_reason == "stop"  # a named choice is no model decision (OpenAI's)


def test_required_stream_reassembles_to_its_message_and_to_the_http_answer(
        client: pc.Client, http: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Weather?"}]
    chunks = list(client.chat_stream(messages, tools=TOOLS, tool_choice="required",
                                     parallel_tool_calls=False, max_tokens=150,
                                     temperature=0.0))
    last = chunks[-1]
    assert last.finish_reason == "tool_calls" and last.message is not None
    assert all(c.finish_reason is None and c.message is None for c in chunks[:-1])
    assert _reassemble(chunks) == last.message
    deltas = [d for c in chunks for d in c.tool_calls]
    assert deltas[0].id and deltas[0].name and deltas[0].arguments == ""
    assert all(d.id is None and d.name is None and d.arguments for d in deltas[1:])
    assert len(deltas) > 2  # the arguments came in fragments as generated
    whole = http.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                         tool_choice="required", parallel_tool_calls=False,
                                         max_tokens=150, temperature=0.0).choices[0]
    assert whole.finish_reason == last.finish_reason
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == [
        (c.name, c.arguments) for c in last.message.tool_calls]


def test_auto_reads_a_hermes_call_out_of_the_model_output(client: pc.Client,
                                                         http: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    guided = {"structured": {"choice": {"choices": [HERMES]}}}
    chunks = list(client.chat_stream(messages, tools=TOOLS, max_tokens=200, temperature=0.0,
                                     sampling=guided))
    last = chunks[-1]
    assert last.finish_reason == "tool_calls" and last.message is not None
    assert last.message.content == "Let me check."
    (call,) = last.message.tool_calls
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris", "unit": "celsius"}
    assert _reassemble(chunks) == last.message
    assert sum(len(c.token_ids) for c in chunks) == last.usage.completion_tokens  # type: ignore
    whole = http.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, max_tokens=200, temperature=0.0,
        extra_body={"guided_choice": [HERMES]}).choices[0]
    assert whole.message.content == last.message.content
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == [
        (c.name, c.arguments) for c in last.message.tool_calls]


def test_chat_without_tools_streams_its_text_as_content(client: pc.Client) -> None:
    chunks = list(client.chat_stream([{"role": "user", "content": "Hello"}], max_tokens=12,
                                     temperature=0.0, sampling={"ignore_eos": True}))
    last = chunks[-1]
    assert last.finish_reason == "length" and last.message is not None
    text = client.detokenize([t for c in chunks for t in c.token_ids])
    assert "".join(c.content for c in chunks) == text == last.message.content
    assert not last.message.tool_calls and not any(c.tool_calls for c in chunks)


def test_chat_choices_without_tools_each_end_with_their_own_message(client: pc.Client) -> None:
    chunks = list(client.chat_stream([{"role": "user", "content": "Hello"}], max_tokens=6,
                                     temperature=1.0, seed=3,
                                     sampling={"n": 2, "ignore_eos": True}))
    for index in (0, 1):
        mine = [c for c in chunks if c.index == index]
        assert [c.finish_reason for c in mine].count("length") == 1
        assert mine[-1].message is not None
        assert mine[-1].message.content == "".join(c.content for c in mine)
        assert sum(len(c.token_ids) for c in mine) == 6


@pytest.mark.parametrize("options, field", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{not json"}}]},
     "'tools[0].function.parameters'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "[1]"}}]},
     "'tools[0].function.parameters'"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]},
     "'tools[0].function.name'"),
    ({"tools": [WEATHER, WEATHER]}, "'tools[1].function.name'"),
    ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "nope"}}}}}],
      "tool_choice": "required"}, "'tools'"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "'tool_choice.function.name'"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "'tool_choice'"),
    ({"tool_choice": "required"}, "'tool_choice'"),
    ({"tools": TOOLS, "tool_choice": "required",
      "sampling": {"structured": {"regex": "a+"}}}, "'tool_choice'"),
    ({"tools": TOOLS, "tool_choice": "none", "sampling": {"n": 2}}, "'n'"),
    ({"chat_template_kwargs": {"messages": 1}}, "'chat_template_kwargs'"),
    ({"continue_final_message": True}, "'continue_final_message'"),
])
def test_bad_requests_are_invalid_argument_naming_the_field(
        client: pc.Client, options: dict[str, Any], field: str) -> None:
    with pytest.raises(pc.InvalidArgument) as info:
        list(client.chat_stream([{"role": "user", "content": "x"}], max_tokens=4, **options))
    assert field in info.value.message, info.value.message


def test_bad_messages_are_invalid_argument_naming_the_field(client: pc.Client) -> None:
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_time", "arguments": "{oops"}}
    with pytest.raises(pc.InvalidArgument, match=r"'messages\[1\]\.tool_calls\[0\]\."
                                                 r"function\.arguments' is not JSON"):
        client.chat([{"role": "user", "content": "x"},
                     {"role": "assistant", "content": "", "tool_calls": [call]}],
                    max_tokens=4)
    with pytest.raises(pc.InvalidArgument, match="'messages' must be a non-empty list"):
        client.chat([], max_tokens=4)


def test_a_conversation_with_tool_calls_renders_as_over_http(
        client: pc.Client, http: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "Be brief.", "name": "policy"},
        {"role": "user", "content": "Weather in Paris, and the time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}},
            {"id": "call_2", "type": "function", "function": {
                "name": "get_time", "arguments": '{"zone": "CET"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "14:05"}]
    kwargs = {"greeting": "hi", "n": 3}
    chunks = list(client.chat_stream(messages, tools=TOOLS, tool_choice="none", max_tokens=2,
                                     temperature=0.0, chat_template_kwargs=kwargs,
                                     sampling={"prompt_logprobs": 0}))
    whole = http.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=2,
        temperature=0.0, extra_body={"chat_template_kwargs": kwargs, "return_token_ids": True})
    http_ids = whole.model_extra["prompt_token_ids"]
    last = chunks[-1]
    assert last.usage is not None and last.usage.prompt_tokens == len(http_ids)
    # The prompt logprobs carry the prompt's tokens 1, 2, ... (the first has none).
    assert [lp.token_id for lp in chunks[0].prompt_logprobs] == http_ids[1:]
    text = client.detokenize(http_ids, skip_special_tokens=False)
    assert "G:hi" in text and "<system:policy>Be brief." in text
    assert 'CALL call_1 get_weather {"city": "Paris", "unit": "celsius"};' in text
    assert 'CALL call_2 get_time {"zone": "CET"};' in text
    assert "RESULT[call_1] 21 C" in text and "RESULT[call_2] 14:05" in text
    assert "TOOLS:get_weather|Weather in a city|" in text
    assert last.message is not None and last.message.content == whole.choices[0].message.content


def test_an_undecodable_chat_request_is_invalid_argument(service: ServiceThread) -> None:
    with grpc.insecure_channel(service.target) as channel:
        call = channel.unary_stream("/pdserve.v1.Generation/Chat",
                                    request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            list(call(b"\x12\xff\xff\xff", metadata=(("authorization", f"Bearer {KEY}"),),
                      timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pdserve.v1.ChatRequest" in info.value.details()


def test_random_chat_requests_are_answered_or_refused_clearly(service: ServiceThread,
                                                              client: pc.Client) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    codes: dict[grpc.StatusCode, int] = {}
    with grpc.insecure_channel(service.target) as channel:
        call = channel.unary_stream("/pdserve.v1.Generation/Chat",
                                    request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)

        @settings(max_examples=60, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.binary(max_size=512))
        def random_bytes(raw: bytes) -> None:
            # A trailing sampling {max_tokens: 2} keeps whatever the bytes spell short.
            try:
                list(call(raw + b"\x1a\x02\x08\x02",
                          metadata=(("authorization", f"Bearer {KEY}"),), timeout=60))
                code, message = grpc.StatusCode.OK, ""
            except grpc.RpcError as exc:
                code, message = exc.code(), exc.details() or ""
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), message
            assert "Traceback" not in message and len(message) <= 1000, message
            codes[code] = codes.get(code, 0) + 1

        random_bytes()
    assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0
    out = client.chat([{"role": "user", "content": "Still there?"}], max_tokens=3,
                      temperature=0.0)
    assert out.finish_reason in ("length", "stop")
