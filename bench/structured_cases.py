"""Schemas, prompts, choices and regexes shared by the structured-output tests and the
benchmark (``pdserve.bench.structured``): nested objects, arrays, enums and required fields, each
bounded (maxLength, maxItems, integer ranges) so that a model that rambles still ends."""

from __future__ import annotations

from typing import Any

_NAME = {"type": "string", "minLength": 1, "maxLength": 12}

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": _NAME, "age": {"type": "integer", "minimum": 0,
                                                             "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": _NAME,
                                      "country": {"enum": ["France", "Spain", "Italy"]}},
     "required": ["city", "country"], "additionalProperties": False},
    {"type": "object", "properties": {
        "title": _NAME,
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1,
                 "maxItems": 3}},
     "required": ["title", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1,
                                                         "maximum": 9999},
                                                  "admin": {"type": "boolean"}},
                 "required": ["id", "admin"], "additionalProperties": False},
        "status": {"enum": ["active", "blocked"]}},
     "required": ["user", "status"], "additionalProperties": False},
    {"type": "object", "properties": {
        "points": {"type": "array", "maxItems": 2, "items": {
            "type": "object", "properties": {"x": {"type": "integer", "minimum": -9,
                                                   "maximum": 9},
                                             "y": {"type": "integer", "minimum": -9,
                                                   "maximum": 9}},
            "required": ["x", "y"], "additionalProperties": False}}},
     "required": ["points"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"type": "boolean"},
                                      "confidence": {"enum": ["low", "medium", "high"]},
                                      "note": _NAME},
     "required": ["answer", "confidence"], "additionalProperties": False},
    {"type": "object", "properties": {
        "order": {"type": "object", "properties": {
            "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": _NAME},
            "total": {"type": "integer", "minimum": 0, "maximum": 500}},
            "required": ["items", "total"], "additionalProperties": False}},
     "required": ["order"], "additionalProperties": False},
    {"type": "object", "properties": {"language": {"enum": ["python", "rust", "go"]},
                                      "year": {"type": "integer", "minimum": 1950,
                                               "maximum": 2030}},
     "required": ["language", "year"], "additionalProperties": False},
    {"type": "object", "properties": {"first": _NAME, "last": _NAME,
                                      "nick": {"type": "array", "items": _NAME,
                                               "maxItems": 1}},
     "required": ["first", "last", "nick"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "code": {"type": "integer", "minimum": 100,
                                               "maximum": 599}},
     "required": ["ok", "code"], "additionalProperties": False},
]

PROMPTS = [
    "Describe a person as JSON.",
    "Give me a record about a city.",
    "Output JSON for a blog post.",
    "Return the account data.",
    "Answer in JSON please:",
]


def json_cases() -> list[tuple[dict[str, Any], str]]:
    """50 (schema, prompt) pairs: every schema with every prompt."""
    return [(schema, prompt) for schema in SCHEMAS for prompt in PROMPTS]


CHOICES = ["positive", "negative", "neutral"]
REGEX = r"[A-Z][a-z]{1,6}-\d{2,3}"
