"""Tool calls read out of a model's output as it is generated, for OpenAI's streamed
``tool_calls`` deltas: per call, a first delta with ``index``, ``id``, ``type: "function"``
and ``function.name`` (``arguments`` ""), then ``function.arguments`` fragments as the
model writes them.

The same scanners read a finished output (``read_calls``), so the non-streamed message and
the reassembled stream agree by construction. A call's ``arguments`` is the model's own
JSON text for them (not re-serialized), so it can be streamed before the call is complete.

- ``CallScanner``: one ``{"name": ..., "arguments": ...}`` object (keys in any order;
  ``parameters`` is read as ``arguments``; other keys are skipped; a call without arguments
  has ``{}``). Its name is known once the ``name`` string is complete; the arguments text
  grows with each character of their value (a value that is a JSON string is the arguments'
  text itself: it is released when complete).
- ``HermesScanner``: ``<tool_call>{...}</tool_call>`` blocks in free text (Hermes / Qwen
  style); the text around them is the content, whitespace-stripped at both ends. A block
  that turns out not to be a call before its name is known stays in the content, as text.
- ``ArrayScanner``: a JSON list of call objects (what "required" tool choice constrains
  the output to).

Pure Python, char by char; no allocation per character beyond the text kept.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

_WS = " \t\r\n"
OPEN, CLOSE = "<tool_call>", "</tool_call>"


def new_call(name: str, arguments: str) -> dict[str, Any]:
    """An OpenAI ``tool_calls`` item with a fresh id."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


class _Value:
    """Finds the end of one JSON value, char by char (not a validator: the braces, brackets
    and strings are balanced, which is what delimits it)."""

    def __init__(self) -> None:
        self.first = ""
        self.depth = 0
        self.in_str = False
        self.esc = False
        self.done = False

    def feed(self, c: str) -> str:
        """"skip" (whitespace before the value), "take" (part of it) or "end" (a scalar's
        terminator, not part of it)."""
        if not self.first:
            if c in _WS:
                return "skip"
            self.first = c
            if c in "{[":
                self.depth = 1
            elif c == '"':
                self.in_str = True
            return "take"
        if self.in_str:
            if self.esc:
                self.esc = False
            elif c == "\\":
                self.esc = True
            elif c == '"':
                self.in_str = False
                self.done = self.depth == 0
            return "take"
        if self.depth == 0:  # a scalar: ends at whatever cannot continue it
            if c in _WS + ",}]":
                self.done = True
                return "end"
            return "take"
        if c == '"':
            self.in_str = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
            self.done = self.depth == 0
        return "take"


class CallScanner:
    """One call object, char by char; see the module docstring."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.args: list[str] = []
        self.args_string = False  # the arguments are a JSON string (released when complete)
        self.args_seen = False
        self.done = False
        self.bad = False
        self._state = "open"
        self._key: list[str] = []
        self._key_esc = False
        self._cur = ""
        self._value: _Value | None = None
        self._raw: list[str] = []

    @property
    def arguments(self) -> str:
        """The arguments' text so far."""
        if self.args_string:
            return ""
        if not self.args_seen and self.done:
            return "{}"
        return "".join(self.args)

    def feed(self, c: str) -> None:
        if self.done or self.bad:
            return
        state = self._state
        if state == "open":
            if c == "{":
                self._state = "key"
            elif c not in _WS:
                self.bad = True
        elif state == "key":
            if c == '"':
                self._key, self._state = [c], "in_key"
            elif c == "}":
                self.done = True
            elif c not in _WS:
                self.bad = True
        elif state == "in_key":
            self._key.append(c)
            if self._key_esc:
                self._key_esc = False
            elif c == "\\":
                self._key_esc = True
            elif c == '"':
                self._cur = json.loads("".join(self._key))
                self._state = "colon"
        elif state == "colon":
            if c == ":":
                self._value, self._raw, self._state = _Value(), [], "value"
                if self._cur in ("arguments", "parameters") and not self.args_seen:
                    self.args_seen = True
                    self._cur = "arguments"
            elif c not in _WS:
                self.bad = True
        elif state == "value":
            assert self._value is not None
            verdict = self._value.feed(c)
            if verdict == "take":
                self._take(c)
            if self._value.done:
                self._end_value()
                if verdict == "end":
                    self.feed(c)
        elif state == "after":
            if c == ",":
                self._state = "key"
            elif c == "}":
                self.done = True
            elif c not in _WS:
                self.bad = True

    def _take(self, c: str) -> None:
        self._raw.append(c)
        if self._cur == "arguments":
            assert self._value is not None
            if self._value.first == '"':
                self.args_string = True
            else:
                self.args.append(c)

    def _end_value(self) -> None:
        self._state = "after"
        raw = "".join(self._raw)
        if self._cur == "name" and self.name is None:
            try:
                name = json.loads(raw)
            except json.JSONDecodeError:
                name = None
            if isinstance(name, str) and name:
                self.name = name
            else:
                self.bad = True
        elif self._cur == "arguments" and self.args_string:
            try:
                self.args = [str(json.loads(raw))]
            except json.JSONDecodeError:
                self.args = [raw]
            self.args_string = False


class _Calls:
    """The calls found so far and what of them was already sent."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.scanners: list[CallScanner] = []
        self._sent: list[int] = []
        self._index: dict[int, int] = {}  # id(scanner) -> its call's index

    def track(self, scanner: CallScanner) -> None:
        self.scanners.append(scanner)

    def deltas(self) -> list[dict[str, Any]]:
        """New ``tool_calls`` deltas: headers of calls whose name became known, and the
        arguments text added since the last call."""
        out = []
        for scanner in self.scanners:
            if scanner.name is None:
                continue
            key = id(scanner)
            if key not in self._index:
                index = self._index[key] = len(self.calls)
                self.calls.append(new_call(scanner.name, ""))
                self._sent.append(0)
                out.append({"index": index, "id": self.calls[index]["id"],
                            "type": "function",
                            "function": {"name": scanner.name, "arguments": ""}})
            index = self._index[key]
            args = scanner.arguments
            if len(args) > self._sent[index]:
                out.append({"index": index,
                            "function": {"arguments": args[self._sent[index]:]}})
                self._sent[index] = len(args)
                self.calls[index]["function"]["arguments"] = args
        return [{"tool_calls": [d]} for d in out]


class _Content:
    """Content text released so that its concatenation is the whole content, stripped."""

    def __init__(self) -> None:
        self._started = False
        self._ws = ""
        self.text: list[str] = []

    def push(self, s: str) -> list[dict[str, Any]]:
        if not self._started:
            s = s.lstrip()
            if not s:
                return []
            self._started = True
        body = s.rstrip()
        if not body:
            self._ws += s
            return []
        out = self._ws + body
        self._ws = s[len(body):]
        self.text.append(out)
        return [{"content": out}]


class HermesScanner:
    """Content and ``<tool_call>`` blocks of a Hermes / Qwen style output, as it grows."""

    def __init__(self) -> None:
        self.content = _Content()
        self.calls = _Calls()
        self._mode = "text"  # text | block | close | literal
        self._held = ""  # text that may be the start of a tag
        self._block: list[str] = []  # a block's raw text while its call is not known
        self._scanner: CallScanner | None = None

    def push(self, text: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        self._held += text
        while self._held:
            if self._mode in ("text", "literal", "close"):
                tag = OPEN if self._mode == "text" else CLOSE
                at = self._held.find(tag)
                if at < 0:
                    keep = _partial_suffix(self._held, tag)
                    head, self._held = self._held[:len(self._held) - keep], self._held[
                        len(self._held) - keep:]
                    if self._mode != "close":
                        out += self.content.push(head)
                    break
                head, self._held = self._held[:at], self._held[at + len(tag):]
                if self._mode == "text":
                    out += self.content.push(head)
                    self._mode, self._block = "block", [OPEN]
                    self._scanner = CallScanner()
                    self.calls.track(self._scanner)
                else:
                    if self._mode == "literal":
                        out += self.content.push(head + CLOSE)
                    self._mode = "text"
            else:
                out += self._feed_block()
        return out + self.calls.deltas()

    def _feed_block(self) -> list[dict[str, Any]]:
        scanner = self._scanner
        assert scanner is not None
        text, self._held = self._held, ""
        for i, c in enumerate(text):
            scanner.feed(c)
            self._block.append(c)
            if scanner.name is None and (scanner.bad or scanner.done):  # not a call: text
                self.calls.scanners.pop()
                self._mode = "literal"
                self._held = "".join(self._block) + text[i + 1:]
                self._held = self._held[len(OPEN):]
                return self.content.push(OPEN)
            if scanner.done or scanner.bad:
                self._mode, self._held = "close", text[i + 1:]
                return []
        return []

    def finish(self) -> list[dict[str, Any]]:
        """What is left once the output is complete (an unfinished block that never named
        its call is content)."""
        out: list[dict[str, Any]] = []
        if self._mode == "block" and self._scanner is not None and self._scanner.name is None:
            self.calls.scanners.pop()
            out += self.content.push("".join(self._block) + self._held)
        elif self._mode in ("text", "literal"):
            out += self.content.push(self._held)
        self._held = ""
        return out + self.calls.deltas()


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ArrayScanner:
    """A JSON list of call objects, as it grows."""

    def __init__(self) -> None:
        self.calls = _Calls()
        self._state = "open"  # open | item | after | done
        self._scanner: CallScanner | None = None

    def push(self, text: str) -> list[dict[str, Any]]:
        for c in text:
            if self._state == "open":
                if c == "[":
                    self._state = "item"
            elif self._state == "item":
                if self._scanner is None:
                    if c in _WS:
                        continue
                    self._scanner = CallScanner()
                    self.calls.track(self._scanner)
                self._scanner.feed(c)
                if self._scanner.name is None and (self._scanner.bad or self._scanner.done):
                    self.calls.scanners.pop()
                if self._scanner.done or self._scanner.bad:
                    self._state, self._scanner = "after", None
            elif self._state == "after":
                if c == ",":
                    self._state = "item"
                elif c == "]":
                    self._state = "done"
        return self.calls.deltas()

    def finish(self) -> list[dict[str, Any]]:
        return self.calls.deltas()


def read_calls(text: str, scanner: HermesScanner | ArrayScanner
               ) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) of a finished output, read by a fresh ``scanner``."""
    scanner.push(text)
    scanner.finish()
    content = "".join(scanner.content.text) if isinstance(scanner, HermesScanner) else None
    return (content or None), scanner.calls.calls
