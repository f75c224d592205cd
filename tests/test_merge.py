"""``pdserve.router.merge.merged``: several async streams read as one (pure asyncio)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from pdserve.router.merge import merged


async def _ticks(name: str, delays: list[float], log: list[str],
                 fail: bool = False) -> AsyncIterator[str]:
    try:
        for i, delay in enumerate(delays):
            await asyncio.sleep(delay)
            yield f"{name}{i}"
        if fail:
            raise ValueError(f"{name} failed")
    finally:
        log.append(f"{name} closed")


def test_items_come_as_they_are_produced_tagged_with_their_stream() -> None:
    async def main() -> list[tuple[int, str]]:
        log: list[str] = []
        streams = [_ticks("a", [0.0, 0.5], log), _ticks("b", [0.05, 0.05], log)]
        return [item async for item in merged(streams)]

    assert asyncio.run(main()) == [(0, "a0"), (1, "b0"), (1, "b1"), (0, "a1")]


def test_the_first_error_ends_the_whole_and_closes_the_other_streams() -> None:
    async def main() -> tuple[list[tuple[int, str]], list[str]]:
        log: list[str] = []
        got: list[tuple[int, str]] = []
        streams = [_ticks("a", [0.2], log, fail=True), _ticks("b", [0.0, 10.0], log)]
        with pytest.raises(ValueError, match="a failed"):
            async for item in merged(streams):
                got.append(item)
        return got, log

    got, log = asyncio.run(main())
    assert got == [(1, "b0"), (0, "a0")]
    assert sorted(log) == ["a closed", "b closed"]


def test_closing_early_closes_every_stream_before_it_returns() -> None:
    async def main() -> list[str]:
        log: list[str] = []
        streams = [_ticks("a", [0.0, 10.0], log), _ticks("b", [10.0], log)]
        async with aclosing(merged(streams)) as items:
            assert await anext(items) == (0, "a0")
        return log

    assert sorted(asyncio.run(main())) == ["a closed", "b closed"]
