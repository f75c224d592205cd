"""Several async streams read as one, item by item as they come.

Used where one client stream is fed by several requests or attempts at once: the prompts of
a batch (the HTTP front), the choices of a request resumed each on its own (``Flow``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TypeVar

T = TypeVar("T")


async def merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """``(i, item)`` for each item of ``streams[i]``, in the order they come; ends when every
    stream ended. The first error of any stream ends the whole (raised here); closing or
    cancelling this closes every stream still running (their ``finally`` blocks run before
    this returns)."""
    queue: asyncio.Queue[tuple[int, T | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async with aclosing(stream) as s:  # type: ignore[type-var]
                async for item in s:
                    await queue.put((i, item))
            await queue.put((i, None))
        except Exception as exc:
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
