"""OpenAI tool calling: ``tools`` and ``tool_choice`` in, ``tool_calls`` out.

- ``tool_choice`` "none": the tools are shown to the chat template, the output is text.
- "required": the output is constrained (structured output, any model) to a JSON list of
  ``{"name": <one of the tools>, "arguments": <its parameters schema>}``; each item becomes
  a call.
- a named function (``{"type": "function", "function": {"name": ...}}``): the output is
  constrained to that function's parameters; it is the call's ``arguments``.
- "auto" (the default when tools are given): the model decides; a parser reads its calls
  out of the text. ``hermes`` (Hermes / Qwen style): ``<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>`` blocks; the text outside them is the ``content``.
  Needs the server's ``--tool-call-parser``.

Streaming (``ToolStream``): as OpenAI streams them, each call opens with one delta carrying
its ``index``, ``id``, ``type`` and ``function.name`` (``arguments`` ""), then its
``function.arguments`` arrive in fragments as the model writes them; "auto" streams the
content around the calls as it comes (``pdserve.router.tool_stream`` reads the output
incrementally). A call's ``arguments`` is the model's own JSON text. The non-streamed
message is read by the same scanners: reassembled, the deltas equal it. Pure Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pdserve.engine.sampling_limits import show
from pdserve.engine.structured.spec import StructuredSpec
from pdserve.router.errors import param_of
from pdserve.router.flow import RequestError
from pdserve.router.tool_stream import ArrayScanner, HermesScanner, new_call, read_calls

PARSERS = ("hermes",)


def _bad(message: str) -> RequestError:
    return RequestError("invalid_argument", message, param_of(message))


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """The request's tools (OpenAI's ``tools`` items) and its choice: "none", "auto",
    "required", or the name of the one function to call."""

    tools: tuple[dict[str, Any], ...]
    choice: str
    named: bool = False
    parallel: bool = True
    """``parallel_tool_calls``: False holds "required" to exactly one call."""

    def function(self, name: str) -> dict[str, Any] | None:
        return next((t["function"] for t in self.tools if t["function"]["name"] == name), None)

    @property
    def template_tools(self) -> list[dict[str, Any]]:
        """What the chat template receives (as transformers' ``apply_chat_template``)."""
        return [dict(t) for t in self.tools]


def parse_tools(body: dict[str, Any]) -> ToolRequest | None:
    """The request's tools, or None (no tools). ``RequestError`` naming the field."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools in (None, []):
        if choice not in (None, "none"):
            raise _bad("'tool_choice' needs 'tools'")
        return None
    if not isinstance(tools, list):
        raise _bad(f"'tools' must be a list, got {show(tools)}")
    names = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(
                fn, dict):
            raise _bad(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{...}}}}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(f"'tools[{i}].function.name' must be a non-empty string")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise _bad(f"'tools[{i}].function.parameters' must be a JSON schema object")
        if fn["name"] in names:
            raise _bad(f"'tools[{i}].function.name' {fn['name']!r} is given twice")
        names.add(fn["name"])
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise _bad(f"'parallel_tool_calls' must be true or false, got {show(parallel)}")
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise _bad("'tool_choice' must be 'none', 'auto', 'required' or "
                       "{\"type\": \"function\", \"function\": {\"name\": ...}}")
        if name not in names:
            raise _bad(f"'tool_choice.function.name' {name!r} is none of the tools")
        return ToolRequest(tuple(tools), name, named=True, parallel=parallel)
    if choice not in ("none", "auto", "required"):
        raise _bad(f"'tool_choice' must be 'none', 'auto', 'required' or a function, got "
                   f"{show(choice)}")
    return ToolRequest(tuple(tools), choice, parallel=parallel)


def tool_fields(message: dict[str, Any], index: int) -> dict[str, Any]:
    """A chat message's tool fields, for the chat template: an assistant's ``tool_calls``
    (their ``arguments`` JSON text parsed, as templates expect a mapping) and a tool
    result's ``tool_call_id`` / ``name``."""
    out: dict[str, Any] = {}
    calls = message.get("tool_calls")
    if calls:
        if not isinstance(calls, list):
            raise _bad(f"'messages[{index}].tool_calls' must be a list")
        parsed = []
        for j, call in enumerate(calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise _bad(f"'messages[{index}].tool_calls[{j}].function.name' is required")
            args = fn.get("arguments", "{}")
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except json.JSONDecodeError:
                raise _bad(f"'messages[{index}].tool_calls[{j}].function.arguments' is not "
                           "JSON") from None
            parsed.append({"id": call.get("id", ""), "type": "function",
                           "function": {"name": fn["name"], "arguments": args}})
        out["tool_calls"] = parsed
    for key in ("tool_call_id", "name"):
        if isinstance(message.get(key), str):
            out[key] = message[key]
    return out


def _params(fn: dict[str, Any]) -> dict[str, Any]:
    return fn.get("parameters") or {"type": "object"}


def tool_constraint(req: ToolRequest) -> StructuredSpec | None:
    """The output constraint "required" and named choices need (None for none / auto)."""
    if req.named:
        fn = req.function(req.choice)
        assert fn is not None
        return StructuredSpec.json_schema(_params(fn))
    if req.choice != "required":
        return None
    items = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                               "arguments": _params(t["function"])},
              "required": ["name", "arguments"], "additionalProperties": False}
             for t in req.tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not req.parallel:
        schema["maxItems"] = 1
    return StructuredSpec.json_schema(schema)


def parse_hermes(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) of a Hermes / Qwen style output. A block that is not a JSON object
    with a string ``name`` stays in the content, as text."""
    return read_calls(text, HermesScanner())


def tool_calls(req: ToolRequest, text: str,
               parser: str | None) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a finished output."""
    if req.named:
        return None, [new_call(req.choice, text)]
    if req.choice == "required":
        _, calls = read_calls(text, ArrayScanner())
        # Cut short (max_tokens) before a call was named: the text is all there is.
        return (None, calls) if calls else (text or None, [])
    if req.choice == "auto" and parser == "hermes":
        return parse_hermes(text)
    return text, []


def finish_reason(req: ToolRequest, calls: list[dict[str, Any]], reason: str | None) -> str | None:
    """OpenAI's: "tool_calls" when the model chose to call (not for a named choice)."""
    if calls and not req.named and reason == "stop":
        return "tool_calls"
    return reason


class ToolStream:
    """Turns one request's text deltas into chat ``delta`` bodies (see module docstring)."""

    def __init__(self, req: ToolRequest, parser: str | None) -> None:
        self.req = req
        self.parser = parser
        self.text: list[str] = []
        self._named_id = new_call(req.choice, "")["id"] if req.named else ""
        self._started = False
        self._scanner: HermesScanner | ArrayScanner | None = None
        if req.choice == "required":
            self._scanner = ArrayScanner()
        elif req.choice == "auto" and parser == "hermes":
            self._scanner = HermesScanner()

    @property
    def live(self) -> bool:
        """Whether text is streamed as it comes (no tools to find in it)."""
        return self.req.choice == "none" or (self.req.choice == "auto" and not self.parser)

    def push(self, text: str) -> list[dict[str, Any]]:
        """Deltas for new output text (while generating)."""
        self.text.append(text)
        if self.live:
            return [{"content": text}] if text else []
        if self._scanner is not None:
            return self._scanner.push(text) if text else []
        if not text:
            return []
        out = []
        if not self._started:
            self._started = True
            out.append({"tool_calls": [{"index": 0, "id": self._named_id, "type": "function",
                                        "function": {"name": self.req.choice,
                                                     "arguments": ""}}]})
        out.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
        return out

    def finish(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(final deltas, the calls) once the output is complete."""
        if self._scanner is None:
            text = "".join(self.text)
            calls = [] if self.live else [{**new_call(self.req.choice, text),
                                           "id": self._named_id}]
            return [], calls
        deltas = self._scanner.finish()
        calls = self._scanner.calls.calls
        if isinstance(self._scanner, ArrayScanner) and not calls and any(self.text):
            deltas.append({"content": "".join(self.text)})  # cut short before any call
        return deltas, calls


def check_tool_parser(req: ToolRequest | None, parser: str | None) -> None:
    """"auto" tool choice needs a parser the server was started with."""
    if req is not None and req.choice == "auto" and parser is None:
        raise _bad("'tool_choice' 'auto' needs the server's --tool-call-parser (e.g. "
                   "hermes); or use 'required', 'none' or a named function")


def apply_tool_calls(choice: dict[str, Any], req: ToolRequest, parser: str | None) -> None:
    """Turn a finished chat choice's text into ``tool_calls`` (in place)."""
    message = choice["message"]
    content, calls = tool_calls(req, message.get("content") or "", parser)
    if not calls:
        return
    message["content"] = content
    message["tool_calls"] = calls
    choice["finish_reason"] = finish_reason(req, calls, choice["finish_reason"])


def tool_chunks(stream: ToolStream, make_choice: Any, delta: Any) -> list[dict[str, Any]]:
    """The chat chunk choices of one text delta of a request with tools. ``make_choice``
    builds a delta choice (text, finish_reason, logprobs, token ids, delta=True)."""
    bodies = stream.push(delta.text)
    out = []
    for body in bodies:
        choice = make_choice(None, None, [], [], delta=True)
        choice["delta"].update(body)
        out.append(choice)
    if delta.finish_reason is not None:
        final, calls = stream.finish()
        for body in final:
            choice = make_choice(None, None, [], [], delta=True)
            choice["delta"].update(body)
            out.append(choice)
        reason = finish_reason(stream.req, calls, delta.finish_reason)
        out.append(make_choice(None, reason, [], [], delta=True))
    return out
