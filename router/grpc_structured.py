"""The gRPC ``SamplingParams.structured`` field as a ``StructuredSpec`` (or None).

Malformed values are ``RequestError("invalid_argument")`` naming the field; whether the
backend can compile the constraint is the validator's check, as for HTTP. Pure Python.
"""

from __future__ import annotations

from typing import Any

from pdserve.engine.structured.spec import StructuredSpec
from pdserve.router.flow import RequestError


def structured_from_proto(sampling: Any) -> StructuredSpec | None:
    """``sampling`` is a ``pdserve.v1.SamplingParams`` message."""
    if not sampling.HasField("structured"):
        return None
    msg = sampling.structured
    kind = msg.WhichOneof("kind")
    try:
        if kind is None:
            return None
        if kind == "json_schema":
            return StructuredSpec("json", msg.json_schema)
        if kind == "json_object":
            return StructuredSpec("json_object") if msg.json_object else None
        if kind == "choice":
            return StructuredSpec.choice(list(msg.choice.choices))
        return StructuredSpec(kind, getattr(msg, kind))
    except ValueError as exc:
        raise RequestError("invalid_argument", f"'sampling.structured.{kind}': {exc}",
                           "structured") from None
