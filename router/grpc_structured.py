"""The gRPC ``SamplingParams`` as the validator's ``SamplingArgs`` (``Generate`` and ``Chat``
alike), and its ``structured`` field as a ``StructuredSpec`` (or None).

Malformed values are ``RequestError("invalid_argument")`` naming the field; whether the
backend can compile the constraint is the validator's check, as for HTTP. Pure Python.
"""

from __future__ import annotations

from typing import Any

from pdserve.engine.structured.spec import StructuredSpec
from pdserve.router.flow import RequestError
from pdserve.router.validation import SamplingArgs


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


def sampling_args(s: Any, priority: int) -> SamplingArgs:
    """A ``SamplingParams`` message as the validator takes it (unset fields: None)."""
    return SamplingArgs(
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        top_k=s.top_k, min_p=s.min_p,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        logprobs=s.logprobs if s.HasField("logprobs") else None,
        presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
        repetition_penalty=(s.repetition_penalty if s.HasField("repetition_penalty")
                            else 1.0),
        logit_bias=tuple(sorted(s.logit_bias.items())), min_tokens=s.min_tokens,
        bad_words=tuple(s.bad_words), allowed_token_ids=tuple(s.allowed_token_ids),
        include_stop_str_in_output=s.include_stop_str_in_output,
        skip_special_tokens=(s.skip_special_tokens if s.HasField("skip_special_tokens")
                             else True),
        truncate_prompt_tokens=(s.truncate_prompt_tokens
                                if s.HasField("truncate_prompt_tokens") else None),
        n=s.n if s.HasField("n") else 1,
        prompt_logprobs=s.prompt_logprobs if s.HasField("prompt_logprobs") else None,
        add_special_tokens=(s.add_special_tokens if s.HasField("add_special_tokens")
                            else None),
        structured=structured_from_proto(s), priority=priority,
    )
