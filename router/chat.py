"""A chat request's conversation, template options and tools, read from OpenAI-shaped JSON.

Both fronts read chats here: the HTTP front gives its request body; the gRPC front turns its
``ChatRequest`` into the same shape first (``pdserve.router.grpc_chat``), so that one set of
rules holds and an error names the same field path over both (``'tools[0].function.name'``).
Errors are ``RequestError("invalid_argument", ..., param)``. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pdserve.engine.sampling_limits import show
from pdserve.router.flow import RequestError
from pdserve.router.openai_tools import ToolRequest, parse_tools, tool_constraint, tool_fields
from pdserve.router.validation import ChatOptions, SamplingArgs

MAX_CHAT_TEMPLATE_CHARS = 64 << 10

RESERVED_TEMPLATE_VARIABLES = frozenset({
    "messages", "conversation", "tools", "documents", "chat_template", "tokenize",
    "add_generation_prompt", "continue_final_message", "padding", "truncation",
    "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs"})
"""``chat_template_kwargs`` keys that would override how the template is called."""


def _bad(message: str, param: str | None) -> RequestError:
    return RequestError("invalid_argument", message, param)


def _typed(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _bad(f"'{name}' must be {kind.__name__}, got {show(value)}", name)
    return value


@dataclass(frozen=True, slots=True)
class ChatParts:
    """What a chat request adds to a plain one: the messages as the chat template receives
    them, how the template is called, and the tools (None: no tools)."""

    messages: list[dict[str, Any]]
    options: ChatOptions
    tools: ToolRequest | None

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        return self.tools.template_tools if self.tools is not None else None


def message_text(message: Any, index: int) -> dict[str, Any]:
    """One OpenAI chat message as the chat template receives it: role, content (text parts
    joined) and its tool fields."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise _bad(f"'messages[{index}]' must be an object with a 'role'", "messages")
    content = message.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                raise _bad(f"'messages[{index}].content': only text parts are supported",
                           "messages")
            parts.append(part["text"])
        text = "".join(parts)
    else:
        raise _bad(f"'messages[{index}].content' must be a string or a list of text parts",
                   "messages")
    return {"role": message["role"], "content": text, **tool_fields(message, index)}


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """``messages``: a non-empty list, each read by ``message_text``."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    return [message_text(m, i) for i, m in enumerate(messages)]


def chat_options(body: dict[str, Any]) -> ChatOptions:
    """``chat_template``, ``chat_template_kwargs``, ``add_generation_prompt`` (default true)
    and ``continue_final_message``."""
    kwargs = _typed(body, "chat_template_kwargs", dict, {})
    for key in kwargs:
        if key in RESERVED_TEMPLATE_VARIABLES or not key.isidentifier():
            raise _bad(f"'chat_template_kwargs' may not set {show(key)} (a reserved or "
                       "invalid template variable)", "chat_template_kwargs")
    template = _typed(body, "chat_template", str, None)
    if template is not None and len(template) > MAX_CHAT_TEMPLATE_CHARS:
        raise _bad(f"'chat_template' has {len(template)} characters; at most "
                   f"{MAX_CHAT_TEMPLATE_CHARS}", "chat_template")
    return ChatOptions(
        chat_template=template, chat_template_kwargs=tuple(kwargs.items()),
        add_generation_prompt=_typed(body, "add_generation_prompt", bool, True),
        continue_final_message=_typed(body, "continue_final_message", bool, False))


def chat_parts(body: dict[str, Any]) -> ChatParts:
    """The messages, template options and tools of an OpenAI-shaped chat request."""
    return ChatParts(chat_messages(body), chat_options(body), parse_tools(body))


def with_tool_constraint(args: SamplingArgs, tools: ToolRequest | None) -> SamplingArgs:
    """``args`` with the output constraint that "required" and named tool choices need (a
    schema that does not compile is the fault of ``tools``' parameters); a request that also
    gives its own output constraint is refused (one or the other)."""
    if tools is None or (constraint := tool_constraint(tools)) is None:
        return args
    if args.structured is not None:
        raise _bad("'tool_choice' and an output format both constrain the output; give one",
                   "tool_choice")
    return replace(args, structured=constraint, structured_field="tools")
