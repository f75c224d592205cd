"""The router's token inbox: one ZMQ PULL socket that every decode worker pushes to.

Decode workers send one message per step with the new tokens of all of this router's
requests; the inbox splits it into per-request asyncio queues. Records for requests nobody
waits for (cancelled, already failed over) are dropped. Runs on the router's event loop.

Every message must be sealed with the cluster's ``ChannelKey`` for this inbox's endpoint
(``pdserve.kvtransfer.auth``; channel ``tokens/<endpoint>``): anything else (another local
process writing to the port, a replayed batch) is refused before it is decoded, counted in
``refused``, and logged at most once a minute. Messages over ``MAX_MESSAGE_BYTES`` make ZMQ
drop their sender.
"""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio

from pdserve.kvtransfer.auth import ChannelKey, ForgedMessageError, RefusalLog
from pdserve.worker.protocol import TokenRecord, decode_batch, token_channel

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 << 20
"""One decode step's batch for every stream of this router, logprobs included, is far less."""


class TokenInbox:
    """Owns the PULL socket; ``endpoint`` is what workers connect to."""

    def __init__(self, key: ChannelKey, host: str = "127.0.0.1") -> None:
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self._opener = key.opener(token_channel(self.endpoint))
        self._refusals = RefusalLog(logger, f"unauthenticated token batches on {self.endpoint}")
        self._queues: dict[str, asyncio.Queue[TokenRecord]] = {}
        self._task: asyncio.Task[None] | None = None
        self.messages = 0

    @property
    def refused(self) -> int:
        """Messages refused so far (not sealed with the cluster's key, or replayed)."""
        return self._refusals.count

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
                records = decode_batch(self._opener.open(raw))
            except ForgedMessageError as exc:
                self._refusals.refused(exc)
                continue
            except ValueError as exc:
                logger.error("undecodable token batch (%d bytes) dropped: %s", len(raw), exc)
                continue
            for record in records:
                self.inject(record)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._sock.close(linger=0)
        self._ctx.term()
