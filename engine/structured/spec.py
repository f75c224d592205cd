"""What a request's output must look like: a JSON schema, any JSON object, a regex, one of a
list of choices, or an EBNF grammar.

``StructuredSpec`` is the one typed description every layer passes along (HTTP and gRPC
fronts build it, the worker protocol ships it, the engine compiles it). Pure Python (no
torch, no xgrammar): the router imports it. ``key`` is what compiled grammars are cached by.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

KINDS = ("json", "json_object", "regex", "choice", "grammar")
"""json: ``value`` is a JSON schema (text). json_object: any JSON object (``value`` empty).
regex: ``value`` is a regular expression the whole output matches. choice: ``value`` is a
JSON list of strings; the output is exactly one of them. grammar: ``value`` is EBNF
(GBNF: ``root ::= ...``)."""

MAX_SPEC_CHARS = 256 << 10
"""A schema, regex, grammar or choice list longer than this is refused (compiling one is
work done for the request; the bound keeps that work bounded)."""


@dataclass(frozen=True, slots=True)
class StructuredSpec:
    """A constraint on a request's output.

    ``num_output_in_prompt``: how many trailing tokens of the request's prompt are output
    that this grammar already consumed (a request resumed on another worker after a
    failover carries its output so far in its prompt); the engine feeds them to the
    matcher before the first sampled token. Not part of ``key``.
    """

    kind: str
    value: str = ""
    num_output_in_prompt: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind {self.kind!r}; use one of "
                             f"{', '.join(KINDS)}")
        if len(self.value) > MAX_SPEC_CHARS:
            raise ValueError(f"the {self.kind} constraint has {len(self.value)} characters; "
                             f"at most {MAX_SPEC_CHARS}")
        if self.kind != "json_object" and not self.value:
            raise ValueError(f"the {self.kind} constraint is empty")
        if self.num_output_in_prompt < 0:
            raise ValueError("num_output_in_prompt must be >= 0")
        if self.kind == "choice":
            choices = json.loads(self.value)
            if (not isinstance(choices, list) or not choices
                    or not all(isinstance(c, str) and c for c in choices)):
                raise ValueError("choices must be a non-empty list of non-empty strings")

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.value)

    @classmethod
    def json_schema(cls, schema: dict | bool | str) -> StructuredSpec:
        """From a schema object (serialized compactly in its own key order: the order of
        ``properties`` is the order the output's keys take) or its JSON text."""
        text = schema if isinstance(schema, str) else json.dumps(schema, separators=(",", ":"))
        return cls("json", text)

    @classmethod
    def choice(cls, choices: list[str]) -> StructuredSpec:
        return cls("choice", json.dumps(list(choices)))

    def choices(self) -> list[str]:
        """The choices of a ``choice`` spec."""
        return list(json.loads(self.value)) if self.kind == "choice" else []
