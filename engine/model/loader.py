"""Load Hugging Face checkpoint folders (config.json + safetensors) into ``CausalLM``;
GGUF files go to ``pdserve.engine.model.gguf_loader``.

Every problem with a checkpoint (missing folder or file, unsupported architecture, a
missing, unexpected or mis-shaped tensor, a shard the index names but the folder lacks)
raises ``CheckpointError`` naming the file, tensor and shapes involved. Weights are read
without pickle, one tensor at a time, straight into the fused parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pdserve.engine.config import normalize_dtype
from pdserve.engine.model.checkpoint import (
    CheckpointError,
    check_folder,
    load_model_config,
    read_json,
)
from pdserve.engine.model.gguf import is_gguf
from pdserve.engine.model.llama import IGNORABLE_SUFFIXES, CausalLM

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded index)."""
    single = folder / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        raise CheckpointError(
            f"checkpoint folder {folder} has no weights: expected {SINGLE_FILE} or {INDEX_FILE}"
        )
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no 'weight_map'")
    files: dict[str, Path] = {}
    for name, shard in weight_map.items():
        shard_path = folder / str(shard)
        if not shard_path.is_file():
            raise CheckpointError(
                f"{index_path} maps tensor {name!r} to shard {shard!r}, which does not exist"
            )
        files[name] = shard_path
    return files


class _LazyTensors(Mapping[str, torch.Tensor]):
    """Read-on-access view over the checkpoint's safetensors files (CPU tensors)."""

    def __init__(self, files: dict[str, Path]) -> None:
        self._files = files
        self._handles: dict[Path, Any] = {}

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path]

    def file_name(self, name: str) -> str:
        return self._files[name].name

    def _open(self, name: str) -> Any:
        path = self._files[name]
        try:
            handle = self._handle(path)
        except Exception as e:  # safetensors' own error types for a corrupt file
            raise CheckpointError(f"cannot read {path}: {e}") from None
        if name not in handle.keys():
            raise CheckpointError(f"{path} lacks tensor {name!r} named in the index")
        return handle

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(name).get_slice(name).get_shape())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._open(name).get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _validate(folder: Path, model: CausalLM, tensors: _LazyTensors) -> None:
    expected = model.hf_tensor_shapes()
    present = set(tensors)
    missing = [n for n in expected if n not in present]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(
            f"checkpoint {folder} lacks tensor(s) {', '.join(missing[:5])}{more} "
            f"required by {model.config.architecture}"
        )
    tied = model.config.tie_word_embeddings
    unexpected = [
        n
        for n in present - expected.keys()
        if not n.endswith(IGNORABLE_SUFFIXES) and not (tied and n == "lm_head.weight")
    ]
    if unexpected:
        unexpected.sort()
        raise CheckpointError(
            f"checkpoint {folder} holds unexpected tensor(s) {', '.join(unexpected[:5])} "
            f"for {model.config.architecture} (is config.json right for these weights?)"
        )
    if tied and "lm_head.weight" in present:
        expected = {**expected, "lm_head.weight": expected["model.embed_tokens.weight"]}
    for name, shape in expected.items():
        actual = tensors.shape(name)
        if actual != shape:
            raise CheckpointError(
                f"tensor {name!r} in {folder / tensors.file_name(name)} has shape "
                f"{list(actual)}, but config.json implies {list(shape)}"
            )


def load_model(path: str | Path, dtype: str, device: str | torch.device) -> CausalLM:
    """Load a Llama / Mistral / Qwen2 / Qwen3 checkpoint folder (or GGUF file) into an
    eval-mode ``CausalLM`` on ``device`` with parameters in ``dtype`` ('float32', 'bf16',
    ...)."""
    try:
        torch_dtype = getattr(torch, normalize_dtype(dtype))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if is_gguf(path):
        from pdserve.engine.model.gguf_loader import load_gguf_model

        return load_gguf_model(path, torch_dtype, torch.device(device))
    folder = check_folder(path)
    config = load_model_config(folder)
    model = CausalLM(config)
    try:
        files = _weight_files(folder)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' own error types for a corrupt file
        raise CheckpointError(f"cannot read the weights in {folder}: {e}") from None
    tensors = _LazyTensors(files)
    _validate(folder, model, tensors)
    model.load_hf_tensors(tensors, torch_dtype, torch.device(device))
    logger.info(
        "loaded %s (%s, %d layers) from %s as %s on %s",
        config.architecture,
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params",
        config.num_layers,
        folder,
        torch_dtype,
        device,
    )
    return model.eval()
