"""Read a checkpoint's configuration: a folder's ``config.json`` (+ ``generation_config.json``),
or a GGUF file's metadata (``pdserve.engine.model.gguf``).

Pure Python (no torch): the router reads the model's shape and limits from here without
loading weights. Every problem raises ``CheckpointError`` naming the file at fault.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pdserve.engine.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint folder cannot be loaded; the message names the file / tensor at fault."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; CheckpointError if it is not valid JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def check_folder(path: str | Path) -> Path:
    """The checkpoint folder as a Path; CheckpointError unless it holds a config.json."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"checkpoint folder {folder} has no config.json")
    return folder


def load_model_config(path: str | Path) -> ModelConfig:
    """Read ``config.json`` (and ``generation_config.json``'s eos ids when present, which
    take precedence as they do in transformers' ``generate``), or a GGUF file's metadata."""
    from pdserve.engine.model.gguf import is_gguf, load_gguf_config

    if is_gguf(path):
        return load_gguf_config(path)
    folder = check_folder(path)
    hf = read_json(folder / "config.json")
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{folder / 'config.json'}: mlp_bias=true is not supported")
    try:
        config = ModelConfig.from_hf(hf)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        eos = read_json(gen_path).get("eos_token_id")
        if eos is not None:
            ids = tuple(int(i) for i in eos) if isinstance(eos, list) else (int(eos),)
            config = dataclasses.replace(config, eos_token_ids=ids)
    return config
