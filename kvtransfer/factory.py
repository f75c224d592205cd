"""Pick a KV transport by name: what ``--kv-transport`` selects.

Importing this module loads no torch, NIXL or ZMQ (the router validates the name with it);
``make_connector`` imports the chosen backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from pdserve.engine.config import KVCacheSpec
    from pdserve.kvtransfer.auth import ChannelKey
    from pdserve.kvtransfer.base import KVConnector

KV_TRANSPORTS = ("nixl", "nccl")
"""``nixl``: NIXL/UCX writes (RDMA, NVLink, shared memory, TCP). ``nccl``: torch.distributed
point-to-point sends in per-pair groups (NCCL between GPUs, gloo between CPU caches)."""


def check_transport(name: str) -> str:
    """``name`` if it is a known KV transport, else ``ValueError`` listing them."""
    if name not in KV_TRANSPORTS:
        raise ValueError(f"unknown KV transport {name!r}; choose one of {', '.join(KV_TRANSPORTS)}")
    return name


def make_connector(
    transport: str,
    kv_cache: torch.Tensor,
    spec: KVCacheSpec,
    *,
    model: str,
    host: str,
    name: str,
    lease_s: float,
    channel_key: ChannelKey,
    kv_heads: tuple[int, int] | None = None,
    total_kv_heads: int | None = None,
) -> KVConnector:
    """A connector of ``transport`` around ``kv_cache``, its side channel on ``host`` and
    sealed with ``channel_key`` (the cluster's secret: both transports refuse peers that do
    not hold it). ``kv_heads``/``total_kv_heads``: the model KV heads this cache holds, for a
    tensor-parallel rank (both transports move the heads sender and receiver share)."""
    check_transport(transport)
    if transport == "nccl":
        from pdserve.kvtransfer.nccl import NcclConfig, NcclConnector

        return NcclConnector(kv_cache, spec, NcclConfig(
            model=model, host=host, name=name, lease_s=lease_s, channel_key=channel_key,
            kv_heads=kv_heads, total_kv_heads=total_kv_heads,
        ))
    from pdserve.kvtransfer.nixl import NixlConfig, NixlConnector

    return NixlConnector(kv_cache, spec, NixlConfig(
        model=model, host=host, name=name, lease_s=lease_s, channel_key=channel_key,
        kv_heads=kv_heads, total_kv_heads=total_kv_heads,
    ))
