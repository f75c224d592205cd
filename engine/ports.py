"""TCP ports picked now for a process that listens on them later.

A port found by binding port 0 comes from the kernel's ephemeral range, the range it also
hands out as the local port of every outgoing connection. Between the pick and the later
``listen`` any connection on the host (Ray's gRPC channels, a client) may take it, and the
listener then fails with "Address already in use". A port below that range is never taken
that way, so ``free_port`` picks there: at random, among the ones free now, above the range
Ray gives its worker processes (10002-19999 by default).
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 20000
"""Above Ray's default worker port range (``--min-worker-port`` / ``--max-worker-port``)."""
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_TRIES = 64


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default where the
    setting cannot be read)."""
    try:
        low, high = EPHEMERAL_RANGE.read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bindable(host: str, port: int) -> bool:
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", avoid: frozenset[int] = frozenset()) -> int:
    """A TCP port that ``host`` can listen on now, outside the ephemeral range where one is
    free there (else one the kernel picks), and not in ``avoid`` (ports already handed out
    for the same start-up)."""
    low = ephemeral_range()[0]
    if low - LOWEST >= 1000:
        rng = random.SystemRandom()
        for _ in range(_TRIES):
            port = rng.randrange(LOWEST, low)
            if port in avoid or not _bindable(host, port):
                continue
            if ":" in host or _bindable("0.0.0.0", port):  # a wildcard listener too
                return port
    while True:
        with socket.socket(_family(host), socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in avoid:
            return port


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports as ``free_port`` picks them."""
    ports: list[int] = []
    for _ in range(n):
        ports.append(free_port(host, frozenset(ports)))
    return ports
