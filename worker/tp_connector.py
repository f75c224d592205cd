"""A worker's KV connector across its tensor-parallel ranks: each rank moves its own heads.

Every rank has its own connector (NIXL or nccl) around its own shard of the KV cache. The
worker's rank 0 holds a ``RankedConnector``: it acts on its own connector and hands the other
ranks their part of each operation between engine steps (``ParallelRunner.call_ranks``; the
ranks answer through ``RankKV``), then merges what the ranks report, so the worker's roles see
one connector with the usual contract.

Layouts: a target names its worker's ranks (``TransferTarget.ranks``). Prefill rank ``i``
writes to decode rank ``j`` exactly the heads ``j`` holds
(``pdserve.kvtransfer.heads.transfer_plan``): rank to rank, nothing gathered through one
process, over either transport. With equal TP degrees rank ``i`` writes rank ``i`` whole
blocks; with a larger decode degree each prefill rank feeds several decode ranks (each its
share of the heads); with a larger prefill degree each decode rank gets its heads from
several prefill ranks, one part per sender (``write_blocks(part=...)``): the receiving rank
completes when every part is complete, so a decode worker needs no knowledge of the prefill
worker's degree. On the wire the request id of what decode rank ``j`` of a multi-rank target
receives is ``<id>#r<j>``; a request counts as sent (received) when every rank's share is,
and fails at its first failed share (the others are aborted). Driver thread only, like any
connector.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from pdserve.kvtransfer.base import (
    FailureKind,
    KVConnector,
    PeerInfo,
    PollResult,
    Received,
    TransferFailure,
    TransferTarget,
)
from pdserve.kvtransfer.heads import transfer_plan

logger = logging.getLogger(__name__)

RankCall = Callable[[dict[str, Any]], list[Any]]
"""Hands a message to every other rank's ``RankKV`` and returns all replies in rank order
(rank 0's entry is None)."""


def wire_id(request_id: str, dst_rank: int, dst_world: int) -> str:
    return request_id if dst_world == 1 else f"{request_id}#r{dst_rank}"


def encode_target(t: TransferTarget) -> dict[str, Any]:
    return dataclasses.asdict(t)


def decode_target(d: dict[str, Any]) -> TransferTarget:
    ranks = tuple(decode_target(r) for r in d.get("ranks", ()))
    return TransferTarget(**{**d, "info": PeerInfo(**d["info"]), "ranks": ranks})


def _encode_poll(r: PollResult) -> dict[str, Any]:
    return {"sent": r.sent,
            "received": [[x.request_id, base64.b64encode(x.payload).decode()] for x in r.received],
            "failed": [[f.request_id, f.kind.value, f.message, f.reuse_after] for f in r.failed]}


def _decode_poll(d: dict[str, Any]) -> PollResult:
    return PollResult(
        sent=list(d["sent"]),
        received=[Received(rid, base64.b64decode(p)) for rid, p in d["received"]],
        failed=[TransferFailure(rid, FailureKind(k), m, t) for rid, k, m, t in d["failed"]],
    )


class RankKV:
    """A rank other than 0: runs rank 0's KV operations on this rank's connector."""

    def __init__(self, connector: KVConnector, rank: int) -> None:
        self.connector, self.rank = connector, rank
        self._failed: list[TransferFailure] = []

    def handle(self, msg: dict[str, Any]) -> Any:
        op, c = msg["op"], self.connector
        if op == "describe":
            return encode_target(c.describe())
        if op == "poll":
            result = c.poll()
            result.failed.extend(self._failed)
            self._failed = []
            return _encode_poll(result)
        mine = [item for item in msg.get("items", ()) if item["rank"] == self.rank]
        if op == "write":
            for w in mine:
                try:
                    c.write_blocks(decode_target(w["target"]), w["id"], w["src"], w["dst"],
                                   last=w["last"], payload=base64.b64decode(w["payload"]),
                                   part=tuple(w["part"]))
                except ValueError as e:
                    self._failed.append(TransferFailure(w["id"], FailureKind.TRANSFER_ERROR,
                                                        str(e), time.monotonic()))
        elif op == "expect":
            for e in mine:
                c.expect(e["id"], e["dst"], e["lease_s"])
        elif op == "abort":
            for a in mine:
                c.abort(a["id"], writes_done=a["writes_done"])
        elif op == "pending":
            return any(c.writes_pending(a["id"]) for a in mine)
        return None


@dataclasses.dataclass(slots=True)
class _Parts:
    """A request split over ranks: the (rank, wire id) parts still outstanding."""

    left: set[tuple[int, str]]
    payload: bytes | None = None


class RankedConnector(KVConnector):
    """Rank 0's view of a ``world``-rank worker's connectors (``world`` 1: a pass-through,
    but for writes into a multi-rank target)."""

    def __init__(self, local: KVConnector, world: int, call: RankCall | None,
                 total_kv_heads: int, transport: str) -> None:
        self.local, self.world, self._call = local, world, call
        self.total_kv_heads, self.transport = total_kv_heads, transport
        self._sending: dict[str, _Parts] = {}
        self._receiving: dict[str, _Parts] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()  # reported: later parts ignored
        self._failed: list[TransferFailure] = []
        self._others: tuple[TransferTarget, ...] = ()
        if world > 1:
            assert call is not None
            self._others = tuple(decode_target(d) for d in call({"op": "describe"})[1:])

    def describe(self) -> TransferTarget:
        if not self._others:
            return self.local.describe()
        return dataclasses.replace(self.local.describe(), ranks=self._others)

    def _moves(self, dst_world: int) -> list[tuple[int, int, tuple[int, int]]]:
        """(source rank, destination rank, (part, parts)) of every rank-to-rank move."""
        if dst_world == self.world:
            return [(i, i, (0, 1)) for i in range(self.world)]
        moves = transfer_plan(self.total_kv_heads, self.world, dst_world)
        senders = {j: [m.src_rank for m in moves if m.dst_rank == j] for j in range(dst_world)}
        return [(m.src_rank, m.dst_rank,
                 (senders[m.dst_rank].index(m.src_rank), len(senders[m.dst_rank])))
                for m in moves]

    def write_blocks(self, target: TransferTarget, request_id: str,
                     src_block_ids: Sequence[int], dst_block_ids: Sequence[int], *,
                     last: bool = False, payload: bytes = b"",
                     part: tuple[int, int] = (0, 1)) -> int:
        dst_world = 1 + len(target.ranks)
        if self.world == 1 and dst_world == 1:
            return self.local.write_blocks(target, request_id, src_block_ids, dst_block_ids,
                                           last=last, payload=payload)
        if request_id in self._closed:
            return 0
        try:
            moves = self._moves(dst_world)
        except ValueError as e:  # heads that split over neither degree
            self._fail_now(request_id, FailureKind.INCOMPATIBLE, str(e))
            return 0
        targets = [dataclasses.replace(target, ranks=()), *target.ranks]
        self._sending.setdefault(request_id, _Parts(
            {(src, wire_id(request_id, dst, dst_world)) for src, dst, _ in moves}))
        chunk, items = 0, []
        for src, dst, share in moves:
            wid = wire_id(request_id, dst, dst_world)
            if src == 0:
                chunk = self.local.write_blocks(targets[dst], wid, src_block_ids, dst_block_ids,
                                                last=last, payload=payload, part=share)
            else:
                items.append({"rank": src, "target": encode_target(targets[dst]), "id": wid,
                              "src": list(src_block_ids), "dst": list(dst_block_ids),
                              "last": last, "payload": base64.b64encode(payload).decode(),
                              "part": list(share)})
        if items:
            self._rank_call({"op": "write", "items": items})
        return chunk

    def _rank_call(self, msg: dict[str, Any]) -> list[Any]:
        assert self._call is not None
        return self._call(msg)

    def expect(self, request_id: str, dst_block_ids: Sequence[int], lease_s: float) -> None:
        if self.world == 1:
            self.local.expect(request_id, dst_block_ids, lease_s)
            return
        ids = [wire_id(request_id, r, self.world) for r in range(self.world)]
        self._receiving[request_id] = _Parts(set(enumerate(ids)))
        self.local.expect(ids[0], dst_block_ids, lease_s)
        self._rank_call({"op": "expect", "items": [
            {"rank": r, "id": ids[r], "dst": list(dst_block_ids), "lease_s": lease_s}
            for r in range(1, self.world)]})

    def _parts(self, request_id: str) -> set[tuple[int, str]]:
        parts = self._sending.get(request_id) or self._receiving.get(request_id)
        return set() if parts is None else set(parts.left)

    def abort(self, request_id: str, *, writes_done: bool = False) -> None:
        parts = self._parts(request_id)
        if not parts:
            if request_id not in self._closed:
                self.local.abort(request_id, writes_done=writes_done)
            return
        for rank, wid in parts:
            if rank == 0:
                self.local.abort(wid, writes_done=writes_done)
        items = [{"rank": r, "id": w, "writes_done": writes_done} for r, w in parts if r]
        if items:
            self._rank_call({"op": "abort", "items": items})

    def writes_pending(self, request_id: str) -> bool:
        parts = self._sending.get(request_id)
        if parts is None:
            return self.local.writes_pending(request_id)
        if any(self.local.writes_pending(w) for r, w in parts.left if r == 0):
            return True
        items = [{"rank": r, "id": w} for r, w in parts.left if r]
        return bool(items) and any(self._rank_call({"op": "pending", "items": items})[1:])

    def _fail_now(self, request_id: str, kind: FailureKind, message: str) -> None:
        self._failed.append(TransferFailure(request_id, kind, message, time.monotonic()))
        self._close(request_id)

    def _close(self, request_id: str) -> None:
        self._sending.pop(request_id, None)
        self._receiving.pop(request_id, None)
        self._closed[request_id] = None
        while len(self._closed) > 65536:
            self._closed.popitem(last=False)

    def poll(self) -> PollResult:
        results = [self.local.poll()]
        if self.world > 1:
            results += [_decode_poll(d) for d in self._rank_call({"op": "poll"})[1:]]
        out = PollResult(failed=self._failed)
        self._failed = []
        for rank, r in enumerate(results):
            for f in r.failed:
                rid = self._owner(f.request_id)
                if rid is None:
                    out.failed.append(f)
                elif rid not in self._closed:
                    others = self._parts(rid) - {(rank, f.request_id)}
                    self._close(rid)
                    out.failed.append(dataclasses.replace(f, request_id=rid))
                    self._abort_parts(others)
            for wid in r.sent:
                rid = self._owner(wid)
                if rid is None:
                    out.sent.append(wid)
                elif self._done_part(self._sending, rid, rank, wid, None):
                    out.sent.append(rid)
            for rec in r.received:
                rid = self._owner(rec.request_id)
                if rid is None:
                    out.received.append(rec)
                elif self._done_part(self._receiving, rid, rank, rec.request_id, rec.payload):
                    payload = self._receiving.pop(rid).payload or b""
                    self._close(rid)
                    out.received.append(Received(rid, payload))
        return out

    def _owner(self, wid: str) -> str | None:
        """The request a wire id belongs to, when it is one this connector splits."""
        base = wid.rpartition("#r")[0] if "#r" in wid else wid
        for rid in (wid, base):
            if rid in self._sending or rid in self._receiving or rid in self._closed:
                return rid
        return None

    def _done_part(self, table: dict[str, _Parts], rid: str, rank: int, wid: str,
                   payload: bytes | None) -> bool:
        parts = table.get(rid)
        if parts is None:
            return False
        parts.left.discard((rank, wid))
        if payload is not None and (parts.payload is None or rank == 0):
            parts.payload = payload
        if parts.left:
            return False
        if table is self._sending:
            self._close(rid)
        return True

    def _abort_parts(self, parts: set[tuple[int, str]]) -> None:
        for rank, wid in parts:
            if rank == 0:
                self.local.abort(wid)
        items = [{"rank": r, "id": w, "writes_done": False} for r, w in parts if r]
        if items:
            self._rank_call({"op": "abort", "items": items})

    def close(self) -> None:
        self.local.close()

    def __getattr__(self, name: str) -> Any:  # e.g. the nccl transport's ``stats``
        return getattr(self.local, name)
