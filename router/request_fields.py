"""Every request field of the OpenAI-compatible HTTP front, in ONE catalogue.

A body field is either IMPLEMENTED (parsed and acted on by ``pdserve.router.openai_types``),
an accepted NO-OP (it cannot change what is generated; the README lists each with its
reason), or REFUSED (a 400 naming the field, with the reason). A refused field is still
accepted at its neutral value (``neutral``: what a client sends when it does not use the
feature, e.g. ``n: 1``-style defaults, ``null``, an empty list), so that clients which
always send their defaults keep working. A field that is in no entry is refused as unknown:
nothing a client sends is ever silently ignored.

Pure Python (no aiohttp, no router state). ``check_fields`` is run on every body before it
is parsed; adding a field is one entry here plus its parsing.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pdserve.engine.sampling_limits import show
from pdserve.router.flow import RequestError

COMPLETIONS = "completions"
CHAT = "chat"
BOTH = frozenset({COMPLETIONS, CHAT})


class Status(enum.Enum):
    IMPLEMENTED = "implemented"
    NOOP = "accepted no-op"
    REFUSED = "refused"


def _none(value: Any) -> bool:
    return value is None


def _empty(value: Any) -> bool:
    return value in (None, [], {}, "")


def _equals(*neutral: Any) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        return value is None or any(
            type(value) is type(n) and value == n for n in neutral
        ) or any(isinstance(n, float) and isinstance(value, int) and not isinstance(
            value, bool) and value == n for n in neutral)

    return check


@dataclass(frozen=True, slots=True)
class FieldRule:
    """One body field: its status, the endpoints it belongs to, why (for no-ops and
    refusals) and, for refused fields, which values mean "not used" (accepted)."""

    name: str
    status: Status
    endpoints: frozenset[str] = BOTH
    reason: str = ""
    neutral: Callable[[Any], bool] = _none


def _rule(name: str, status: Status, endpoints: frozenset[str] = BOTH, reason: str = "",
          neutral: Callable[[Any], bool] = _none) -> FieldRule:
    return FieldRule(name, status, endpoints, reason, neutral)


_I, _N, _R = Status.IMPLEMENTED, Status.NOOP, Status.REFUSED
_C, _H = frozenset({COMPLETIONS}), frozenset({CHAT})

RULES: tuple[FieldRule, ...] = (
    # ---------------------------------------------------------------- OpenAI, both
    _rule("model", _I),
    _rule("max_tokens", _I),
    _rule("temperature", _I),
    _rule("top_p", _I),
    _rule("n", _I),
    _rule("stream", _I),
    _rule("stream_options", _I),
    _rule("stop", _I),
    _rule("seed", _I),
    _rule("logprobs", _I),
    _rule("presence_penalty", _I),
    _rule("frequency_penalty", _I),
    _rule("logit_bias", _I),
    _rule("user", _N, reason="an end-user id for the provider's abuse monitoring; pdserve "
          "keeps no per-user records and generation does not depend on it"),
    # ---------------------------------------------------------------- OpenAI completions
    _rule("prompt", _I, _C),
    _rule("echo", _I, BOTH),  # vLLM's chat ``echo`` too
    # best_of: accepted equal to 'n' (the same thing); any other value is refused.
    _rule("best_of", _I, _C),
    _rule("suffix", _R, _C, "'suffix' (fill-in-the-middle) is not implemented: the served "
          "models have no infill template", _empty),
    # ---------------------------------------------------------------- OpenAI chat
    _rule("messages", _I, _H),
    _rule("max_completion_tokens", _I, _H),
    _rule("top_logprobs", _I, _H),
    _rule("metadata", _N, _H, "tags for stored completions; pdserve stores nothing "
          "(see 'store') and generation does not depend on them"),
    _rule("store", _R, _H, "'store' (keep the completion for distillation or evals) is not "
          "available: pdserve stores no completions", _equals(False)),
    _rule("service_tier", _R, _H, "pdserve has one service tier; 'service_tier' may only be "
          "'auto' or 'default'", _equals("auto", "default")),
    _rule("prompt_cache_key", _N, _H, "a routing hint for the provider's prompt cache; "
          "pdserve's router already routes each prompt by its own cached prefix blocks"),
    _rule("safety_identifier", _N, _H, "an end-user id for the provider's abuse monitoring; "
          "pdserve keeps no per-user records and generation does not depend on it"),
    _rule("modalities", _R, _H, "the served models generate text only; 'modalities' may "
          "only be [\"text\"]", _equals(["text"])),
    _rule("audio", _R, _H, "audio output is not available: the served models generate "
          "text only"),
    _rule("prediction", _R, _H, "predicted outputs ('prediction') are not implemented"),
    _rule("reasoning_effort", _R, _H, "'reasoning_effort' is not available: no reasoning "
          "parser is configured for the served model"),
    _rule("verbosity", _R, _H, "'verbosity' is not available for the served model"),
    _rule("web_search_options", _R, _H, "web search is not available"),
    _rule("functions", _R, _H, "'functions' is the deprecated form of 'tools'", _empty),
    _rule("function_call", _R, _H, "'function_call' is the deprecated form of "
          "'tool_choice'", _equals("none")),
    # Structured output (xgrammar) and tool calling.
    _rule("response_format", _I),
    _rule("tools", _I, _H),
    _rule("tool_choice", _I, _H),
    _rule("parallel_tool_calls", _I, _H),
    # ---------------------------------------------------------------- vLLM extras, both
    _rule("top_k", _I),
    _rule("min_p", _I),
    _rule("repetition_penalty", _I),
    _rule("min_tokens", _I),
    _rule("bad_words", _I),
    _rule("allowed_token_ids", _I),
    _rule("stop_token_ids", _I),
    _rule("include_stop_str_in_output", _I),
    _rule("ignore_eos", _I),
    _rule("skip_special_tokens", _I),
    _rule("spaces_between_special_tokens", _R, BOTH, "'spaces_between_special_tokens' "
          "cannot be changed: special tokens are decoded as the tokenizer spells them",
          _equals(True)),
    _rule("truncate_prompt_tokens", _I),
    _rule("prompt_logprobs", _I),
    _rule("return_token_ids", _I),
    _rule("return_tokens_as_token_ids", _I),
    _rule("add_special_tokens", _I),
    _rule("request_id", _I),
    _rule("use_beam_search", _R, BOTH, "beam search is not implemented", _equals(False)),
    _rule("length_penalty", _R, BOTH, "'length_penalty' only applies to beam search, which "
          "is not implemented", _equals(1.0)),
    _rule("logits_processors", _R, BOTH, "custom logits processors are not loaded from "
          "requests", _empty),
    _rule("cache_salt", _R, BOTH, "'cache_salt' (per-tenant prefix-cache isolation) is not "
          "implemented"),
    _rule("kv_transfer_params", _R, BOTH, "pdserve moves KV between its own workers; "
          "'kv_transfer_params' from clients are not accepted"),
    _rule("vllm_xargs", _R, BOTH, "'vllm_xargs' (custom extension arguments) are not "
          "accepted", _empty),
    _rule("priority", _I),
    _rule("structured_outputs", _I),
    _rule("guided_json", _I),
    _rule("guided_regex", _I),
    _rule("guided_choice", _I),
    _rule("guided_grammar", _I),
    _rule("guided_decoding_backend", _I),  # xgrammar (or "auto"); others are refused
    _rule("guided_whitespace_pattern", _R, BOTH, "'guided_whitespace_pattern' cannot be "
          "changed: JSON output is compact (xgrammar's default whitespace)"),
    # ---------------------------------------------------------------- vLLM extras
    _rule("prompt_embeds", _R, _C, "prompt embeddings are not accepted; send text or token "
          "ids"),
    _rule("add_generation_prompt", _I, _H),
    _rule("continue_final_message", _I, _H),
    _rule("chat_template", _I, _H),
    _rule("chat_template_kwargs", _I, _H),
    _rule("documents", _R, _H, "'documents' (retrieval documents for the chat template) are "
          "not implemented", _empty),
    _rule("mm_processor_kwargs", _R, _H, "the served models take text only", _empty),
    _rule("media_io_kwargs", _R, _H, "the served models take text only", _empty),
    _rule("include_reasoning", _R, _H, "no reasoning parser is configured for the served "
          "model", _equals(True)),
)
"""The catalogue (see the module docstring)."""

BY_NAME: Mapping[str, FieldRule] = {r.name: r for r in RULES}


def fields(endpoint: str, status: Status | None = None) -> list[str]:
    """Names of the fields of ``endpoint`` (``"completions"`` or ``"chat"``), of one
    status if given."""
    return [r.name for r in RULES
            if endpoint in r.endpoints and (status is None or r.status is status)]


def check_fields(body: Mapping[str, Any], endpoint: str) -> None:
    """Refuse (``RequestError("invalid_argument")`` with ``param`` the field) a body that
    sets an unknown field, a field of the other endpoint, or a refused field to a value
    other than its neutral one."""
    for name, value in body.items():
        rule = BY_NAME.get(name)
        if rule is None or endpoint not in rule.endpoints:
            where = "/v1/completions" if endpoint == COMPLETIONS else "/v1/chat/completions"
            raise RequestError("invalid_argument", f"unknown field {show(name)} for {where}"
                               " (fields that would change the output are never ignored; "
                               "see the README for what is supported)",
                               param=name if isinstance(name, str) else None)
        if rule.status is Status.REFUSED and not rule.neutral(value):
            raise RequestError("invalid_argument", f"{rule.reason} (got '{name}': "
                               f"{show(value)})", param=name)
