"""A transformers fast tokenizer built from a GGUF file's ``tokenizer.*`` metadata.

The vocabulary, merges, token types, special ids, flags and chat template come from the
file (read by ``pdserve.engine.model.gguf``, no torch); transformers' own GGUF tokenizer
converter turns them into a ``tokenizers`` pipeline (byte-level BPE, SentencePiece, ...),
so the result is what ``AutoTokenizer.from_pretrained(folder, gguf_file=...)`` builds, without
the torch import that path makes. tests/test_gguf.py checks that they agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pdserve.engine.model.checkpoint import CheckpointError
from pdserve.engine.model.gguf import read_gguf

_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
            "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def _converter() -> tuple[Any, dict[str, dict[str, str]]]:
    """transformers' ``convert_gguf_tokenizer`` and its metadata-key mapping (their module
    moved between transformers 4 and 5)."""
    try:
        from transformers.integrations.gguf import (  # type: ignore[attr-defined]
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:
        from transformers.integrations.ggml import (  # type: ignore[attr-defined,no-redef]
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    return convert_gguf_tokenizer, GGUF_TOKENIZER_MAPPING


def gguf_tokenizer(path: str | Path) -> Any:
    """The ``PreTrainedTokenizerFast`` of the GGUF file at ``path``."""
    from transformers import PreTrainedTokenizerFast

    g = read_gguf(path)
    meta = g.metadata
    if "tokenizer.ggml.tokens" not in meta:
        raise CheckpointError(f"{g.path} has no tokenizer (no tokenizer.ggml.tokens metadata)")
    convert, mapping = _converter()
    tokenizer = {name: meta[f"tokenizer.{key}"] for key, name in mapping["tokenizer"].items()
                 if f"tokenizer.{key}" in meta}
    config = {name: meta[f"tokenizer.{key}"]
              for key, name in mapping["tokenizer_config"].items()
              if f"tokenizer.{key}" in meta}
    if tokenizer.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp's default for SentencePiece
    tokens = tokenizer["tokens"]
    for name, key in _SPECIAL.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            config[name] = tokens[int(token_id)]
    try:
        backend, extra = convert(g.architecture, tokenizer)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"cannot build the tokenizer of {g.path}: {e}") from None
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{**config, **extra})
