"""What the service calls its model, and how it renders conversations, as vLLM users expect.

``served_names``: the names clients may put in ``model`` (``--served-model-name``, several
aliases allowed; by default the ``--model`` argument exactly as given, so a client can pass
the path the server was launched with). The first is the one ``/v1/models`` lists first and
metrics carry as ``model_name``. ``load_chat_template``: ``--chat-template`` as a file path or
an inline Jinja template. Pure functions: no torch, no I/O beyond reading the template file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

_JINJA_MARKS = ("{{", "{%", "{#")


def served_names(model: str, given: Sequence[str] = ()) -> tuple[str, ...]:
    """The served model names: ``given`` (duplicates dropped, order kept), else ``model``.
    ValueError for an empty name."""
    names = tuple(dict.fromkeys(given)) or (model,)
    if any(not name.strip() for name in names):
        raise ValueError(f"served model names must not be empty, got {list(names)!r}")
    return names


def load_chat_template(value: str) -> str:
    """``--chat-template``: the contents of the file ``value`` names, or ``value`` itself
    when it is a Jinja template. ValueError when it is neither (a path that does not exist
    is the usual mistake, so it is named)."""
    path = Path(value).expanduser()
    if any(mark in value for mark in _JINJA_MARKS):
        return value
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"chat template file {value!r} is empty")
        return text
    raise ValueError(f"--chat-template {value!r} is neither an existing file nor a Jinja "
                     "template (no '{{' or '{%' in it)")
