"""The type and bounds of every sampling field, in ONE table.

``SamplingParams`` checks itself against ``FIELDS``; the router's fronts (gRPC and the
OpenAI-compatible HTTP API) type-check their wire values against the same entries, so a
value one front accepts the other accepts too, and both name the field in the same words.
Adding a sampling field is one line here (plus the field itself and its wire names).

The bounds are what the engine can run without overflow or undefined behaviour (a seed
wider than the generator's 64 bits, a ``top_k`` past int64, a temperature that turns
logits into infinities), not policy: a value inside them is served exactly.

Pure Python (no torch): the router imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
MAX_LOGPROBS = 20
MAX_N = 16
"""Choices of one request (``n``): each holds its own KV blocks past the shared prompt."""
MAX_REPETITION_PENALTY = 10.0
MAX_LOGIT_BIAS = 100.0
"""``logit_bias`` values lie in [-100, 100], as in the OpenAI API."""
MAX_LOGIT_BIAS_ITEMS = 1024
MAX_ALLOWED_TOKEN_IDS = 1 << 18
MAX_BAD_WORDS = 64
MAX_BAD_WORD_TOKENS = 32
GREEDY_BELOW = 1e-5
"""A temperature under this (and above 0) samples greedily: dividing logits by it could
overflow them to infinities."""

_VALUE_CHARS = 40  # how much of a refused value a message quotes


def show(value: Any, limit: int = _VALUE_CHARS) -> str:
    """``repr(value)``, clipped to ``limit`` characters (refused values can be huge)."""
    text = repr(value)
    if len(text) > limit:
        suffix = f"... ({len(text)} characters)"
        text = text[: max(limit - len(suffix), 8)] + suffix
    return text


@dataclass(frozen=True, slots=True)
class Field:
    """One field: ``kind`` (int, float, bool or str); ``lo``/``hi`` inclusive bounds (None:
    open), ``lo_open`` excludes ``lo``; ``max_items`` makes it a list of at most that many
    values of ``kind``; ``max_chars`` bounds each string, ``nonempty`` forbids empty ones."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    max_items: int | None = None
    max_chars: int | None = None
    nonempty: bool = False

    def describe(self) -> str:
        """What a valid value is, in words (used in error messages)."""
        noun = {int: "an integer", float: "a number", bool: "true or false",
                str: "a string"}[self.kind]
        if self.lo is not None and self.hi is not None:
            left = "(" if self.lo_open else "["
            noun += f" in {left}{_num(self.lo)}, {_num(self.hi)}]"
        elif self.lo is not None:
            noun += f" {'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.kind is str:
            if self.nonempty:
                noun = "a non-empty string"
            if self.max_chars is not None:
                noun += f" of at most {self.max_chars} characters"
        if self.max_items is not None:
            return f"a list of at most {self.max_items} items, each {noun}"
        return noun

    def check(self, name: str, value: Any) -> Any:
        """``value`` as the field holds it (ints widened to float for float fields, lists
        to tuples), or ``ValueError`` naming the field and what it must be."""
        if self.max_items is not None:
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise ValueError(f"'{name}' must be {self.describe()}, got {show(value)}")
            if len(value) > self.max_items:
                raise ValueError(f"'{name}' must be {self.describe()}, got {len(value)} items")
            return tuple(self._one(name, v) for v in value)
        return self._one(name, value)

    def _one(self, name: str, value: Any) -> Any:
        bad = ValueError(f"'{name}' must be {self.describe()}, got {show(value)}")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise bad
            return value
        if isinstance(value, bool):
            raise bad
        if self.kind is str:
            if not isinstance(value, str) or (self.nonempty and not value):
                raise bad
            if self.max_chars is not None and len(value) > self.max_chars:
                raise ValueError(f"'{name}' must be {self.describe()}, got "
                                 f"{len(value)} characters")
            return value
        if self.kind is int:
            if not isinstance(value, int):
                raise bad
        elif not isinstance(value, (int, float)):
            raise bad
        else:
            value = float(value)
            if not math.isfinite(value):
                raise bad
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            raise bad
        if self.hi is not None and value > self.hi:
            raise bad
        return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


FIELDS: dict[str, Field] = {
    "max_tokens": Field(int, 1, INT32_MAX),
    "temperature": Field(float, 0.0, 100.0),
    "top_p": Field(float, 0.0, 1.0, lo_open=True),
    "top_k": Field(int, -1, INT32_MAX),
    "min_p": Field(float, 0.0, 1.0),
    "seed": Field(int, 0, UINT64_MAX),
    "stop": Field(str, max_items=16, max_chars=256, nonempty=True),
    "stop_token_ids": Field(int, 0, INT32_MAX, max_items=256),
    "ignore_eos": Field(bool),
    "logprobs": Field(int, 0, MAX_LOGPROBS),
    "presence_penalty": Field(float, -2.0, 2.0),
    "frequency_penalty": Field(float, -2.0, 2.0),
    "repetition_penalty": Field(float, 0.0, MAX_REPETITION_PENALTY, lo_open=True),
    "min_tokens": Field(int, 0, INT32_MAX),
    "allowed_token_ids": Field(int, 0, INT32_MAX, max_items=MAX_ALLOWED_TOKEN_IDS),
    "include_stop_str_in_output": Field(bool),
    "skip_special_tokens": Field(bool),
    "prompt_logprobs": Field(int, 0, MAX_LOGPROBS),
    "n": Field(int, 1, MAX_N),
}
"""Every scalar or list sampling field's bounds (``logit_bias`` and ``bad_words_ids`` are
checked by ``SamplingParams`` with the bounds above). ``None`` (not given) is always allowed
for the optional ones (``max_tokens``, ``seed``, ``logprobs``, ``prompt_logprobs``); the
router checks what depends on the model (``max_tokens`` against its length, token ids
against its vocabulary)."""


def check(name: str, value: Any) -> Any:
    """``FIELDS[name].check``; None passes through (the field was not given)."""
    return None if value is None else FIELDS[name].check(name, value)
