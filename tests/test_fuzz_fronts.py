"""Both fronts under hostile input (hypothesis, bounded, derandomized): every field at its
edges and beyond, wrong types, random bytes, over TLS with an API key.

Each answer must be a success or a clear INVALID_ARGUMENT / 400 that names an offending
field (for random bytes: a clear INVALID_ARGUMENT / 400); no answer longer than 1,000
characters or carrying a traceback; no worker restarts; and a greedy reference request
gives the same tokens afterwards as before. The oracle below (which values are valid) is
written out by hand, independently of the server's limits table.
"""

from __future__ import annotations

import http.client
import json
import math
import ssl
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.protos.pdserve.v1 import generation_pb2 as pb
from tests.service import HARDENED_API_KEY as KEY
from tests.service import ServiceThread, hardened_service

VOCAB, MAX_LEN = 512, 4096
AUTH = [("authorization", f"Bearer {KEY}")]
GENERATE = "/pdserve.v1.Generation/Generate"


def case(value: Any, ok: bool) -> tuple[Any, bool]:
    return value, ok


# Per field: (value, valid?) for the JSON front. "omit" leaves the field out.
HTTP_CASES: dict[str, list[tuple[Any, bool]]] = {
    "prompt": [case("Hello there", True), case([5, 6, 7, 8], True), case("", False),
               case([], False), case([-1], False), case([VOCAB], False), case([5, 2**70], False),
               case("\ud800 lone", False), case(123, False), case([1.5], False),
               case("x" * 200_000, False), case([[1, 2], [3]], True), case([[1, 2], []], False),
               case(None, False)],
    "max_tokens": [case(1, True), case(3, True), case("omit", True), case(0, False),
                   case(-1, False), case(2**31, False), case(2**31 - 1, False),
                   case(MAX_LEN, False), case(1.5, False), case("3", False), case(True, False)],
    "temperature": [case(0, True), case(0.7, True), case(100, True), case(1e-30, True),
                    case(-0.001, False), case(100.001, False), case(1e308, False),
                    case("hot", False), case(float("inf"), False), case(float("nan"), False)],
    "top_p": [case(1e-9, True), case(0.5, True), case(1, True), case(0, False),
              case(-1, False), case(1.0000001, False), case("x", False)],
    "top_k": [case(-1, True), case(0, True), case(5, True), case(2**31 - 1, True),
              case(-2, False), case(2**31, False), case(2**63, False), case(2**64, False),
              case(1.5, False), case("k", False)],
    "min_p": [case(0, True), case(0.5, True), case(1, True), case(-0.1, False),
              case(1.1, False)],
    "seed": [case(0, True), case(7, True), case(2**64 - 1, True), case(-1, False),
             case(2**64, False), case(2**70, False), case(1.5, False), case("s", False)],
    "stop": [case("omit", True), case("zz", True), case(["a b", "c"], True), case([], True),
             case([""], False), case(["a"] * 17, False), case("x" * 257, False),
             case([1], False), case(5, False), case(["\udfff"], False)],
    "stop_token_ids": [case([5], True), case([], True), case([-1], False),
                       case([2**40], False), case([VOCAB], False), case(["a"], False),
                       case(5, False), case(list(range(300)), False)],
    "logprobs": [case("omit", True), case(0, True), case(2, True), case(20, True),
                 case(-1, False), case(21, False), case(2**40, False)],
    "ignore_eos": [case(True, True), case(False, True), case("yes", False), case(1, False)],
    "n": [case("omit", True), case(1, True), case(2, True), case(0, False), case(17, False)],
    "model": [case("tiny", True), case("", True), case("x" * 100_000, False),
              case("nope", False), case(7, False)],
}
FIELD_WORDS = {"prompt": ("prompt",), "model": ("model",), "max_tokens": ("max_tokens",),
               "stop": ("'stop'", "'stop["), "request_id": ("request id",)}


def http_body(draw_cases: dict[str, tuple[Any, bool]]) -> tuple[dict[str, Any], set[str]]:
    body, bad = {}, set()
    for name, (value, ok) in draw_cases.items():
        if value != "omit":
            body[name] = value
        if not ok:
            bad.add(name)
    return body, bad


def with_bad_fields(cases: dict[str, list[tuple[Any, bool]]]) -> st.SearchStrategy:
    """A value per field: most requests have 0-3 fields beyond their edges (so that every
    kind of answer comes up often), the others valid values, edges included."""

    @st.composite
    def draw_request(draw: st.DrawFn) -> dict[str, tuple[Any, bool]]:
        count = draw(st.sampled_from([0, 0, 1, 1, 2, 3]))
        can_be_bad = sorted(n for n, options in cases.items() if not all(ok for _, ok in options))
        bad = draw(st.sets(st.sampled_from(can_be_bad), min_size=count, max_size=count))
        out = {}
        for name, options in cases.items():
            pool = [c for c in options if c[1] != (name in bad)]
            out[name] = draw(st.sampled_from(pool))
        return out

    return draw_request()


http_requests = with_bad_fields(HTTP_CASES)


@pytest.fixture(scope="module")
def svc() -> ServiceThread:
    return hardened_service()


@pytest.fixture(scope="module")
def tls(svc: ServiceThread) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(svc.cert))  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def channel(svc: ServiceThread):
    creds = grpc.ssl_channel_credentials(svc.cert.read_bytes())  # type: ignore[attr-defined]
    with grpc.secure_channel(svc.target, creds,
                             options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        yield ch


class Http:
    def __init__(self, svc: ServiceThread, tls: ssl.SSLContext) -> None:
        assert svc.router is not None
        self.conn = http.client.HTTPSConnection("127.0.0.1", svc.router.http_port,
                                                context=tls, timeout=60)

    def post(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        self.conn.request("POST", path, body=body, headers={
            "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        resp = self.conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw)


def check_message(message: str) -> None:
    assert len(message) <= 1000, message[:200]
    for marker in ("Traceback", 'File "', "\x1b[", "pid=", "ray::"):
        assert marker not in message, message


def greedy(channel: grpc.Channel) -> list[int]:
    call = channel.unary_stream(GENERATE, request_serializer=pb.GenerateRequest.SerializeToString,
                                response_deserializer=pb.GenerateResponse.FromString)
    request = pb.GenerateRequest(text="The reference prompt, once more", sampling=pb.SamplingParams(
        max_tokens=16, temperature=0.0, ignore_eos=True))
    return [t for r in call(request, metadata=AUTH, timeout=60) for t in r.token_ids]


def test_fuzz_both_fronts_answers_clearly_and_hurts_no_one(svc, tls, channel) -> None:
    router = svc.router
    restarts = router.cluster.restarts
    generations = {w: h.generation for w, h in router.cluster.workers.items()}
    reference = greedy(channel)
    conn = Http(svc, tls)
    tally = {"http_ok": 0, "http_400": 0, "grpc_ok": 0, "grpc_invalid": 0}

    def http_check(cases: dict[str, tuple[Any, bool]]) -> None:
        body, bad = http_body(cases)
        status, answer = conn.post("/v1/completions", json.dumps(body).encode())
        if not bad:
            assert status == 200, answer
            assert answer["choices"][0]["finish_reason"] in ("length", "stop")
            tally["http_ok"] += 1
            return
        error = answer["error"]
        if status == 404:  # an unknown model is "not found", as OpenAI and vLLM answer
            assert "model" in bad and error["code"] == "model_not_found", (bad, answer)
        else:
            assert status == 400, (bad, answer)
            assert error["code"] == "invalid_argument", (bad, answer)
        assert error["type"] == "invalid_request_error"
        check_message(error["message"])
        named = {f for f in bad if any(w in error["message"]
                                       for w in FIELD_WORDS.get(f, (f"'{f}'",)))}
        assert named, (bad, error["message"])
        tally["http_400"] += 1

    for cases in one_at_a_time(HTTP_CASES):  # every value alone, the rest valid
        http_check(cases)
    swept = dict(tally)

    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(http_requests)
    def http_field_edges(cases: dict[str, tuple[Any, bool]]) -> None:
        http_check(cases)

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=2048) | st.text(max_size=300).map(str.encode) |
           st.recursive(st.none() | st.integers() | st.floats() | st.text(max_size=20),
                        lambda inner: st.lists(inner, max_size=4) |
                        st.dictionaries(st.text(max_size=8), inner, max_size=4),
                        max_leaves=20).map(lambda v: json.dumps(v).encode()))
    def http_random_bodies(raw: bytes) -> None:
        for path in ("/v1/completions", "/v1/chat/completions"):
            status, answer = conn.post(path, raw)
            assert status in (200, 400), answer
            if status == 400:
                check_message(answer["error"]["message"])
                tally["http_400"] += 1

    http_field_edges()
    http_random_bodies()
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, answer = conn.post("/v1/completions", deep)
    assert status == 400 and "nested too deeply" in answer["error"]["message"]

    call = channel.unary_stream(GENERATE, request_serializer=lambda m: m,
                                response_deserializer=pb.GenerateResponse.FromString)

    def grpc_answer(raw: bytes) -> tuple[grpc.StatusCode, str]:
        try:
            for _ in call(raw, metadata=AUTH, timeout=60):
                pass
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""

    def grpc_check(drawn: tuple[pb.GenerateRequest, set[str]]) -> None:
        request, bad = drawn
        code, message = grpc_answer(request.SerializeToString())
        check_message(message)
        if not bad:
            assert code == grpc.StatusCode.OK, message
            tally["grpc_ok"] += 1
            return
        if code == grpc.StatusCode.NOT_FOUND:  # an unknown model
            assert "model" in bad, (bad, message)
        else:
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (bad, code, message)
        assert any(w in message for f in bad for w in FIELD_WORDS.get(f, (f"'{f}'",))), (
            bad, message)
        tally["grpc_invalid"] += 1

    for cases in one_at_a_time(GRPC_CASES):
        grpc_check(grpc_request(cases, ignore_eos=True))
    swept_grpc = {k: tally[k] - swept.get(k, 0) for k in ("grpc_ok", "grpc_invalid")}

    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(grpc_requests())
    def grpc_field_edges(drawn: tuple[pb.GenerateRequest, set[str]]) -> None:
        grpc_check(drawn)

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=512))
    def grpc_random_bytes(raw: bytes) -> None:
        # A trailing sampling {max_tokens: 2} keeps a prompt the bytes happen to spell short.
        code, message = grpc_answer(raw + b"\x22\x02\x08\x02")
        check_message(message)
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, message)
        tally["grpc_ok" if code == grpc.StatusCode.OK else "grpc_invalid"] += 1

    grpc_field_edges()
    grpc_random_bytes()

    assert router.cluster.restarts == restarts
    assert {w: h.generation for w, h in router.cluster.workers.items()} == generations
    assert all(h.alive for h in router.cluster.workers.values())
    assert greedy(channel) == reference
    # Every value of every field was sent alone: each valid one served, each other refused.
    n_valid = sum(ok for cases in HTTP_CASES.values() for _, ok in cases)
    assert swept["http_ok"] == n_valid and swept["http_400"] == sum(
        len(c) for c in HTTP_CASES.values()) - n_valid, swept
    n_valid = sum(ok for cases in GRPC_CASES.values() for _, ok in cases)
    assert swept_grpc["grpc_ok"] == n_valid, swept_grpc
    assert min(tally.values()) >= 30, tally
    stats = svc.wait_idle()
    assert all(s["num_used_blocks"] == 0 for s in stats.values())


# --------------------------------------------------------------------------- gRPC cases

F32_MAX = 3.4028234663852886e38
GRPC_CASES: dict[str, list[tuple[Any, bool]]] = {
    "max_tokens": [case(None, True), case(2, True), case(0, False), case(2**32 - 1, False),
                   case(MAX_LEN, False)],
    "temperature": [case(None, True), case(0.0, True), case(0.5, True), case(-0.0, True),
                    case(-1.0, False), case(F32_MAX, False), case(math.inf, False),
                    case(math.nan, False), case(1e-40, True)],
    "top_p": [case(None, True), case(0.3, True), case(0.0, False), case(2.0, False),
              case(math.nan, False)],
    "top_k": [case(0, True), case(-1, True), case(2**31 - 1, True), case(-2**31, False),
              case(-2, False)],
    "min_p": [case(0.0, True), case(1.0, True), case(-1.0, False), case(math.inf, False)],
    "seed": [case(None, True), case(0, True), case(2**64 - 1, True)],
    "stop": [case([], True), case(["a"], True), case([""], False), case(["s"] * 17, False)],
    "stop_token_ids": [case([], True), case([3], True), case([VOCAB], False),
                       case([2**32 - 1], False)],
    "logprobs": [case(None, True), case(3, True), case(21, False), case(2**32 - 1, False)],
    "prompt": [case("Hi there", True), case([5, 6], True), case("", False), case([], False),
               case([VOCAB], False), case([2**32 - 1], False), case("y" * 40_000, False),
               case(list(range(5, 500)) * 9, False)],
    "model": [case("", True), case("tiny", True), case("m" * 50_000, False)],
    "request_id": [case("", True), case("r" * 300, False)],
}


def one_at_a_time(cases: dict[str, list[tuple[Any, bool]]]) -> list[dict[str, tuple]]:
    """For each value of each field, a request with that value and the first valid value of
    every other field."""
    default = {name: next(c for c in options if c[1]) for name, options in cases.items()}
    return [{**default, name: c} for name, options in cases.items() for c in options]


@st.composite
def grpc_requests(draw: st.DrawFn) -> tuple[pb.GenerateRequest, set[str]]:
    return grpc_request(draw(with_bad_fields(GRPC_CASES)), draw(st.booleans()))


def grpc_request(chosen: dict[str, tuple[Any, bool]],
                 ignore_eos: bool) -> tuple[pb.GenerateRequest, set[str]]:
    bad = {name for name, (_, ok) in chosen.items() if not ok}
    s = pb.SamplingParams()
    for name in ("max_tokens", "temperature", "top_p", "seed", "logprobs"):
        value = chosen[name][0]
        if value is not None:
            setattr(s, name, value)
    if chosen["max_tokens"][0] is None:
        s.max_tokens = 2  # unset means "up to the model's length": slow, and not an edge here
    s.top_k, s.min_p = chosen["top_k"][0], chosen["min_p"][0]
    s.stop.extend(chosen["stop"][0])
    s.stop_token_ids.extend(chosen["stop_token_ids"][0])
    s.ignore_eos = ignore_eos
    request = pb.GenerateRequest(sampling=s, model=chosen["model"][0])
    request.request_id = chosen["request_id"][0]
    prompt = chosen["prompt"][0]
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request, bad
