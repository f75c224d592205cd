"""Tokenization off the router's event loop, so that no request's text work delays another
request's tokens.

Texts up to ``process_above`` bytes are encoded on a small thread pool: the fast tokenizer
releases the GIL while it encodes, and what it holds the GIL for (building the id list,
freeing the encoding) is short at that size. Bigger texts go to a tokenizer process
(``python -m pdserve.router.text``, started on first use, at a lower CPU priority):
encoding a megabyte, and freeing its encoding, holds a GIL for tens of milliseconds, which
in the router's own process would stall every stream. The process speaks length-prefixed
msgpack frames over its stdin/stdout, one request at a time; the router reads its answers
on the event loop, without a thread. Callers bound text sizes in bytes before they get
here (``pdserve.router.validation``); results longer than a caller's ``limit`` come back as
a count only, so an oversized prompt never ships hundreds of thousands of ids back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from pdserve.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Encoded = list[int] | int
"""Token ids, or their count when there are more than the caller's limit."""

_FRAME = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class ChatOptions:
    """How a conversation becomes a prompt: a per-request ``chat_template`` (None: the
    server's), extra template variables, whether to open an assistant turn
    (``add_generation_prompt``) or continue the conversation's last message
    (``continue_final_message``: the template's end-of-turn after it is cut)."""

    chat_template: str | None = None
    chat_template_kwargs: tuple[tuple[str, Any], ...] = ()
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class TextInputError(ValueError):
    """The tokenizer or chat template refused the input (the client's to fix)."""


def _run(tokenizer: Tokenizer, kind: str, payload: Any, limit: int) -> Encoded:
    """``encode``: ``payload`` is ``[text, add_special_tokens]``; ``chat``: ``[messages,
    template or None, add_generation_prompt, continue_final_message, template variables,
    add_special_tokens, tools or None]``."""
    if kind == "encode":
        text, add_special = payload
        ids = tokenizer.encode(text, add_special_tokens=add_special)
    else:
        messages, template, add_generation, continue_final, kwargs, add_special, tools = payload
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation, chat_template=template,
            continue_final_message=continue_final, template_kwargs=kwargs,
            add_special_tokens=add_special, tools=tools)
    return ids if len(ids) <= limit else len(ids)


def _refusal(exc: Exception) -> bool:
    """Errors that mean the input is bad (a template's ``raise_exception``, a type)."""
    return type(exc).__module__.startswith("jinja2") or isinstance(
        exc, (ValueError, TypeError, KeyError))


class _Process:
    """The tokenizer process of one router; one request at a time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def call(self, kind: str, payload: Any, limit: int) -> Encoded:
        async with self._lock:
            # Shielded: a cancelled caller must not leave an answer unread in the pipe.
            return await asyncio.shield(self._exchange(kind, payload, limit))

    async def _exchange(self, kind: str, payload: Any, limit: int) -> Encoded:
        if self._proc is None or self._proc.returncode is not None:
            logger.info("starting the tokenizer process for large texts")
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pdserve.router.text", self.path,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        frame = msgpack.packb([kind, payload, limit])
        try:
            proc.stdin.write(_FRAME.pack(len(frame)) + frame)
            await proc.stdin.drain()
            (size,) = _FRAME.unpack(await proc.stdout.readexactly(_FRAME.size))
            ok, value = msgpack.unpackb(await proc.stdout.readexactly(size))
        except (OSError, asyncio.IncompleteReadError) as exc:
            proc.kill()
            raise RuntimeError(f"the tokenizer process failed: {exc!r}") from None
        if ok:
            return value  # type: ignore[no-any-return]
        refused, message = value
        raise (TextInputError if refused else RuntimeError)(message)

    def close(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()


class TextPool:
    """Encodes texts and chat conversations for the router. ``close`` when done.
    ``chat_template``: the one ``--chat-template`` gave (None: the model's own)."""

    def __init__(self, tokenizer: Tokenizer, path: str | Path, *, threads: int = 2,
                 process_above: int = 64 << 10, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.process_above = process_above
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="tokenize")
        self._process = _Process(str(path))

    async def _encode(self, size: int, kind: str, payload: Any, limit: int) -> Encoded:
        if size > self.process_above:
            return await self._process.call(kind, payload, limit)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._threads, _run, self.tokenizer, kind,
                                              payload, limit)
        except Exception as exc:
            if _refusal(exc):
                raise TextInputError(f"{type(exc).__name__}: {exc}") from None
            raise

    async def encode(self, text: str, limit: int, size: int | None = None, *,
                     add_special_tokens: bool = True) -> Encoded:
        """Ids of ``text`` (``size``: its length in UTF-8 bytes, if known)."""
        return await self._encode(len(text) if size is None else size, "encode",
                                  [text, add_special_tokens], limit)

    async def chat(self, messages: Sequence[dict[str, Any]], limit: int, size: int,
                   options: ChatOptions | None = None, *,
                   add_special_tokens: bool = False,
                   tools: list[dict[str, Any]] | None = None) -> Encoded:
        """Ids of a conversation rendered with the request's template (``options``), else
        ``chat_template``, else the model's own, given the request's ``tools``;
        ``NoChatTemplateError`` if there is none, ``TextInputError`` if the template
        refuses the conversation."""
        options = options or ChatOptions()
        template = options.chat_template or self.chat_template
        if template is None and not self.tokenizer.has_chat_template:
            self.tokenizer.apply_chat_template(messages)  # raises NoChatTemplateError
        return await self._encode(size, "chat", [
            list(messages), template, options.add_generation_prompt,
            options.continue_final_message, dict(options.chat_template_kwargs),
            add_special_tokens, tools], limit)

    async def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (bounded by the caller), on the thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, self.tokenizer.decode, ids,
                                          skip_special_tokens)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._process.close()


def _child(path: str) -> None:
    """The tokenizer process: frames in on stdin, frames out on stdout, until EOF."""
    os.nice(10)  # huge texts yield the CPU to the processes that stream tokens
    stdout = os.fdopen(os.dup(1), "wb")  # the protocol's; anything printed goes to stderr
    os.dup2(2, 1)
    tokenizer = Tokenizer(path)
    stdin = sys.stdin.buffer
    while head := stdin.read(_FRAME.size):
        (size,) = _FRAME.unpack(head)
        kind, payload, limit = msgpack.unpackb(stdin.read(size))
        try:
            answer: list[Any] = [True, _run(tokenizer, kind, payload, limit)]
        except Exception as exc:  # reported to the router, which decides
            answer = [False, [_refusal(exc), f"{type(exc).__name__}: {exc}"[:500]]]
        frame = msgpack.packb(answer)
        stdout.write(_FRAME.pack(len(frame)) + frame)
        stdout.flush()


if __name__ == "__main__":
    _child(sys.argv[1])
