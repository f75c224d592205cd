"""The pdserve_client SDK against a scripted in-test gRPC server.

The server here is a test peer for the SDK's own logic, not the router: a real gRPC server on
127.0.0.1 implementing the ``Generation`` service (and the standard health service) with
behaviour chosen by the request id (stream tokens, fail with UNAVAILABLE N times, abort with a
status, stall past the deadline, stream until cancelled). It checks the ``authorization``
header and records each attempt and each cancellation, so the tests can assert retries,
error mapping, metadata, deadlines, cancellation and the typed results exactly.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import pdserve_client as pc
from pdserve.engine.ports import free_port
from pdserve.protos.pdserve.v1 import generation_pb2 as pb
from pdserve.protos.pdserve.v1 import generation_pb2_grpc as pb_grpc

API_KEY = "test-key"
WORDS = ["Hello", ",", " world", "!"]


class ScriptedGeneration(pb_grpc.GenerationServicer):
    """Behaviour by request id: ``flaky-<n>-<tag>`` fails UNAVAILABLE n times then streams;
    ``midfail`` sends one chunk then UNAVAILABLE; ``abort-<CODE>`` aborts with that status;
    ``slow`` stalls 2 s before the first chunk; ``endless-<tag>`` streams until cancelled;
    anything else streams ``WORDS`` and finishes with usage and timing."""

    def __init__(self) -> None:
        self.attempts: Counter[str] = Counter()
        self.requests: list[pb.GenerateRequest] = []
        self.cancelled: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def _check_auth(self, context: grpc.ServicerContext) -> None:
        headers = dict(context.invocation_metadata())
        if headers.get("authorization") != f"Bearer {API_KEY}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")

    def _attempt(self, key: str) -> int:
        with self._lock:
            self.attempts[key] += 1
            return self.attempts[key]

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        self._check_auth(context)
        rid = request.request_id
        attempt = self._attempt(rid)
        with self._lock:
            self.requests.append(request)
        if rid.startswith("flaky-"):
            failures = int(rid.split("-")[1])
            if attempt <= failures:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"warming up ({attempt})")
        elif rid == "midfail":
            yield pb.GenerateResponse(request_id=rid, token_ids=[1], text="a")
            context.abort(grpc.StatusCode.UNAVAILABLE, "decode worker lost")
        elif rid.startswith("abort-"):
            code = grpc.StatusCode[rid.removeprefix("abort-")]
            context.abort(code, f"scripted {code.name}")
        elif rid == "slow":
            end = time.monotonic() + 2.0
            while context.is_active() and time.monotonic() < end:
                time.sleep(0.01)
        elif rid.startswith("endless-"):
            event = threading.Event()
            with self._lock:
                self.cancelled[rid] = event
            context.add_callback(event.set)
            token = 0
            while context.is_active():
                yield pb.GenerateResponse(request_id=rid, token_ids=[token], text="x")
                token += 1
                time.sleep(0.005)
            return
        for i, word in enumerate(WORDS):
            yield pb.GenerateResponse(
                request_id=rid or "assigned-1",
                token_ids=[10 + i],
                text=word,
                logprobs=[
                    pb.TokenLogprobs(
                        token_id=10 + i, logprob=-0.5, top=[pb.TokenLogprob(token_id=7, logprob=-1)]
                    )
                ],
            )
        yield pb.GenerateResponse(
            request_id=rid or "assigned-1",
            finish_reason="stop",
            stop_reason="!",
            usage=pb.Usage(prompt_tokens=3, completion_tokens=len(WORDS), cached_tokens=2),
            timing=pb.Timing(
                queue_s=0.1, prefill_s=0.2, transfer_s=0.05, first_token_s=0.4, total_s=1.0
            ),
        )

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        self._check_auth(context)
        info = pb.ModelInfo(id="tiny", max_model_len=2048, vocab_size=512, dtype="float32")
        return pb.ListModelsResponse(models=[info])

    def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.ServicerContext
    ) -> pb.TokenizeResponse:
        self._check_auth(context)
        if request.text.startswith("flaky") and self._attempt(request.text) <= 2:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        if request.text == "busy":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "decode pool full")
        return pb.TokenizeResponse(token_ids=[ord(c) for c in request.text])

    def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.ServicerContext
    ) -> pb.GetStatsResponse:
        self._check_auth(context)
        worker = pb.WorkerStats(
            worker_id="decode-0", role="decode", alive=True, kv_blocks_total=64, kv_blocks_used=3
        )
        return pb.GetStatsResponse(
            workers=[worker], requests_total=5, requests_running=1, metrics={"ttft_s_sum": 1.5}
        )


@dataclass
class Peer:
    target: str
    servicer: ScriptedGeneration
    server: grpc.Server


def _start(credentials: grpc.ServerCredentials | None = None) -> Peer:
    servicer = ScriptedGeneration()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return Peer(f"127.0.0.1:{port}", servicer, server)


@pytest.fixture(scope="module")
def peer() -> Iterator[Peer]:
    p = _start()
    yield p
    p.server.stop(grace=None)


@pytest.fixture()
def client(peer: Peer) -> Iterator[pc.Client]:
    with pc.Client(peer.target, api_key=API_KEY, timeout=10, backoff=0.01) as c:
        yield c


# --- typed results ------------------------------------------------------------------------


def test_generate_collects_stream_into_typed_completion(client: pc.Client) -> None:
    completion = client.generate("hi", max_tokens=8, request_id="plain-1")

    assert completion == pc.Completion(
        request_id="plain-1",
        token_ids=(10, 11, 12, 13),
        text="Hello, world!",
        finish_reason="stop",
        usage=pc.Usage(prompt_tokens=3, completion_tokens=4, cached_tokens=2),
        timing=pc.Timing(
            queue_s=pytest.approx(0.1),
            prefill_s=pytest.approx(0.2),
            transfer_s=pytest.approx(0.05),
            first_token_s=pytest.approx(0.4),
            total_s=pytest.approx(1.0),
        ),
        logprobs=tuple(
            pc.TokenLogprobs(10 + i, -0.5, (pc.TokenLogprob(7, -1.0),)) for i in range(4)
        ),
        stop_reason="!",
    )


def test_stream_yields_chunks_with_final_metadata_only_on_last(client: pc.Client) -> None:
    chunks = list(client.stream("hi", request_id="plain-2"))

    assert [c.text for c in chunks] == [*WORDS, ""]
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage == pc.Usage(3, 4, 2)
    with pytest.raises(AttributeError):
        chunks[0].text = "changed"  # type: ignore[misc]


def test_request_carries_prompt_ids_and_only_the_sampling_options_given(
    client: pc.Client, peer: Peer
) -> None:
    client.generate(
        [5, 6, 7],
        max_tokens=4,
        temperature=0.0,
        seed=11,
        stop="\n",
        stop_token_ids=[2],
        logprobs=1,
        priority=3,
        request_id="params-1",
    )

    request = next(r for r in peer.servicer.requests if r.request_id == "params-1")
    assert request.WhichOneof("prompt") == "token_ids"
    assert list(request.token_ids.ids) == [5, 6, 7]
    s = request.sampling
    assert s.HasField("max_tokens") and s.max_tokens == 4
    assert s.HasField("temperature") and s.temperature == 0.0
    assert not s.HasField("top_p")
    assert s.seed == 11 and s.logprobs == 1
    assert list(s.stop) == ["\n"] and list(s.stop_token_ids) == [2]
    assert request.priority == 3


def test_prompt_of_wrong_type_is_rejected_before_sending(client: pc.Client) -> None:
    with pytest.raises(TypeError, match="prompt"):
        client.stream(3.5)  # type: ignore[arg-type]


def test_list_models_tokenize_and_stats_return_typed_values(client: pc.Client) -> None:
    assert client.list_models() == [pc.ModelInfo("tiny", 2048, 512, "float32")]
    assert client.tokenize("ab") == [97, 98]
    stats = client.stats()
    assert stats.requests_total == 5 and stats.requests_running == 1
    assert stats.workers[0].worker_id == "decode-0" and stats.workers[0].kv_blocks_used == 3
    assert stats.metrics == {"ttft_s_sum": 1.5}


def test_health_is_true_when_serving_and_false_when_unreachable(client: pc.Client) -> None:
    assert client.health() is True
    with pc.Client(f"127.0.0.1:{free_port()}", retries=0, timeout=2) as down:
        assert down.health() is False


# --- retries ------------------------------------------------------------------------------


def test_stream_retries_unavailable_before_first_chunk(client: pc.Client, peer: Peer) -> None:
    completion = client.generate("hi", request_id="flaky-2-a")

    assert completion.text == "Hello, world!"
    assert peer.servicer.attempts["flaky-2-a"] == 3


def test_retries_give_up_after_the_configured_count(peer: Peer) -> None:
    with pc.Client(peer.target, api_key=API_KEY, retries=1, backoff=0.01) as c:
        with pytest.raises(pc.Unavailable, match="warming up") as info:
            c.generate("hi", request_id="flaky-5-b")

    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert peer.servicer.attempts["flaky-5-b"] == 2


def test_stream_is_not_retried_after_a_chunk_arrived(client: pc.Client, peer: Peer) -> None:
    received: list[pc.Chunk] = []
    with pytest.raises(pc.Unavailable, match="decode worker lost"):
        for chunk in client.stream("hi", request_id="midfail"):
            received.append(chunk)

    assert [c.token_ids for c in received] == [(1,)]
    assert peer.servicer.attempts["midfail"] == 1


def test_unary_call_retries_unavailable(client: pc.Client, peer: Peer) -> None:
    assert client.tokenize("flaky") == [ord(c) for c in "flaky"]
    assert peer.servicer.attempts["flaky"] == 3


# --- errors, metadata, deadlines ----------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        ("INVALID_ARGUMENT", pc.InvalidArgument),
        ("RESOURCE_EXHAUSTED", pc.ResourceExhausted),
        ("CANCELLED", pc.Cancelled),
        ("NOT_FOUND", pc.NotFound),
        ("INTERNAL", pc.PdserveError),
    ],
)
def test_server_status_maps_to_error_class_with_server_message(
    client: pc.Client, code: str, error_type: type[pc.PdserveError]
) -> None:
    with pytest.raises(error_type) as info:
        client.generate("hi", request_id=f"abort-{code}")

    assert type(info.value) is error_type
    assert info.value.code == grpc.StatusCode[code]
    assert info.value.message == f"scripted {code}"


def test_unary_error_is_mapped_and_not_retried(client: pc.Client) -> None:
    with pytest.raises(pc.ResourceExhausted, match="decode pool full"):
        client.tokenize("busy")


def test_api_key_is_sent_as_bearer_authorization(peer: Peer) -> None:
    with pc.Client(peer.target, api_key="wrong") as c:
        with pytest.raises(pc.Unauthenticated, match="API key"):
            c.list_models()
    with pc.Client(peer.target) as c:
        with pytest.raises(pc.Unauthenticated):
            c.generate("hi")


def test_timeout_raises_deadline_exceeded(client: pc.Client) -> None:
    start = time.monotonic()
    with pytest.raises(pc.DeadlineExceeded):
        client.generate("hi", request_id="slow", timeout=0.3)

    assert time.monotonic() - start < 1.5


def test_client_default_timeout_applies_to_each_call(peer: Peer) -> None:
    with pc.Client(peer.target, api_key=API_KEY, timeout=0.3) as c:
        with pytest.raises(pc.DeadlineExceeded):
            c.generate("hi", request_id="slow")


# --- cancellation -------------------------------------------------------------------------


def test_break_out_of_stream_cancels_the_rpc(client: pc.Client, peer: Peer) -> None:
    for i, _chunk in enumerate(client.stream("hi", request_id="endless-break")):
        if i == 2:
            break

    assert peer.servicer.cancelled["endless-break"].wait(5)


def test_closing_stream_cancels_the_rpc_and_ends_iteration(client: pc.Client, peer: Peer) -> None:
    stream = client.stream("hi", request_id="endless-close")
    first = next(stream)
    stream.close()

    assert first.token_ids == (0,)
    assert peer.servicer.cancelled["endless-close"].wait(5)
    assert list(stream) == []


# --- asyncio client -----------------------------------------------------------------------


def test_async_client_generate_stream_and_unary_calls(peer: Peer) -> None:
    async def main() -> None:
        async with pc.AsyncClient(peer.target, api_key=API_KEY, backoff=0.01) as c:
            completion = await c.generate("hi", request_id="flaky-1-async")
            assert completion.text == "Hello, world!" and completion.usage == pc.Usage(3, 4, 2)
            texts = [chunk.text async for chunk in c.stream("hi", request_id="async-2")]
            assert texts == [*WORDS, ""]
            assert await c.tokenize("ab") == [97, 98]
            assert (await c.list_models())[0].id == "tiny"
            assert (await c.stats()).requests_total == 5
            assert await c.health() is True

    asyncio.run(main())
    assert peer.servicer.attempts["flaky-1-async"] == 2


def test_async_errors_and_deadline_are_mapped(peer: Peer) -> None:
    async def main() -> None:
        async with pc.AsyncClient(peer.target, api_key=API_KEY) as c:
            with pytest.raises(pc.InvalidArgument, match="scripted INVALID_ARGUMENT"):
                await c.generate("hi", request_id="abort-INVALID_ARGUMENT")
            with pytest.raises(pc.DeadlineExceeded):
                await c.generate("hi", request_id="slow", timeout=0.3)
        async with pc.AsyncClient(peer.target, api_key="wrong") as c:
            with pytest.raises(pc.Unauthenticated):
                await c.tokenize("x")

    asyncio.run(main())


def test_async_stream_context_exit_cancels_the_rpc(peer: Peer) -> None:
    async def main() -> None:
        async with pc.AsyncClient(peer.target, api_key=API_KEY) as c:
            async with c.stream("hi", request_id="endless-async") as chunks:
                async for chunk in chunks:
                    if chunk.token_ids == (2,):
                        break
            assert await asyncio.to_thread(peer.servicer.cancelled["endless-async"].wait, 5)

    asyncio.run(main())


# --- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("TLS test needs the openssl command to make a self-signed certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "1",
            "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


def test_tls_with_root_certificates_connects(self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    tls_peer = _start(creds)
    try:
        with pc.Client(tls_peer.target, api_key=API_KEY, tls=True, root_certificates=cert) as c:
            assert c.generate("hi").text == "Hello, world!"
        with pc.Client(
            tls_peer.target, api_key=API_KEY, tls=True, root_certificates=cert.read_bytes()
        ) as c:
            assert c.health() is True
        # Without the self-signed root the handshake fails: no silent fallback to plaintext.
        with pc.Client(tls_peer.target, api_key=API_KEY, tls=True, retries=0, timeout=5) as c:
            with pytest.raises(pc.Unavailable):
                c.list_models()
    finally:
        tls_peer.server.stop(grace=None)


# --- packaging ----------------------------------------------------------------------------


def test_import_pulls_in_no_engine_or_ml_dependencies() -> None:
    code = (
        "import sys, pdserve_client\n"
        "heavy = [m for m in ('torch', 'ray', 'transformers', 'engine', 'router')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == ""
