"""GGUF files (llama.cpp's single-file checkpoints): metadata, model config, tensor directory.

Torch-free: the router reads a GGUF's shape, limits and tokenizer from here without loading
weights (``pdserve.engine.model.gguf_loader`` dequantizes the tensors). The header is parsed
here with ``struct`` over a memory map rather than with ``gguf.GGUFReader``, which builds a
numpy view per array element and takes seconds on a 100k-entry vocabulary; the ``gguf``
package supplies the type constants (block sizes, quantization names) and, in the tests, the
reference reader and dequantizer this module is checked against.

A file is parsed once per process (cached by path, size and modification time). Every
problem raises ``CheckpointError`` naming the file and what is wrong with it.
"""

from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.engine.config import ModelConfig
from pdserve.engine.model.checkpoint import CheckpointError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
"""``general.architecture`` -> the transformers architecture pdserve runs it as."""

PERMUTED_QK = ("llama", "mistral")
"""Architectures whose q/k rows llama.cpp's converter interleaves for its rotary kernel;
the loader restores transformers' ``rotate_half`` order."""

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
ROPE_FREQS = "rope_freqs.weight"
"""Per-frequency divisors of the rotary angles (Llama 3.1-style scaling), not a weight."""


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``); None for names with no counterpart."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def type_name(ggml_type: int) -> str:
    """``GGMLQuantizationType`` name of a tensor type id (``"Q4_K"``), or ``"type N"``."""
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def block_layout(ggml_type: int) -> tuple[int, int]:
    """(elements per block, bytes per block) of a tensor type; KeyError if unknown."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of the file: ``shape`` in row-major (PyTorch / Hugging Face) order, its
    bytes at ``[offset, offset + nbytes)`` of the file."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)


@dataclass(frozen=True, slots=True)
class GGUFFile:
    """A parsed GGUF header: every metadata key (arrays as lists) and the tensor directory."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        """``metadata["<architecture>.<key>"]`` (``key`` such as ``"block_count"``)."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


def is_gguf(path: str | Path) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(4) == MAGIC


class _Cursor:
    """Little-endian reads over a memory map (raises CheckpointError past the end)."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise CheckpointError(f"{self.path} is truncated or not a GGUF file (read past "
                                  f"its end at byte {self.pos})")
        out = self.buf[self.pos:end]
        self.pos = end
        return out

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype in _NUMPY:
                import numpy as np

                dtype = np.dtype(_NUMPY[etype])
                return np.frombuffer(self.take(dtype.itemsize * count), dtype).tolist()
            return [self.value(etype) for _ in range(count)]
        raise CheckpointError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}")


def _parse(path: Path) -> GGUFFile:
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            return _parse_buffer(buf, path, len(mm))
        finally:
            buf.release()


def _parse_buffer(buf: memoryview, path: Path, size: int) -> GGUFFile:
    cur = _Cursor(buf, path)
    if bytes(cur.take(4)) != MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (no GGUF magic)")
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are; "
                              "a big-endian file reads as a huge version)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    raw = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
        raw.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
    align = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    start = -(-cur.pos // align) * align
    tensors: dict[str, TensorInfo] = {}
    for name, dims, ggml_type, offset in raw:
        count = 1
        for d in dims:
            count *= d
        try:
            per_block, block_bytes = block_layout(ggml_type)
        except (KeyError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has GGML type {ggml_type}, which "
                                  "this version of the gguf package does not know") from None
        nbytes = count // per_block * block_bytes
        info = TensorInfo(name, ggml_type, tuple(int(d) for d in reversed(dims)),
                          start + offset, nbytes)
        if info.offset + nbytes > size:
            raise CheckpointError(f"{path} is truncated: tensor {name!r} ends at byte "
                                  f"{info.offset + nbytes}, the file has {size}")
        tensors[name] = info
    return GGUFFile(path, version, metadata, tensors)


@functools.lru_cache(maxsize=8)
def _cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    return _parse(Path(path))


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse ``path``'s header (cached per process while the file is unchanged)."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError:
        raise CheckpointError(f"GGUF file {p} does not exist") from None
    return _cached(str(p.resolve()), st.st_size, st.st_mtime_ns)


def hf_config(g: GGUFFile) -> dict[str, Any]:
    """A Hugging Face ``config.json`` equivalent of the file's metadata."""
    arch = g.architecture
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{g.path}: GGUF architecture {arch or '(none)'!r} is not "
                              f"supported; supported: {', '.join(ARCHITECTURES)}")
    need = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
    missing = [f"{arch}.{k}" for k in need if g.get(k) is None]
    if missing:
        raise CheckpointError(f"{g.path} lacks metadata {', '.join(missing)}")
    heads, hidden = int(g.get("attention.head_count")), int(g.get("embedding_length"))
    head_dim = int(g.get("attention.key_length") or hidden // heads)
    rotary = g.get("rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        raise CheckpointError(f"{g.path}: partial rotary embeddings ({arch}.rope.dimension_"
                              f"count={rotary}, head dim {head_dim}) are not supported")
    embed = g.tensors.get("token_embd.weight")
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    vocab = g.get("vocab_size") or (embed.shape[0] if embed else len(tokens or ()))
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(g.get("feed_forward_length")),
        "num_hidden_layers": int(g.get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g.get("attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "max_position_embeddings": int(g.get("context_length", 2048)),
        "rms_norm_eps": float(g.get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(g.get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "attention_bias": arch != "qwen2" and "blk.0.attn_q.bias" in g.tensors,
        "hidden_act": "silu",
        "bos_token_id": g.metadata.get("tokenizer.ggml.bos_token_id"),
    }
    window = g.get("attention.sliding_window")
    if window is not None:
        hf["sliding_window"] = int(window)
    scaling = g.get("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise CheckpointError(f"{g.path}: rope scaling {scaling!r} is not supported "
                                  "(none, linear, or a rope_freqs tensor are)")
        hf["rope_scaling"] = {"rope_type": "linear",
                              "factor": float(g.get("rope.scaling.factor", 1.0))}
    hf["eos_token_id"] = eos_token_ids(g)
    return hf


def eos_token_ids(g: GGUFFile) -> list[int]:
    """End-of-sequence ids: EOS plus end-of-turn / end-of-message where the file names them
    (llama.cpp stops on any of them)."""
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    ids = [int(g.metadata[f"tokenizer.ggml.{k}"]) for k in keys
           if f"tokenizer.ggml.{k}" in g.metadata]
    return sorted(set(ids))


def load_gguf_config(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of a GGUF file (no torch, no tensor read)."""
    g = read_gguf(path)
    hf = hf_config(g)
    try:
        return ModelConfig.from_hf(hf)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{g.path}: {e}") from None

