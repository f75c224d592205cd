"""Ports picked for a later listener lie outside the range the kernel lends to outgoing
connections, so no connection made in between can take them."""

from __future__ import annotations

import socket
from pathlib import Path

from pdserve.engine import ports
from pdserve.engine.ports import LOWEST, ephemeral_range, free_port, free_ports


def _listen(port: int, host: str) -> None:
    with socket.socket() as s:
        s.bind((host, port))
        s.listen()


def test_picked_ports_are_distinct_listenable_and_below_the_ephemeral_range() -> None:
    low, high = ephemeral_range()
    assert 0 < low <= high
    picked = free_ports(32)
    assert len(set(picked)) == 32
    for port in picked:
        assert LOWEST <= port < low
        _listen(port, "127.0.0.1")
        _listen(port, "0.0.0.0")


def test_a_port_in_use_or_handed_out_is_passed_over(monkeypatch) -> None:
    busy, handed_out, free = free_ports(3)
    monkeypatch.setattr(ports.random, "SystemRandom", lambda: _Draws([busy, handed_out, free]))
    with socket.socket() as held:
        held.bind(("127.0.0.1", busy))
        held.listen()
        assert free_port(avoid=frozenset({handed_out})) == free


class _Draws:
    """A random source that draws the given ports in turn."""

    def __init__(self, draws: list[int]) -> None:
        self.draws = iter(draws)

    def randrange(self, start: int, stop: int) -> int:
        port = next(self.draws)
        assert start <= port < stop
        return port


def test_an_unreadable_or_narrow_range_falls_back_to_the_kernels_pick(
        monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", tmp_path / "missing")
    assert ephemeral_range() == (32768, 60999)
    narrow = tmp_path / "range"
    narrow.write_text(f"{LOWEST + 10}\t65000\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", narrow)
    assert ephemeral_range() == (LOWEST + 10, 65000)
    port = free_port()
    assert not LOWEST <= port < LOWEST + 10
    _listen(port, "127.0.0.1")
