"""The gRPC ``Chat`` call's request and responses.

``chat_body`` turns a ``ChatRequest`` into the OpenAI-shaped JSON that ``router.chat`` reads
for the HTTP front too (the .proto mirrors OpenAI's shapes, so an error names the same field
path over both fronts); only its JSON-text fields (``tools[i].function.parameters``,
``chat_template_kwargs``) are parsed here. ``ChatReply`` turns a request's ``Delta``s into
``ChatResponse`` messages: content and tool-call deltas from the same ``ToolStream`` the HTTP
front streams with, and on each choice's last message the whole assistant message, built from
what was streamed (so the deltas reassemble to it exactly, call ids included). Pure Python
but for the generated message classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.sampling import TokenLogprobs
from pdserve.engine.sampling_limits import show
from pdserve.protos.pdserve.v1 import generation_pb2 as pb
from pdserve.router.flow import Delta, RequestError
from pdserve.router.openai_tools import ToolRequest, ToolStream, finish_reason


def _json_object(text: str, name: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise RequestError("invalid_argument", f"'{name}' is not JSON text", name) from None
    if not isinstance(value, dict):
        raise RequestError("invalid_argument", f"'{name}' must be a JSON object, got "
                           f"{show(value)}", name)
    return value


def _message(msg: pb.ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": msg.role, "content": msg.content}
    if msg.name:
        out["name"] = msg.name
    if msg.tool_call_id:
        out["tool_call_id"] = msg.tool_call_id
    if msg.tool_calls:
        calls = []
        for call in msg.tool_calls:
            fn: dict[str, Any] = {}
            if call.function.name:  # unset: refused as missing, naming the field
                fn["name"] = call.function.name
            if call.function.arguments:
                fn["arguments"] = call.function.arguments
            calls.append({"id": call.id, "type": "function", "function": fn})
        out["tool_calls"] = calls
    return out


def _tool(tool: pb.Tool, index: int) -> dict[str, Any]:
    fn: dict[str, Any] = {}
    if tool.function.name:
        fn["name"] = tool.function.name
    if tool.function.description:
        fn["description"] = tool.function.description
    if tool.function.parameters:
        fn["parameters"] = _json_object(tool.function.parameters,
                                        f"tools[{index}].function.parameters")
    return {"type": "function", "function": fn}


def chat_body(request: pb.ChatRequest) -> dict[str, Any]:
    """The request's messages, tools and template options as an OpenAI chat body."""
    body: dict[str, Any] = {"messages": [_message(m) for m in request.messages],
                            "continue_final_message": request.continue_final_message}
    if request.tools:
        body["tools"] = [_tool(t, i) for i, t in enumerate(request.tools)]
    choice = request.tool_choice.WhichOneof("choice") if request.HasField("tool_choice") else None
    if choice == "mode":
        body["tool_choice"] = request.tool_choice.mode
    elif choice == "function":
        body["tool_choice"] = {"type": "function",
                               "function": {"name": request.tool_choice.function.name}}
    if request.HasField("parallel_tool_calls"):
        body["parallel_tool_calls"] = request.parallel_tool_calls
    if request.chat_template_kwargs:
        body["chat_template_kwargs"] = _json_object(request.chat_template_kwargs,
                                                    "chat_template_kwargs")
    if request.HasField("add_generation_prompt"):
        body["add_generation_prompt"] = request.add_generation_prompt
    if request.HasField("chat_template"):
        body["chat_template"] = request.chat_template
    return body


def named_field(exc: RequestError) -> str:
    """``exc``'s message, starting with the field at fault when it does not name it (gRPC has
    no ``param``; a constraint that does not compile is reported in the compiler's words)."""
    if exc.param and exc.param not in exc.message:
        return f"'{exc.param}': {exc.message}"
    return exc.message


def logprobs_pb(lps: list[TokenLogprobs]) -> list[pb.TokenLogprobs]:
    return [pb.TokenLogprobs(token_id=lp.token_id, logprob=lp.logprob,
                             top=[pb.TokenLogprob(token_id=t, logprob=p) for t, p in lp.top])
            for lp in lps]


def set_final(msg: Any, delta: Delta) -> None:
    """A choice's last message's stop reason, usage and timing (Generate's and Chat's)."""
    if delta.stop_reason is not None:
        msg.stop_reason = str(delta.stop_reason)
    msg.usage.CopyFrom(pb.Usage(prompt_tokens=delta.prompt_tokens,
                                completion_tokens=delta.completion_tokens,
                                cached_tokens=delta.cached_tokens))
    msg.timing.CopyFrom(pb.Timing(**{k: v for k, v in delta.timing.items()
                                     if k in pb.Timing.DESCRIPTOR.fields_by_name}))


@dataclass(slots=True)
class _Choice:
    tools: ToolStream | None
    content: list[str] = field(default_factory=list)


class ChatReply:
    """One chat request's ``Delta``s -> ``ChatResponse`` messages (see the module
    docstring). ``tools`` None: no tools, the text is the content."""

    def __init__(self, rid: str, tools: ToolRequest | None, parser: str | None) -> None:
        self.rid = rid
        self.tools = tools
        self.parser = parser
        self._choices: dict[int, _Choice] = {}

    def response(self, delta: Delta) -> pb.ChatResponse:
        choice = self._choices.get(delta.index)
        if choice is None:
            stream = ToolStream(self.tools, self.parser) if self.tools is not None else None
            choice = self._choices[delta.index] = _Choice(stream)
        msg = pb.ChatResponse(request_id=self.rid, index=delta.index,
                              token_ids=delta.token_ids, logprobs=logprobs_pb(delta.logprobs),
                              prompt_logprobs=logprobs_pb(delta.prompt_logprobs or []))
        calls: list[dict[str, Any]] = []
        if choice.tools is None:
            bodies = [{"content": delta.text}] if delta.text else []
        else:
            bodies = choice.tools.push(delta.text)
            if delta.finish_reason is not None:
                final, calls = choice.tools.finish()
                bodies += final
        for body in bodies:
            if "content" in body:
                choice.content.append(body["content"])
            for tc in body.get("tool_calls", ()):
                msg.tool_calls.append(pb.ToolCallDelta(
                    index=tc["index"], id=tc.get("id", ""),
                    function=pb.FunctionCall(name=tc["function"].get("name", ""),
                                             arguments=tc["function"].get("arguments", ""))))
        msg.content = "".join(b.get("content", "") for b in bodies)
        if delta.finish_reason is not None:
            reason = delta.finish_reason
            if self.tools is not None:
                reason = finish_reason(self.tools, calls, reason) or reason
            msg.finish_reason = reason
            set_final(msg, delta)
            msg.message.CopyFrom(pb.ChatMessage(
                role="assistant", content="".join(choice.content),
                tool_calls=[pb.ToolCall(id=c["id"], function=pb.FunctionCall(
                    name=c["function"]["name"], arguments=c["function"]["arguments"]))
                    for c in calls]))
        return msg
