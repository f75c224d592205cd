"""The request bounds as pure logic (milliseconds): the sampling-field table, the byte bound
derived from the tokenizer, and the clipping of what error messages echo."""

from __future__ import annotations

import math
import random

import pytest

from pdserve.engine.model.builtin import resolve_model
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.sampling_limits import FIELDS, Field, check, show
from pdserve.engine.tokenizer import Tokenizer
from pdserve.router import openai_types as oai
from pdserve.router.errors import clip, public_reason
from pdserve.router.flow import RequestError
from pdserve.router.validation import longest_token_bytes, utf8_size


@pytest.mark.parametrize(("name", "good", "bad"), [
    ("seed", [0, 2**64 - 1], [-1, 2**64, 1.0, True, "1"]),
    ("top_k", [-1, 0, 2**31 - 1], [-2, 2**31, 2**63, 0.5]),
    ("temperature", [0, 0.0, 1e-30, 100], [-1e-9, 100.5, math.nan, math.inf, "hot"]),
    ("top_p", [1e-12, 1], [0, -0.1, 1.01, math.nan]),
    ("min_p", [0, 1], [-0.01, 1.5]),
    ("max_tokens", [1, 2**31 - 1], [0, -5, 2**31, 1.5, True]),
    ("logprobs", [0, 20], [-1, 21]),
    ("stop", [(), ("a",), ["x" * 256] * 16], [("",), ("a",) * 17, ("x" * 257,), (1,), "ab"]),
    ("stop_token_ids", [(), (0, 5), [2**31 - 1] * 256], [(-1,), (2**31,), [1] * 257, ("a",)]),
    ("ignore_eos", [True, False], [1, "yes", None]),
])
def test_every_field_is_bounded_and_named(name: str, good: list, bad: list) -> None:
    for value in good:
        check(name, value)
    for value in bad:
        if value is None and name != "ignore_eos":
            continue
        with pytest.raises(ValueError, match=f"^'{name}' must be"):
            FIELDS[name].check(name, value)


def test_sampling_params_apply_the_table_and_tiny_temperatures_are_greedy() -> None:
    with pytest.raises(ValueError, match=rf"'seed' must be an integer in \[0, {2**64 - 1}\]"):
        SamplingParams(seed=2**64)
    params = SamplingParams(temperature=1e-30, stop=["a"], stop_token_ids=[3], top_k=5)
    assert params.greedy and params.stop == ("a",) and params.stop_token_ids == (3,)
    assert SamplingParams(temperature=2).temperature == 2.0  # widened to float
    assert set(FIELDS) <= {f for f in SamplingParams.__slots__}  # type: ignore[attr-defined]


def test_messages_quote_little_of_a_huge_value() -> None:
    text = show("x" * 100_000)
    assert len(text) <= 40 and "100002 characters" in text
    with pytest.raises(ValueError) as err:
        Field(int, 0, 10).check("n", "y" * 100_000)
    assert len(str(err.value)) < 120
    assert clip("m" * 100_000).endswith("(100000 characters)") and len(clip("m" * 100_000)) == 64
    assert clip("short") == "short"
    with pytest.raises(RequestError) as bad:
        oai.parse_completion({"prompt": "hi", "temperature": "h" * 50_000})
    assert len(bad.value.message) < 120 and "'temperature'" in bad.value.message


def test_public_reason_keeps_the_type_and_first_line_only() -> None:
    class Carried(Exception):
        def __init__(self, cause: Exception) -> None:
            super().__init__("\x1b[36mray::DecodeWorker.reserve()\x1b[39m (pid=1, ip=1.2.3.4)\n"
                             '  File "/x.py", line 3, in f\n    raise\n' + str(cause))
            self.cause = cause

    reason = public_reason(Carried(ValueError("prompt is empty\nmore detail")))
    assert reason == "ValueError: prompt is empty"
    assert public_reason(Carried(ValueError("p")), with_type=False) == "p"
    assert len(public_reason(RuntimeError("z" * 5000))) <= 200


def test_the_byte_bound_never_refuses_a_prompt_that_fits() -> None:
    """A text over max_len * (longest token + 1) bytes always has more than max_len tokens:
    the bound derived from the vocabulary refuses only prompts that cannot fit."""
    tokenizer = Tokenizer(resolve_model("tiny"))
    per_token = longest_token_bytes(tokenizer) + 1
    rng = random.Random(4)
    alphabet = "abcdefghij klmnop\n\t.,;ÄéЖ中文🙂" + "".join(chr(c) for c in range(0x20, 0x7f))
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 600)))
        ids = tokenizer.encode(text)
        assert len(text.encode()) <= len(ids) * per_token, (text, len(ids))
    assert utf8_size("prompt", "aé中🙂") == 10
    with pytest.raises(RequestError, match="'prompt' is not valid Unicode text"):
        utf8_size("prompt", "ok \ud800")
