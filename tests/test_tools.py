"""Tool calling: ``tools`` / ``tool_choice`` parsing, the constraint behind "required" and
named choices, the hermes parser on scripted model outputs, streamed ``tool_calls`` deltas
that reassemble to the non-streamed message, tool messages through the chat template, and
``tool_choice="required"`` / named through the running service (official ``openai``
client; any model: the arguments are held to the schema by structured output).
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from pdserve.engine.model.builtin import builtin_checkpoint
from pdserve.engine.tokenizer import Tokenizer
from pdserve.router.flow import Delta, RequestError
from pdserve.router.openai_tools import (
    ToolStream,
    apply_tool_calls,
    check_tool_parser,
    parse_hermes,
    parse_tools,
    tool_chunks,
    tool_constraint,
)
from pdserve.router.openai_types import parse_chat
from tests.service import SHARED_API_KEY, shared_service

pytestmark = pytest.mark.timeout(300)

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


# ------------------------------------------------------------------ pure


@pytest.mark.parametrize("body, words", [
    ({"tools": "x"}, "'tools'"),
    ({"tools": [{"type": "code"}]}, "'tools[0]'"),
    ({"tools": [{"type": "function", "function": {}}]}, "'tools[0].function.name'"),
    ({"tools": [WEATHER, WEATHER]}, "given twice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "'tool_choice'"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "'tool_choice.function.name'"),
    ({"tool_choice": "required"}, "needs 'tools'"),
])
def test_bad_tools_are_refused_naming_the_field(body: dict[str, Any], words: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_tools(body)
    assert info.value.code == "invalid_argument" and words in info.value.message


def test_auto_needs_a_parser_and_constraints_do_not_combine() -> None:
    req = parse_tools({"tools": TOOLS})
    assert req is not None and req.choice == "auto" and tool_constraint(req) is None
    with pytest.raises(RequestError, match="--tool-call-parser"):
        check_tool_parser(req, None)
    check_tool_parser(req, "hermes")
    with pytest.raises(RequestError, match="both constrain"):
        parse_chat({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                    "tool_choice": "required", "guided_regex": "a"})
    parsed = parse_chat({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                         "tool_choice": "required"})
    assert parsed.args.structured is not None and parsed.args.structured.kind == "json"
    schema = json.loads(parsed.args.structured.value)
    assert schema["minItems"] == 1 and "maxItems" not in schema  # parallel calls allowed
    one = parse_tools({"tools": TOOLS, "tool_choice": "required",
                       "parallel_tool_calls": False})
    assert one is not None
    constraint = tool_constraint(one)
    assert constraint is not None and json.loads(constraint.value)["maxItems"] == 1


def test_hermes_parser_on_scripted_outputs() -> None:
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
            '"Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>{"name": "get_time", '
            '"arguments": {"zone": "UTC"}}</tool_call>')
    content, calls = parse_hermes(text)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris",
                                                             "unit": "celsius"}
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert parse_hermes("no calls here") == ("no calls here", [])
    assert parse_hermes("<tool_call>not json</tool_call>")[1] == []


def _reassemble(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A streamed message rebuilt the way OpenAI's clients do."""
    content, calls, reason = "", {}, None
    for choice in chunks:
        d = choice["delta"]
        content += d.get("content") or ""
        for tc in d.get("tool_calls") or []:
            call = calls.setdefault(tc["index"], {"id": None, "type": None,
                                                  "function": {"name": "", "arguments": ""}})
            call["id"] = tc.get("id") or call["id"]
            call["type"] = tc.get("type") or call["type"]
            call["function"]["name"] += tc["function"].get("name") or ""
            call["function"]["arguments"] += tc["function"].get("arguments") or ""
        reason = choice["finish_reason"] or reason
    return {"content": content or None, "tool_calls": [calls[i] for i in sorted(calls)],
            "finish_reason": reason}


def _make_choice(text: str | None, finish: str | None, *_: Any, delta: bool) -> dict:
    return {"index": 0, "delta": {} if text is None else {"content": text},
            "finish_reason": finish}


@pytest.mark.parametrize("choice, pieces", [
    ("auto", ["Sure. <tool", "_call>{\"name\": \"get_time\", ", "\"arguments\": {\"zone\":",
              " \"CET\"}}</tool_call>"]),
    ("required", ['[{"name": "get_weather", "arguments": {"city": "Rome", ',
                  '"unit": "celsius"}}, {"name": "get_time", "arguments": {"zone": "UTC"}}]']),
    ({"type": "function", "function": {"name": "get_time"}}, ['{"zone"', ': "UTC"}']),
])
def test_streamed_deltas_reassemble_to_the_whole_message(choice: Any,
                                                         pieces: list[str]) -> None:
    req = parse_tools({"tools": TOOLS, "tool_choice": choice})
    assert req is not None
    whole = {"message": {"role": "assistant", "content": "".join(pieces)},
             "finish_reason": "stop"}
    apply_tool_calls(whole, req, "hermes")
    stream = ToolStream(req, "hermes")
    chunks: list[dict[str, Any]] = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        chunks += tool_chunks(stream, _make_choice,
                              Delta([1], piece, finish_reason="stop" if last else None))
    got = _reassemble(chunks)
    want = whole["message"]
    assert got["content"] == want["content"]
    assert got["finish_reason"] == whole["finish_reason"]
    assert [c["function"] for c in got["tool_calls"]] == [c["function"] for c in
                                                         want["tool_calls"]]
    assert all(c["id"] and c["type"] == "function" for c in got["tool_calls"])
    # The first delta of each call carries id, type and name (arguments ""); later ones
    # only arguments, in more than one fragment when the model wrote them over several
    # tokens (here: pieces), sent as they come, not at the end.
    first = [tc for c in chunks for tc in c["delta"].get("tool_calls", [])]
    assert "name" in first[0]["function"] and "id" in first[0]
    assert first[0]["function"]["arguments"] == "" and first[0]["type"] == "function"
    fragments = [tc["function"]["arguments"] for tc in first[1:]
                 if tc["index"] == 0 and "name" not in tc["function"]]
    assert len(fragments) >= 2 and all(fragments), fragments
    assert expected_reason(choice) == got["finish_reason"]
    assert all("id" not in tc for tc in first[1:] if tc["index"] == 0)


def _stream(req: Any, text: str, step: int) -> list[dict[str, Any]]:
    """``text`` streamed ``step`` characters per delta."""
    stream = ToolStream(req, "hermes")
    chunks: list[dict[str, Any]] = []
    for start in range(0, len(text), step):
        last = start + step >= len(text)
        chunks += tool_chunks(stream, _make_choice, Delta(
            [1], text[start:start + step], finish_reason="stop" if last else None))
    return chunks


@pytest.mark.parametrize("text", [
    ' Checking. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", '
    '"unit": "celsius"}}\n</tool_call> and <tool_call>{"arguments": {"zone": "UTC"}, '
    '"name": "get_time"}</tool_call> done. ',
    'Text <tool_call>not json</tool_call> more <tool_call>{"name": "get_time", '
    '"parameters": "{\\"zone\\": \\"CET\\"}"}</tool_call>',
    "< not a tag <tool_ and plain text",
    '<tool_call>{"name": "get_time"}</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Ro',  # cut short
])
def test_hermes_streamed_char_by_char_equals_the_whole_message(text: str) -> None:
    req = parse_tools({"tools": TOOLS})
    assert req is not None
    content, calls = parse_hermes(text)
    for step in (1, 3, 7, len(text)):
        got = _reassemble(_stream(req, text, step))
        assert got["content"] == content, (step, got)
        assert [c["function"] for c in got["tool_calls"]] == [c["function"] for c in calls]


def test_hermes_reads_arguments_in_any_key_order_and_keeps_bad_blocks_as_text() -> None:
    content, calls = parse_hermes(
        'A <tool_call>{"arguments": {"zone": "UTC"}, "name": "get_time"}</tool_call> '
        '<tool_call>{"nom": 1}</tool_call> B <tool_call>{"name": "get_time", "parameters": '
        '"{\\"zone\\": \\"CET\\"}"}</tool_call><tool_call>{"name": "f"}</tool_call>')
    assert content == 'A  <tool_call>{"nom": 1}</tool_call> B'
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] \
        == [("get_time", {"zone": "UTC"}), ("get_time", {"zone": "CET"}), ("f", {})]


def expected_reason(choice: Any) -> str:
    return "stop" if isinstance(choice, dict) else "tool_calls"


def test_tool_calls_and_results_render_through_the_chat_template() -> None:
    template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n"
        "{% endif %}{% for m in messages %}<{{ m.role }}>"
        "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} "
        "{{ c.function.arguments.city }}{% endfor %}{% endif %}"
        "{% if m.role == 'tool' %}RESULT[{{ m.tool_call_id }}] {% endif %}"
        "{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    body = {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}], "tools": TOOLS,
        "tool_choice": "none"}
    parsed = parse_chat(body)
    assert parsed.tools is not None and parsed.args.structured is None
    tok = Tokenizer(builtin_checkpoint("tiny"))
    ids = tok.apply_chat_template(parsed.messages, chat_template=template,
                                  tools=parsed.tools.template_tools)
    text = tok.decode(ids)
    assert "TOOLS:get_weather;get_time;" in text
    assert "CALL get_weather Paris" in text
    assert "RESULT[call_1] 21 C" in text


# ------------------------------------------------------------------ the service


@pytest.fixture(scope="module")
def client() -> openai.OpenAI:
    service = shared_service("tiny")
    return openai.OpenAI(base_url=f"{service.http_url}/v1", api_key=SHARED_API_KEY,
                         max_retries=0, timeout=120)


def test_required_returns_calls_with_arguments_valid_for_their_schema(
        client: openai.OpenAI) -> None:
    for seed in range(3):
        out = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=TOOLS, tool_choice="required", max_tokens=150, temperature=0.8, seed=seed,
            parallel_tool_calls=False)  # one call: a random model may go on adding more
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments),
                                SCHEMAS[call.function.name])


def test_named_choice_and_streamed_required_match_the_whole_message(
        client: openai.OpenAI) -> None:
    named = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Time?"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=60,
        temperature=0.0)
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_time"])
    kwargs: dict[str, Any] = dict(
        model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
        tool_choice="required", parallel_tool_calls=False, max_tokens=150, temperature=0.0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0].model_dump() for c in
              client.chat.completions.create(stream=True, **kwargs) if c.choices]
    got = _reassemble(chunks)
    assert got["finish_reason"] == whole.finish_reason == "tool_calls"
    # A header delta (id, type, name, arguments ""), then the arguments as they come (the
    # decode worker may send several tokens in one record: fragments are not per token).
    deltas = [tc for c in chunks for tc in (c["delta"].get("tool_calls") or [])]
    assert deltas[0]["id"] and deltas[0]["type"] == "function"
    assert deltas[0]["function"] == {"name": got["tool_calls"][0]["function"]["name"],
                                     "arguments": ""}
    assert all(not d["id"] and d["function"]["arguments"] for d in deltas[1:]), deltas
    assert [c["function"] for c in got["tool_calls"]] == [
        {"name": c.function.name, "arguments": c.function.arguments}
        for c in whole.message.tool_calls]


def test_auto_without_a_parser_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="tool-call-parser"):
        client.chat.completions.create(model="tiny", tools=TOOLS, max_tokens=5,
                                       messages=[{"role": "user", "content": "x"}])
