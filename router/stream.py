"""The router's token inbox: one ZMQ PULL socket that every decode worker pushes to.

Decode workers send one message per step with the new tokens of all of this router's
requests; the inbox splits it into per-request asyncio queues. Records for requests nobody
waits for (cancelled, already failed over) are dropped. Runs on the router's event loop.
"""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio

from pdserve.worker.protocol import TokenRecord, decode_batch

logger = logging.getLogger(__name__)


class TokenInbox:
    """Owns the PULL socket; ``endpoint`` is what workers connect to."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self._queues: dict[str, asyncio.Queue[TokenRecord]] = {}
        self._task: asyncio.Task[None] | None = None
        self.messages = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def open(self, request_id: str) -> asyncio.Queue[TokenRecord]:
        queue: asyncio.Queue[TokenRecord] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def close_request(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    def inject(self, record: TokenRecord) -> None:
        """Deliver a record from the router itself (e.g. 'worker died')."""
        queue = self._queues.get(record.request_id)
        if queue is not None:
            queue.put_nowait(record)

    async def _run(self) -> None:
        while True:
            raw = await self._sock.recv()
            self.messages += 1
            try:
                records = decode_batch(raw)
            except Exception:
                logger.exception("undecodable token batch (%d bytes) dropped", len(raw))
                continue
            for record in records:
                self.inject(record)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._sock.close(linger=0)
        self._ctx.term()
