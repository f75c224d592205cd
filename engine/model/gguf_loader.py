"""Load a GGUF file's weights into ``CausalLM``, dequantized into the engine's dtype.

GGUF tensors are renamed to their Hugging Face names (``pdserve.engine.model.gguf.hf_name``)
and fed to ``CausalLM.load_hf_tensors``, one tensor at a time: its bytes are read from the
memory-mapped file, moved to the target device, dequantized there
(``pdserve.engine.model.gguf_quants``) and copied into the fused parameters. For the
architectures whose q/k rows llama.cpp interleaves (llama, mistral) the rows are put back in
transformers' order. A ``rope_freqs`` tensor (Llama 3.1-style rope scaling) divides the
rotary frequencies, as llama.cpp applies it. Progress is logged at INFO every few seconds
and at the end. Every problem raises ``CheckpointError`` naming the file and tensor.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from pdserve.engine.config import ModelConfig
from pdserve.engine.model.checkpoint import CheckpointError
from pdserve.engine.model.gguf import (
    PERMUTED_QK,
    ROPE_FREQS,
    GGUFFile,
    TensorInfo,
    hf_name,
    load_gguf_config,
    read_gguf,
)
from pdserve.engine.model.gguf_quants import dequantize
from pdserve.engine.model.llama import IGNORABLE_SUFFIXES, CausalLM, rope_inv_freq

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 5.0


def unpermute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: within each head, rows stored as ``[dim/2, 2]``
    pairs go back to transformers' ``[2, dim/2]`` halves."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2) \
        .reshape(w.shape)


class GGUFTensors(Mapping[str, torch.Tensor]):
    """Read-on-access view of a GGUF's model tensors under their Hugging Face names: each
    access returns the tensor dequantized to float32 on ``device``."""

    def __init__(self, g: GGUFFile, config: ModelConfig, device: torch.device) -> None:
        self._file = g
        self._device = device
        self._config = config
        self._infos: dict[str, TensorInfo] = {}
        for name, info in g.tensors.items():
            hf = hf_name(name)
            if hf is not None:
                self._infos[hf] = info
        self._data = np.memmap(g.path, dtype=np.uint8, mode="r")
        self._permuted = g.architecture in PERMUTED_QK
        self.loaded = 0

    def shape(self, name: str) -> tuple[int, ...]:
        return self._infos[name].shape

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        raw = torch.from_numpy(np.array(self._data[info.offset:info.offset + info.nbytes]))
        value = dequantize(raw.to(self._device), info.ggml_type, info.shape, torch.float32)
        if self._permuted and (".q_proj." in name or ".k_proj." in name):
            c = self._config
            value = unpermute_rows(value, c.num_heads if ".q_proj." in name else c.num_kv_heads)
        self.loaded += 1
        return value

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)


def _validate(g: GGUFFile, model: CausalLM, tensors: GGUFTensors) -> None:
    unknown = sorted(n for n in g.tensors if hf_name(n) is None and n != ROPE_FREQS
                     and not n.endswith(IGNORABLE_SUFFIXES))
    if unknown:
        raise CheckpointError(f"{g.path} holds tensor(s) pdserve does not know: "
                              f"{', '.join(unknown[:5])} (is it a {g.architecture} model?)")
    expected = model.hf_tensor_shapes()
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"{g.path} lacks tensor(s) {', '.join(missing[:5])} required by "
                              f"{model.config.architecture}")
    unexpected = sorted(set(tensors) - set(expected) - {"lm_head.weight"})
    if unexpected:
        raise CheckpointError(f"{g.path} holds unexpected tensor(s) {', '.join(unexpected[:5])} "
                              f"for {model.config.architecture}")
    for name, shape in expected.items():
        actual = tensors.shape(name)
        if actual != shape:
            gguf = tensors.info(name).name
            raise CheckpointError(f"tensor {gguf!r} in {g.path} has shape {list(actual)}, but "
                                  f"the file's metadata implies {list(shape)}")


class _Progress(Mapping[str, torch.Tensor]):
    """Logs how far loading got, every ``PROGRESS_INTERVAL_S`` and at the end."""

    def __init__(self, tensors: GGUFTensors, path: Path) -> None:
        self._tensors, self._path = tensors, path
        self._start = self._last = time.monotonic()

    def __getitem__(self, name: str) -> torch.Tensor:
        value = self._tensors[name]
        done, total = self._tensors.loaded, len(self._tensors)
        now = time.monotonic()
        if now - self._last >= PROGRESS_INTERVAL_S or done == total:
            self._last = now
            logger.info("loading %s: %d%% (%d/%d tensors, %.1f s)", self._path.name,
                        100 * done // total, done, total, now - self._start)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def load_gguf_model(path: str | Path, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """A GGUF file (llama, mistral, qwen2, qwen3) as an eval-mode ``CausalLM`` on ``device``
    with parameters in ``dtype``."""
    g = read_gguf(path)
    config = load_gguf_config(path)
    model = CausalLM(config)
    tensors = GGUFTensors(g, config, device)
    _validate(g, model, tensors)
    kinds = Counter(info.type_name for info in g.tensors.values())
    logger.info("loading %s (%s, %d tensors: %s) as %s on %s", g.path, g.architecture,
                len(g.tensors), ", ".join(f"{n} {k}" for k, n in kinds.most_common()), dtype,
                device)
    model.load_hf_tensors(_Progress(tensors, g.path), dtype, device)
    freqs = g.tensors.get(ROPE_FREQS)
    if freqs is not None:
        raw = torch.from_numpy(np.array(tensors._data[freqs.offset:freqs.offset + freqs.nbytes]))
        factors = dequantize(raw, freqs.ggml_type, freqs.shape, torch.float32)
        if factors.numel() != config.head_dim // 2:
            raise CheckpointError(f"{g.path}: {ROPE_FREQS} has {factors.numel()} values, the "
                                  f"head dim {config.head_dim} needs {config.head_dim // 2}")
        inv_freq = rope_inv_freq(config.rope, config.head_dim) / factors
        positions = torch.arange(config.max_position_embeddings, dtype=torch.int64).float()
        angles = positions[:, None] * inv_freq[None, :]
        table = torch.cat((angles.cos(), angles.sin()), dim=-1)
        model.rope_cache = table.to(device=device, dtype=dtype)
    return model.eval()
