"""The structured-output fields of OpenAI and vLLM request bodies, as one ``StructuredSpec``.

OpenAI: ``response_format`` ``{"type": "text"}`` (no constraint), ``{"type":
"json_object"}``, ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``.
vLLM: ``structured_outputs`` (``{"json" | "regex" | "choice" | "grammar" | "json_object":
...}``) and the older ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
``guided_grammar`` (plus ``guided_decoding_backend``, which may only name xgrammar). A
request may carry at most one constraint; anything malformed is ``RequestError
("invalid_argument")`` naming the field. Whether the backend can compile the constraint is
checked later, by the validator (``pdserve.engine.structured.grammar.check``). Pure Python.
"""

from __future__ import annotations

from typing import Any

from pdserve.engine.sampling_limits import show
from pdserve.engine.structured.spec import StructuredSpec
from pdserve.router.errors import param_of
from pdserve.router.flow import RequestError

_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
_BACKENDS = ("xgrammar", "auto", "")


def _bad(message: str) -> RequestError:
    return RequestError("invalid_argument", message, param_of(message))


def _spec(field: str, kind: str, value: Any) -> StructuredSpec:
    """One constraint from a vLLM-style field (``kind``: json, regex, choice, grammar)."""
    try:
        if kind == "json":
            if isinstance(value, bool) or not isinstance(value, (dict, str)):
                raise _bad(f"'{field}' must be a JSON schema (an object or its JSON text), "
                           f"got {show(value)}")
            return StructuredSpec.json_schema(value)
        if kind == "choice":
            if (not isinstance(value, list) or not value
                    or not all(isinstance(c, str) and c for c in value)):
                raise _bad(f"'{field}' must be a non-empty list of non-empty strings, got "
                           f"{show(value)}")
            return StructuredSpec.choice(value)
        if not isinstance(value, str) or not value:
            raise _bad(f"'{field}' must be a non-empty string, got {show(value)}")
        return StructuredSpec(kind, value)
    except ValueError as exc:
        raise _bad(f"'{field}': {exc}") from None


def _response_format(value: Any) -> StructuredSpec | None:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise _bad(f"'response_format' must be an object with a 'type', got {show(value)}")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredSpec("json_object")
    if kind != "json_schema":
        raise _bad(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', "
                   f"got {show(kind)}")
    inner = value.get("json_schema")
    if not isinstance(inner, dict):
        raise _bad("'response_format.json_schema' must be an object with a 'schema'")
    schema = inner.get("schema")
    if schema is None:
        raise _bad("'response_format.json_schema.schema' is required")
    strict = inner.get("strict", False)
    if not isinstance(strict, bool) and strict is not None:
        raise _bad(f"'response_format.json_schema.strict' must be true or false, got "
                   f"{show(strict)}")
    # Output always follows the schema (strict or not): the grammar allows nothing else.
    return _spec("response_format.json_schema.schema", "json", schema)


def _structured_outputs(value: Any) -> StructuredSpec | None:
    if not isinstance(value, dict):
        raise _bad(f"'structured_outputs' must be an object, got {show(value)}")
    given = {k: v for k, v in value.items() if v is not None and v is not False}
    backend = given.pop("backend", "")
    if backend not in _BACKENDS:
        raise _bad(f"'structured_outputs.backend' {show(backend)} is not available; this "
                   "server uses xgrammar")
    unknown = sorted(set(given) - {"json", "regex", "choice", "grammar", "json_object"})
    if unknown:
        raise _bad(f"'structured_outputs.{unknown[0]}' is not supported")
    if len(given) > 1:
        raise _bad(f"'structured_outputs' may hold one constraint, got {sorted(given)}")
    if not given:
        return None
    (kind, inner), = given.items()
    if kind == "json_object":
        if inner is not True:
            raise _bad("'structured_outputs.json_object' must be true")
        return StructuredSpec("json_object")
    return _spec(f"structured_outputs.{kind}", kind, inner)


def structured_output(body: dict[str, Any]) -> StructuredSpec | None:
    """The one output constraint ``body`` asks for, or None."""
    found: list[tuple[str, StructuredSpec | None]] = []
    if body.get("response_format") is not None:
        found.append(("response_format", _response_format(body["response_format"])))
    if body.get("structured_outputs") is not None:
        found.append(("structured_outputs", _structured_outputs(body["structured_outputs"])))
    for name in _GUIDED:
        if body.get(name) is not None:
            found.append((name, _spec(name, name.removeprefix("guided_"), body[name])))
    backend = body.get("guided_decoding_backend")
    if backend is not None and backend not in _BACKENDS:
        raise _bad(f"'guided_decoding_backend' {show(backend)} is not available; this server "
                   "uses xgrammar")
    if body.get("guided_whitespace_pattern") is not None:
        raise _bad("'guided_whitespace_pattern' is not supported (JSON output is compact)")
    constraints = [(name, spec) for name, spec in found if spec is not None]
    if len(constraints) > 1:
        raise _bad(f"'{constraints[1][0]}' and '{constraints[0][0]}' both constrain the "
                   "output; give one")
    return constraints[0][1] if constraints else None


def structured_field(body: dict[str, Any]) -> str:
    """The field of ``body`` that carries its output constraint (the ``param`` of an error
    about it, e.g. a schema the backend cannot compile)."""
    for name in ("response_format", "structured_outputs", *_GUIDED):
        if body.get(name) is not None:
            return name
    return "response_format"
