"""The checkpoint's tokenizer, loaded offline, plus incremental detokenization for streaming.

``Tokenizer`` wraps transformers' ``AutoTokenizer`` for a checkpoint folder (never the hub),
or the tokenizer a GGUF file describes (``pdserve.engine.model.gguf_tokenizer``).
``IncrementalDetokenizer`` turns a request's stream of generated ids into text deltas whose
concatenation equals decoding all the ids at once; a character whose UTF-8 bytes are split
over several tokens is emitted only once complete (no U+FFFD for an incomplete tail).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class NoChatTemplateError(ValueError):
    """A conversation was to be rendered for a model that has no chat template."""


# Prompt tokens an IncrementalDetokenizer decodes with the first output tokens, so that
# tokenizers whose decoding depends on the previous token (SentencePiece's leading space)
# render the first delta as they would in context.
_PROMPT_CONTEXT = 5


class Tokenizer:
    """Text <-> token ids for one checkpoint folder or GGUF file. Thread-safe for concurrent
    ``encode`` / ``decode`` (the underlying fast tokenizer is)."""

    def __init__(self, path: str | Path) -> None:
        from pdserve.engine.model.checkpoint import CheckpointError
        from pdserve.engine.model.gguf import is_gguf

        folder = Path(path)
        self.path = folder
        if is_gguf(folder):
            from pdserve.engine.model.gguf_tokenizer import gguf_tokenizer

            self._tok: Any = gguf_tokenizer(folder)
            return
        if not folder.is_dir():
            raise CheckpointError(f"tokenizer folder {folder} does not exist")
        try:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # transformers raises OSError / ValueError / KeyError variants
            raise CheckpointError(f"cannot load the tokenizer in {folder}: {e}") from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, with BOS only if the tokenizer is configured to add it (and
        ``add_special_tokens``)."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self._tok.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce or decode, added tokens included."""
        return len(self._tok)

    @property
    def hf_tokenizer(self) -> Any:
        """The underlying transformers tokenizer (for libraries that read its
        vocabulary, such as xgrammar)."""
        return self._tok

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
        chat_template: str | None = None, *, continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None, add_special_tokens: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of a conversation (``[{"role": ..., "content": ...}, ...]``), rendered
        with ``chat_template`` if given, else the checkpoint's own; the template decides
        special tokens, none are added on top unless ``add_special_tokens``.
        ``continue_final_message``: the last message is left open (no end of turn after it)
        for the model to continue. ``template_kwargs``: extra variables of the template.
        ``tools``: the request's tool definitions, given to the template as ``tools``.
        ``NoChatTemplateError`` when there is no template (no generic template is guessed:
        the model would be prompted in a format it was not trained on)."""
        if chat_template is None and not self.has_chat_template:
            raise NoChatTemplateError(
                f"the model {self.path.name!r} has no chat template; start the server with "
                "--chat-template FILE|TEMPLATE, or use /v1/completions with a plain prompt")
        text = self._tok.apply_chat_template(
            list(messages),
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **{**(template_kwargs or {}), **({"tools": tools} if tools else {})},
        )
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))


class IncrementalDetokenizer:
    """Per-request streaming decoder: ``push(ids)`` returns the new text, ``flush()`` the
    rest at the end. ``"".join(deltas) + flush()`` equals ``tokenizer.decode(all ids)``.

    ``prompt_ids`` (optional) gives the decoder the prompt's last tokens as context; their
    text is never emitted. Not thread-safe: one owner per request.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT:]) if prompt_ids else []
        self._prefix = 0  # start of the decoded window (already-emitted context)
        self._read = len(self._ids)  # ids before this have been emitted
        self._prefix_text = self._decode(self._prefix, self._read)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def push(self, new_ids: Sequence[int]) -> str:
        """Append generated ids; return the text they complete (may be empty)."""
        self._ids.extend(int(i) for i in new_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Text still held back (an incomplete trailing character comes out as U+FFFD,
        exactly as a full decode renders it)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        text = self._decode(self._prefix)
        if not final and text.endswith("\ufffd"):
            return ""  # the last character's bytes are not all here yet
        if not text.startswith(self._prefix_text):
            # A tokenizer whose window decode changed earlier text (space clean-up):
            # emit only what extends the already-emitted length.
            logger.debug("detokenizer window changed its prefix: %r -> %r", self._prefix_text, text)
        delta = text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._prefix, self._read)
        return delta
