"""Frozen engine configuration. No I/O here: loaders read files and build these.

Every invalid value raises ``ValueError`` naming the field, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "float16": "float16",
}
KV_LAYOUT = "blocks,layers,kv,block_size,kv_heads,head_dim"
"""Name of the KV cache layout (see ``KVCacheSpec``); peers compare it at handshake."""


def normalize_dtype(name: str) -> str:
    """'bf16' -> 'bfloat16' etc.; ValueError for anything else."""
    try:
        return _DTYPE_ALIASES[str(name).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def _positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """Rotary embedding: ``kind`` is 'default', 'linear' or 'llama3'."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> RopeConfig:
        """Read both the transformers<5 (`rope_theta` + `rope_scaling`) and >=5
        (`rope_parameters`) spellings."""
        params = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {}
        params = {**scaling, **params}
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type", "default")) or "default"
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(
                f"unsupported rope scaling type {kind!r}; supported: default, linear, llama3"
            )
        return cls(
            theta=theta,
            kind=kind,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position=int(params.get("original_max_position_embeddings", 8192)),
        )


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape and variant of a decoder-only transformer (Llama family)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers"):
            _positive(name, getattr(self, name))
        _positive("num_attention_heads", self.num_heads)
        _positive("num_key_value_heads", self.num_kv_heads)
        _positive("head_dim", self.head_dim)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict; unknown architectures are refused."""
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or hf.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        missing = [
            k
            for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
            if k not in hf
        ]
        if missing:
            raise ValueError(f"config.json lacks required field(s): {', '.join(missing)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; only 'silu'")
        window = hf.get("sliding_window")
        uses_window = family == "mistral" or hf.get("use_sliding_window", False)
        max_pos = int(hf.get("max_position_embeddings", 2048))
        if uses_window and window is not None and window < max_pos:
            raise ValueError(
                f"sliding-window attention (sliding_window={window}) is not supported; "
                "set sliding_window to null or >= max_position_embeddings"
            )
        num_heads = int(hf.get("num_attention_heads", 0))
        head_dim = hf.get("head_dim") or (int(hf["hidden_size"]) // max(num_heads, 1))
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            max_position_embeddings=max_pos,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=RopeConfig.from_hf(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            eos_token_ids=eos_ids,
            bos_token_id=hf.get("bos_token_id"),
        )


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV cache. ``num_blocks`` None = size from ``memory_fraction`` of free memory
    (CUDA) or ``cpu_cache_bytes`` (CPU)."""

    block_size: int = 16
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    cpu_cache_bytes: int = 2 << 30
    memory_fraction: float = 0.85
    huge_pages: bool = False
    """CPU: the cache in transparent huge pages where Linux grants them on advice
    (``pdserve.engine.huge_pages``): decode reads it faster, but the first such cache a
    process touches can take seconds per GiB on a VM (measured: 12 s for 2 GiB against
    0.4 s on small pages; later ones 0.2 s). Off here, for short-lived processes (scripts,
    tests); ``pdserve serve``'s long-running workers take it (``--huge-pages``)."""

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        if self.num_blocks is not None:
            _positive("num_blocks", self.num_blocks)
        _positive("cpu_cache_bytes", self.cpu_cache_bytes)
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Continuous batching limits. A prefill longer than the token budget runs in chunks."""

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 128
    max_model_len: int | None = None
    policy: str = "fcfs"
    """"fcfs" (arrival order) or "priority" (lower ``priority`` first; see
    ``pdserve.engine.scheduler``)."""
    priority_aging_s: float = 10.0
    """Under "priority": a request's priority improves by one level per this many seconds
    since its arrival, so no request waits forever behind a stream of better ones."""
    priority_yield_s: float | None = None
    """Under "priority", decode role: while a reservation of strictly better priority than
    every request the worker holds waits for its KV, the worker steps none of them, for this
    long at most, so that on a host whose workers share CPU cores the better request's
    prefill, transfer and first token get the cores those decode steps would take. None:
    0.05 s on the CPU, off (0) on an accelerator, whose decode steps take no core from a
    prefill worker."""

    def __post_init__(self) -> None:
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_num_seqs", self.max_num_seqs)
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy must be 'fcfs' or 'priority', got "
                             f"{self.policy!r}")
        _positive("priority_aging_s", self.priority_aging_s)
        if self.priority_yield_s is not None and self.priority_yield_s < 0:
            raise ValueError(f"priority_yield_s must be 0 or more, got {self.priority_yield_s}")
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """What a peer must agree on to read or write our KV blocks.

    The cache is ONE contiguous tensor of shape
    ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`` (2 = key, value),
    row-major, so block ``b`` of every layer is the single byte range
    ``[b * block_bytes, (b + 1) * block_bytes)`` of the buffer: a transfer moves one region
    per block, whatever the number of layers.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    layout: str = KV_LAYOUT

    @property
    def element_size(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers, keys and values."""
        return (
            self.num_layers
            * 2
            * self.block_size
            * self.num_kv_heads
            * self.head_dim
            * self.element_size
        )

    def shape(self, num_blocks: int) -> tuple[int, ...]:
        return (num_blocks, self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything an engine needs. ``model`` is a checkpoint folder or a built-in name
    ('tiny', 'small'); ``dtype``/``device`` 'auto' pick bf16 on CUDA, fp32 on CPU.
    ``cuda_graphs``: replay decode steps as CUDA graphs (CUDA with the Triton attention
    backend only; ignored elsewhere)."""

    model: str = "tiny"
    dtype: str = "auto"
    device: str = "auto"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    attention_backend: str | None = None
    detokenize: bool = True
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.dtype != "auto":
            object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        if self.device != "auto" and not str(self.device).startswith(("cpu", "cuda")):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
