"""Internal sockets listen on the KV host only: with the default 127.0.0.1 nothing a worker's
KV connectors open (side channels, the nccl store, UCX's own listeners) is reachable from
another machine."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys

import pytest

_LISTENERS = r"""
import json, os, sys, time
import torch
from pdserve.engine.config import KVCacheSpec
from pdserve.kvtransfer.auth import ChannelKey

spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
cache = torch.zeros(spec.shape(8))
if sys.argv[1] == "nixl":
    from pdserve.kvtransfer.nixl import NixlConfig, NixlConnector
    conn = NixlConnector(cache, spec, NixlConfig(model="m", channel_key=ChannelKey.generate()))
else:
    from pdserve.kvtransfer.nccl import NcclConfig, NcclConnector
    conn = NcclConnector(cache, spec, NcclConfig(model="m", channel_key=ChannelKey.generate()))
time.sleep(0.5)
mine = set()
for fd in os.listdir("/proc/self/fd"):
    try:
        mine.add(os.readlink(f"/proc/self/fd/{fd}"))
    except FileNotFoundError:  # closed meanwhile (the listing's own descriptor)
        pass
found = []
for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
    for line in open(table).read().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and f"socket:[{fields[9]}]" in mine:  # LISTEN, ours
            found.append([table, fields[1]])
conn.close()
print(json.dumps(found))
"""


def _address(table: str, hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address.split(":")[0])
    # /proc/net writes each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


@pytest.mark.parametrize("transport", ["nixl", "nccl"])
def test_kv_connectors_listen_on_loopback_only_by_default(transport: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "UCX_NET_DEVICES"}
    out = subprocess.run([sys.executable, "-c", _LISTENERS, transport], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    listening = [_address(t, a) for t, a in json.loads(out.stdout.strip().splitlines()[-1])]
    assert listening, "the connector opened no listening socket at all"
    assert all(a.is_loopback or (a.version == 6 and a.ipv4_mapped and a.ipv4_mapped.is_loopback)
               for a in listening), listening
