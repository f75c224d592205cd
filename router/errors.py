"""What a client may read of a failure: one short line, never a traceback.

Errors raised inside a worker reach the router wrapped by Ray with the remote traceback, the
worker's pid, node address and actor id (and terminal colour codes). ``public_reason``
keeps the original exception's type and the first line of its message, clipped; the whole
exception is logged on the router, where an operator can read it. ``clip`` shortens any text
that echoes client input (a 100 KB model name stays a few dozen characters).
"""

from __future__ import annotations

import re

MAX_REASON_CHARS = 200
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


_QUOTED_FIELD = re.compile(r"'([A-Za-z_][A-Za-z0-9_]*)(?:\[\d+\])?")


def param_of(message: str) -> str | None:
    """The field an error message names first (``'top_p' must be ...`` -> ``top_p``): the
    ``param`` of OpenAI's error body."""
    match = _QUOTED_FIELD.search(message)
    return match.group(1) if match else None


def clip(text: str, limit: int = 64) -> str:
    """``text`` cut to at most ``limit`` characters (about), saying how long it was."""
    if len(text) <= limit:
        return text
    suffix = f"... ({len(text)} characters)"
    return text[: max(limit - len(suffix), 8)] + suffix


def public_reason(exc: BaseException, limit: int = MAX_REASON_CHARS, *,
                  with_type: bool = True) -> str:
    """``Type: first line of the message`` of ``exc`` (of its cause, for an error Ray
    carried from a worker), without ANSI codes, clipped to ``limit``; ``with_type=False``:
    the message alone (for errors that are already a sentence for the user)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    first = next((ln for ln in lines if not ln.startswith(("Traceback", "File ", "ray::"))), "")
    if not with_type and first:
        return clip(first, limit)
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return clip(text, limit)
