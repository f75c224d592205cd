"""The transfer contract on both KV transports, between peers in separate processes.

Every test of the suite runs once per transport: ``nixl`` (NIXL agents, UCX over loopback) and
``nccl`` (torch.distributed pair groups; gloo on CPU). Each peer is a spawned process owning one
connector around a random KV cache; the test drives it through a pipe. Every call has a
deadline and every process is killed at teardown, so a hung transfer fails the test instead of
hanging CI. The nccl backend's own behaviour is tested in test_kvtransfer_nccl.py.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from typing import Any

import numpy as np
import pytest

from pdserve.engine.ports import free_port
from pdserve.kvtransfer.auth import ChannelKey

pytest.importorskip("zmq")

TRANSPORTS = ["nixl", "nccl"]

SPEC = {"num_layers": 4, "num_kv_heads": 2, "head_dim": 32, "block_size": 16, "dtype": "float32"}
BLOCK_BYTES = 4 * 2 * 16 * 2 * 32 * 4
MODEL = "tiny-test"
KEY = ChannelKey(bytes(range(32)))  # both processes' connectors: one cluster
CALL_TIMEOUT_S = 30.0
STARTUP_TIMEOUT_S = 90.0  # a spawned peer imports torch: slow on a loaded 2-core machine


def _connector(transport: str, cache: Any, spec: Any, port: int, lease_s: float,
               heads: tuple[int, int] | None, total_heads: int | None) -> Any:
    if transport == "nixl":
        from pdserve.kvtransfer.nixl import NixlConfig, NixlConnector

        config = NixlConfig(model=MODEL, port=port, lease_s=lease_s, handshake_timeout_s=2.0,
                            channel_key=KEY)
        return NixlConnector(cache, spec, config)
    from pdserve.kvtransfer.nccl import NcclConfig, NcclConnector

    return NcclConnector(cache, spec, NcclConfig(
        model=MODEL, port=port, lease_s=lease_s, handshake_timeout_s=2.0, op_timeout_s=5.0,
        keepalive_s=0.25, peer_timeout_s=2.0, kv_heads=heads, total_kv_heads=total_heads,
        channel_key=KEY,
    ))


def _peer_main(
    conn: Any, transport: str, spec_kwargs: dict, num_blocks: int, seed: int, port: int,
    lease_s: float, heads: tuple[int, int] | None, total_heads: int | None,
) -> None:
    """Child process: one connector, driven by (command, args) messages."""
    import torch

    from pdserve.engine.config import KVCacheSpec

    spec = KVCacheSpec(**spec_kwargs)
    dtype = getattr(torch, spec.dtype)
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(spec.shape(num_blocks), generator=gen).to(dtype)
    connector = _connector(transport, cache, spec, port, lease_s, heads, total_heads)
    outcome: dict[str, tuple[str, str]] = {}

    def drain() -> None:
        result = connector.poll()
        for rid in result.sent:
            outcome[rid] = ("sent", "")
        for rec in result.received:
            outcome[rec.request_id] = ("received", rec.payload.decode())
        for failure in result.failed:
            outcome[failure.request_id] = ("failed", f"{failure.kind.value}: {failure.message}")

    while True:
        cmd, args = conn.recv()
        try:
            if cmd == "describe":
                value: Any = connector.describe()
            elif cmd == "blocks":
                rows = cache.view(torch.uint8).reshape(num_blocks, -1)
                value = rows[list(args[0])].numpy().tobytes()
            elif cmd == "expect":
                value = connector.expect(*args)
            elif cmd == "write":
                target, rid, src, dst, last = args
                value = connector.write_blocks(
                    target, rid, src, dst, last=last, payload=b"tok" if last else b""
                )
            elif cmd == "connect":
                value = connector.connect(args[0])
            elif cmd == "abort":
                value = connector.abort(args[0])
            elif cmd == "stats":
                value = connector.stats()
            elif cmd == "active":  # requests either ledger still tracks (white box)
                drain()
                value = (connector._send.active(), connector._recv.active())
            elif cmd == "wait":  # poll until every named request has an outcome
                rids, timeout = args
                deadline = time.monotonic() + timeout
                while True:
                    drain()
                    if all(r in outcome for r in rids) or time.monotonic() > deadline:
                        break
                    time.sleep(0.002)
                value = {r: outcome.get(r, ("pending", "")) for r in rids}
            elif cmd == "stop":
                connector.close()
                conn.send(("ok", None))
                return
            else:
                raise ValueError(f"unknown command {cmd}")
            conn.send(("ok", value))
        except Exception as exc:
            conn.send(("err", f"{type(exc).__name__}: {exc}"))


class Peer:
    """Parent-side handle of a peer process."""

    def __init__(
        self, transport: str, num_blocks: int, seed: int, port: int = 0, lease_s: float = 4.0,
        heads: tuple[int, int] | None = None, total_heads: int | None = None,
        **spec_overrides: Any,
    ) -> None:
        ctx = mp.get_context("spawn")
        self.transport = transport
        self.num_blocks = num_blocks
        self.conn, child = ctx.Pipe()
        spec = {**SPEC, **spec_overrides}
        self.proc = ctx.Process(
            target=_peer_main,
            args=(child, transport, spec, num_blocks, seed, port, lease_s, heads, total_heads),
            daemon=True,
        )
        self.proc.start()
        self.target = self.call("describe", timeout=STARTUP_TIMEOUT_S)

    def call(self, cmd: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        self.conn.send((cmd, args))
        if not self.conn.poll(timeout):
            self.kill()
            raise TimeoutError(f"peer did not answer {cmd} within {timeout} s")
        status, value = self.conn.recv()
        if status == "err":
            raise RuntimeError(value)
        return value

    def blocks(self, ids: list[int]) -> np.ndarray:
        raw = self.call("blocks", ids)
        return np.frombuffer(raw, dtype=np.uint8).reshape(len(ids), -1)

    def wait(self, rids: list[str], timeout: float) -> dict[str, tuple[str, str]]:
        return self.call("wait", rids, timeout, timeout=timeout + CALL_TIMEOUT_S)

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(5)

    def stop(self) -> None:
        try:
            if self.proc.is_alive():
                self.call("stop", timeout=10)
        except (TimeoutError, RuntimeError, OSError):
            pass
        self.kill()


@pytest.fixture(scope="module", params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    if request.param == "nixl":
        pytest.importorskip("nixl")
    return request.param


@pytest.fixture(scope="module")
def sender(transport: str):
    peer = Peer(transport, num_blocks=2048, seed=1)
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def receiver(transport: str):
    peer = Peer(transport, num_blocks=256, seed=2)
    yield peer
    peer.stop()


def _send_request(
    sender: Peer, target: Any, rid: str, src: list[int], dst: list[int], chunks: int
) -> None:
    bounds = np.linspace(0, len(src), chunks + 1).astype(int)
    for i in range(chunks):
        lo, hi = bounds[i], bounds[i + 1]
        sender.call("write", target, rid, src[lo:hi], dst[lo:hi], i == chunks - 1)


@pytest.mark.timeout(180)
def test_random_block_subsets_land_bit_exact_in_chunks(sender: Peer, receiver: Peer) -> None:
    rng = np.random.default_rng(0)
    before = receiver.blocks(list(range(receiver.num_blocks)))
    touched: dict[int, int] = {}
    rids = []
    free = rng.permutation(receiver.num_blocks).tolist()  # dst ids: shuffled, non-contiguous
    for n, chunks in [(1, 1), (7, 3), (40, 4), (128, 5), (64, 1)]:
        rid = f"req-{n}-{chunks}"
        src = rng.choice(sender.num_blocks, size=n, replace=False).tolist()
        dst, free = free[:n], free[n:]
        receiver.call("expect", rid, dst, 20.0)
        _send_request(sender, receiver.target, rid, src, dst, chunks)
        touched.update(zip(dst, src, strict=True))
        rids.append(rid)
    assert sender.wait(rids, 20) == {r: ("sent", "") for r in rids}
    assert receiver.wait(rids, 20) == {r: ("received", "tok") for r in rids}

    after = receiver.blocks(list(range(receiver.num_blocks)))
    dst_ids = sorted(touched)
    expected = sender.blocks([touched[d] for d in dst_ids])
    np.testing.assert_array_equal(after[dst_ids], expected)
    untouched = sorted(set(range(receiver.num_blocks)) - set(touched))
    np.testing.assert_array_equal(after[untouched], before[untouched])


@pytest.mark.timeout(180)
def test_write_to_unreachable_peer_fails_the_request(sender: Peer, receiver: Peer) -> None:
    bogus = receiver.target.__class__(
        **{**_fields(receiver.target), "agent_name": "kv-gone", "port": free_port()}
    )
    sender.call("write", bogus, "req-unreachable", [0], [0], True)
    outcome = sender.wait(["req-unreachable"], 10)["req-unreachable"]
    assert outcome[0] == "failed" and outcome[1].startswith("peer_unreachable")


@pytest.mark.timeout(180)
def test_killed_receiver_fails_the_sender_request_within_lease(sender: Peer) -> None:
    victim = Peer(sender.transport, num_blocks=2048, seed=3)
    try:
        rid = "req-kill-recv"
        victim.call("expect", rid, list(range(2048)), 30.0)
        sender.call("connect", victim.target)
        sender.call("write", victim.target, rid, list(range(512)), list(range(512)), False)
        assert sender.wait([rid], 0.3)[rid][0] == "pending"  # chunk 0 landed, request open
        # 32 MiB in flight while the receiver dies, then the last chunk.
        sender.call(
            "write", victim.target, rid, list(range(512, 1536)), list(range(512, 1536)), False
        )
        victim.kill()
        start = time.monotonic()
        sender.call(
            "write", victim.target, rid, list(range(1536, 2048)), list(range(1536, 2048)), True
        )
        outcome = sender.wait([rid], 15)[rid]
        assert outcome[0] == "failed", outcome
        assert time.monotonic() - start < 4.0 + 3.0  # the sender's lease, plus slack
    finally:
        victim.kill()


@pytest.mark.timeout(180)
def test_killed_sender_fails_the_receiver_request_at_its_lease(receiver: Peer) -> None:
    doomed = Peer(receiver.transport, num_blocks=64, seed=4)
    try:
        receiver.call("expect", "req-kill-send", [200, 3, 100, 50], 3.0)
        doomed.call("write", receiver.target, "req-kill-send", [5, 6], [200, 3], False)
        assert doomed.wait(["req-kill-send"], 0.5)["req-kill-send"][0] == "pending"
        groups = receiver.call("stats")["receive_groups"] if receiver.transport == "nccl" else 0
        doomed.kill()
        outcome = receiver.wait(["req-kill-send"], 10)["req-kill-send"]
        assert outcome[0] == "failed" and outcome[1].startswith("timeout"), outcome
        if receiver.transport == "nccl":  # the dead peer's pair group goes too
            deadline = time.monotonic() + 10
            while receiver.call("stats")["receive_groups"] >= groups:
                assert time.monotonic() < deadline, "the dead sender's group was kept"
                time.sleep(0.2)
    finally:
        doomed.kill()


@pytest.mark.timeout(180)
def test_restarted_receiver_is_rehandshaked(sender: Peer) -> None:
    port = free_port()
    first = Peer(sender.transport, num_blocks=64, seed=5, port=port)
    try:
        first.call("expect", "req-r1", [1, 2], 10.0)
        sender.call("write", first.target, "req-r1", [10, 11], [1, 2], True)
        assert sender.wait(["req-r1"], 10)["req-r1"] == ("sent", "")
        assert first.wait(["req-r1"], 10)["req-r1"][0] == "received"
        old_target = first.target
        first.kill()
        second = Peer(sender.transport, num_blocks=64, seed=6, port=port)
    finally:
        first.kill()
    try:
        assert second.target.agent_name != old_target.agent_name
        # A stale target is refused, never written through the old agent.
        sender.call("write", old_target, "req-stale", [12], [3], True)
        outcome = sender.wait(["req-stale"], 10)["req-stale"]
        assert outcome[0] == "failed", outcome
        second.call("expect", "req-r2", [7, 3, 60], 10.0)
        sender.call("write", second.target, "req-r2", [20, 21], [7, 3], False)
        sender.call("write", second.target, "req-r2", [22], [60], True)
        assert sender.wait(["req-r2"], 10)["req-r2"] == ("sent", "")
        assert second.wait(["req-r2"], 10)["req-r2"] == ("received", "tok")
        np.testing.assert_array_equal(second.blocks([7, 3, 60]), sender.blocks([20, 21, 22]))
    finally:
        second.stop()


@pytest.mark.timeout(180)
def test_mismatched_dtype_and_layout_refused_at_handshake(sender: Peer) -> None:
    other = Peer(sender.transport, num_blocks=16, seed=7, dtype="bfloat16", num_kv_heads=4)
    try:
        with pytest.raises(RuntimeError) as err:
            sender.call("connect", other.target)
        message = str(err.value)
        assert "IncompatiblePeerError" in message
        assert "dtype: local 'float32' vs peer 'bfloat16'" in message
        assert "num_kv_heads: local 2 vs peer 4" in message
        # The same refusal reaches a write as a per-request failure; nothing is sent.
        other.call("expect", "req-mismatch", [0], 5.0)
        sender.call("write", other.target, "req-mismatch", [0], [0], True)
        outcome = sender.wait(["req-mismatch"], 10)["req-mismatch"]
        assert outcome[0] == "failed" and outcome[1].startswith("incompatible")
        assert "dtype: local 'float32' vs peer 'bfloat16'" in outcome[1]
    finally:
        other.stop()


@pytest.mark.timeout(180)
def test_frozen_receiver_fails_the_write_without_stalling_other_peers(
    sender: Peer, receiver: Peer
) -> None:
    """A peer that stops answering (here: SIGSTOP) while a send to it is under way: the
    request fails within the lease, and the sender keeps serving its other peers."""
    frozen = Peer(sender.transport, num_blocks=256, seed=11)
    try:
        frozen.call("expect", "req-frozen", list(range(256)), 30.0)
        sender.call("connect", frozen.target)
        os.kill(frozen.proc.pid, signal.SIGSTOP)
        start = time.monotonic()
        sender.call("write", frozen.target, "req-frozen", list(range(256)), list(range(256)), True)
        receiver.call("expect", "req-alive", [7, 8], 10.0)
        sender.call("write", receiver.target, "req-alive", [1, 2], [7, 8], True)
        assert sender.wait(["req-alive"], 10)["req-alive"] == ("sent", "")
        assert receiver.wait(["req-alive"], 10)["req-alive"] == ("received", "tok")
        outcome = sender.wait(["req-frozen"], 15)["req-frozen"]
        assert outcome[0] == "failed", outcome
        assert time.monotonic() - start < 4.0 + 3.0  # the sender's lease, plus slack
    finally:
        if frozen.proc.is_alive():
            os.kill(frozen.proc.pid, signal.SIGCONT)
        frozen.kill()


@pytest.mark.timeout(30)
def test_nothing_is_left_in_flight_after_the_suite(sender: Peer, receiver: Peer) -> None:
    """Every request of the tests above ended (sent, received or failed) on both sides."""
    assert sender.call("active") == ([], [])
    assert receiver.call("active") == ([], [])


def _fields(target: Any) -> dict[str, Any]:
    return {name: getattr(target, name) for name in target.__slots__}


def test_empty_ucx_tls_is_refused_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("nixl")
    import torch

    from pdserve.engine.config import KVCacheSpec
    from pdserve.kvtransfer.nixl import NixlConfig, NixlConnector

    spec = KVCacheSpec(**SPEC)
    monkeypatch.setenv("UCX_TLS", " ")
    with pytest.raises(ValueError, match="UCX_TLS is set but empty"):
        NixlConnector(torch.zeros(spec.shape(2)), spec, NixlConfig(model=MODEL, channel_key=KEY))
