"""No request field is silently ignored: every field of OpenAI's completion and chat request
schemas, and vLLM's extra parameters, is implemented (parsing it changes the parsed request)
or refused with a 400 whose ``param`` names it; unknown fields are refused too; accepted
no-ops are listed in the README with their reason.

The field lists below are written from the public references (OpenAI's API reference for
``POST /v1/completions`` and ``POST /v1/chat/completions``; vLLM's "Extra Parameters" of its
OpenAI-compatible server), not from pdserve's catalogue, so that a field the catalogue
forgets fails here. Pure parsing: milliseconds, no service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pdserve.router import openai_types as oai
from pdserve.router import request_fields as rf
from pdserve.router.flow import RequestError

OPENAI_COMPLETION_FIELDS = (
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs",
    "max_tokens", "n", "presence_penalty", "seed", "stop", "stream", "stream_options",
    "suffix", "temperature", "top_p", "user",
)
OPENAI_CHAT_FIELDS = (
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions",
    "logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "metadata",
    "modalities", "n", "parallel_tool_calls", "prediction", "presence_penalty",
    "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
    "service_tier", "stop", "store", "stream", "stream_options", "temperature",
    "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity",
    "web_search_options",
)
VLLM_SAMPLING_EXTRAS = (  # both endpoints
    "use_beam_search", "top_k", "min_p", "repetition_penalty", "length_penalty",
    "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens",
    "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens",
    "prompt_logprobs", "allowed_token_ids", "bad_words", "logits_processors",
    "return_tokens_as_token_ids", "return_token_ids", "add_special_tokens", "request_id",
    "priority", "cache_salt", "kv_transfer_params", "vllm_xargs", "response_format",
    "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "guided_decoding_backend", "guided_whitespace_pattern", "echo",
)
VLLM_COMPLETION_EXTRAS = ("prompt_embeds",)
VLLM_CHAT_EXTRAS = (
    "add_generation_prompt", "continue_final_message", "chat_template",
    "chat_template_kwargs", "documents", "mm_processor_kwargs", "media_io_kwargs",
    "include_reasoning",
)

COMPLETION = {"model": "tiny", "prompt": "Hello"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}]}

# A value that uses each implemented field (parsing it must change the parsed request).
USE: dict[str, Any] = {
    "model": "other", "prompt": "Bye", "messages": [{"role": "user", "content": "Bye"}],
    "echo": True, "frequency_penalty": 0.5, "logit_bias": {"5": 3}, "logprobs": 2,
    "max_tokens": 3, "n": 2, "presence_penalty": 0.5, "seed": 7, "stop": ["x"],
    "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.5,
    "top_p": 0.5, "max_completion_tokens": 3, "top_k": 5, "min_p": 0.1,
    "repetition_penalty": 1.3, "stop_token_ids": [4], "include_stop_str_in_output": True,
    "ignore_eos": True, "min_tokens": 2, "skip_special_tokens": False,
    "truncate_prompt_tokens": 4, "allowed_token_ids": [3, 4], "bad_words": ["no"],
    "return_tokens_as_token_ids": True, "return_token_ids": True,
    "add_special_tokens": False, "request_id": "abc", "add_generation_prompt": False,
    "continue_final_message": True, "chat_template": "{{ messages }}",
    "chat_template_kwargs": {"enable_thinking": False}, "best_of": 2, "top_logprobs": 2,
    "prompt_logprobs": 2, "priority": 1, "response_format": {"type": "json_object"},
    "structured_outputs": {"regex": "a+"}, "guided_json": {"type": "object"},
    "guided_regex": "a+", "guided_choice": ["a", "b"], "guided_grammar": 'root ::= "x"',
    "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
    "parallel_tool_calls": False,
}
# What a client that does not use a refused field may still send.
NON_NEUTRAL: dict[str, Any] = {
    "best_of": 3, "suffix": "end", "store": True, "service_tier": "flex",
    "modalities": ["text", "audio"], "functions": [{"name": "f"}], "function_call": "auto",
    "use_beam_search": True, "length_penalty": 0.5, "spaces_between_special_tokens": False,
    "include_reasoning": False, "logits_processors": ["x.y"], "guided_whitespace_pattern": " ",
    "vllm_xargs": {"a": 1}, "documents": [{"text": "d"}], "mm_processor_kwargs": {"a": 1},
    "media_io_kwargs": {"a": 1},
}


def _parse(endpoint: str, extra: dict[str, Any]) -> oai.ParsedRequest:
    if endpoint == rf.COMPLETIONS:
        return oai.parse_completion({**COMPLETION, **extra})
    return oai.parse_chat({**CHAT, **extra})


def _value(name: str, endpoint: str) -> Any:
    if name == "logprobs" and endpoint == rf.CHAT:
        return True
    if name == "echo" and endpoint == rf.CHAT:
        return True
    return USE.get(name, NON_NEUTRAL.get(name, {"some": "value"}))


def _walk(endpoint: str, names: tuple[str, ...]) -> None:
    baseline = _parse(endpoint, {})
    for name in names:
        rule = rf.BY_NAME.get(name)
        assert rule is not None and endpoint in rule.endpoints, f"{name} is not catalogued"
        value = _value(name, endpoint)
        extra = {name: value}
        if name == "best_of":
            extra["n"] = value
        if name == "continue_final_message":
            extra["add_generation_prompt"] = False
        if name == "guided_decoding_backend":  # names the one backend; any other is refused
            assert _parse(endpoint, {"guided_json": {}, name: "xgrammar"}) == _parse(
                endpoint, {"guided_json": {}})
            with pytest.raises(RequestError) as info:
                _parse(endpoint, {"guided_json": {}, name: "outlines"})
            assert info.value.param == name
            continue
        tools = {"tools": USE["tools"]}
        needs = {"stream_options": {"stream": True}, "top_logprobs": {"logprobs": True},
                 "tool_choice": tools, "parallel_tool_calls": tools}
        if name in needs:  # only meaningful with another field: compare against that
            assert _parse(endpoint, {**extra, **needs[name]}) != _parse(endpoint, needs[name])
            continue
        if rule.status is rf.Status.IMPLEMENTED:
            parsed = _parse(endpoint, extra)
            assert parsed != baseline, f"{name}={value!r} changed nothing: ignored"
        elif rule.status is rf.Status.REFUSED:
            with pytest.raises(RequestError) as info:
                _parse(endpoint, extra)
            assert info.value.code == "invalid_argument"
            assert info.value.param == name, (name, info.value.message)
            assert name in info.value.message
        else:
            assert rule.status is rf.Status.NOOP and rule.reason
            assert _parse(endpoint, extra) == baseline


def test_every_openai_and_vllm_completion_field_is_implemented_or_refused() -> None:
    _walk(rf.COMPLETIONS, OPENAI_COMPLETION_FIELDS + VLLM_SAMPLING_EXTRAS
          + VLLM_COMPLETION_EXTRAS)


def test_every_openai_and_vllm_chat_field_is_implemented_or_refused() -> None:
    _walk(rf.CHAT, OPENAI_CHAT_FIELDS + VLLM_SAMPLING_EXTRAS + VLLM_CHAT_EXTRAS)


def test_the_catalogue_holds_nothing_beyond_the_references() -> None:
    known = {rf.COMPLETIONS: set(OPENAI_COMPLETION_FIELDS + VLLM_SAMPLING_EXTRAS
                                 + VLLM_COMPLETION_EXTRAS),
             rf.CHAT: set(OPENAI_CHAT_FIELDS + VLLM_SAMPLING_EXTRAS + VLLM_CHAT_EXTRAS)}
    for endpoint, names in known.items():
        assert set(rf.fields(endpoint)) == names


@pytest.mark.parametrize("endpoint", [rf.COMPLETIONS, rf.CHAT])
def test_unknown_and_other_endpoint_fields_are_refused_by_name(endpoint: str) -> None:
    other = "messages" if endpoint == rf.COMPLETIONS else "suffix"
    for name in ("temprature", "guided_jsn", other):
        with pytest.raises(RequestError) as info:
            _parse(endpoint, {name: 1})
        assert info.value.param == name and "unknown field" in info.value.message


def test_refused_fields_are_accepted_at_their_neutral_value() -> None:
    body = {**CHAT, "store": False, "service_tier": "auto", "modalities": ["text"],
            "tools": [], "tool_choice": "none", "use_beam_search": False,
            "length_penalty": 1.0, "include_reasoning": True, "priority": 0,
            "spaces_between_special_tokens": True, "response_format": None}
    assert oai.parse_chat(body) == oai.parse_chat(CHAT)


def test_type_errors_name_the_field_in_param() -> None:
    for name, value in (("temperature", "hot"), ("logit_bias", {"x": 1}),
                        ("bad_words", [1]), ("min_tokens", 1.5), ("stop", [3]),
                        ("chat_template_kwargs", {"messages": 1})):
        with pytest.raises(RequestError) as info:
            oai.parse_chat({**CHAT, name: value})
        assert info.value.param == name, name
    status, body = oai.error_body("invalid_argument", "x", "top_p")
    assert status == 400 and body["error"]["param"] == "top_p"


def test_every_accepted_no_op_is_in_the_readme_with_its_reason() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for rule in rf.RULES:
        if rule.status is rf.Status.NOOP:
            assert f"`{rule.name}`" in readme, rule.name
