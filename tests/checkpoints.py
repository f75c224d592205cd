"""Small random Hugging Face checkpoints of every supported architecture, for tests.

``make_hf_checkpoint("llama", tmp_path / "ckpt")`` writes a folder that transformers and
``pdserve.engine.model.loader`` both load. Weights are re-initialised with larger spreads than
transformers' defaults so that logits are well separated and greedy decoding is not
decided by near-ties; the same ``seed`` gives the same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pdserve.engine.attention.base import AttentionMetadata

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
BLOCK_SIZE = 16
NUM_BLOCKS = 8

_BASE: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def hf_classes(arch: str) -> tuple[type, type]:
    """(config class, causal-LM class) of transformers for ``arch``."""
    import transformers

    names = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    }
    if arch not in names:
        raise ValueError(f"unknown test architecture {arch!r}; use one of {ARCHITECTURES}")
    config_name, model_name = names[arch]
    return getattr(transformers, config_name), getattr(transformers, model_name)


@torch.no_grad()
def reinit_spread(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter: embeddings std 1, projections std 1.5/sqrt(fan_in), norm
    weights around 1, biases std 0.1 (deterministic for a given seed)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        elif name.endswith("bias"):
            value = 0.1 * torch.randn(p.shape, generator=gen)
        elif "embed_tokens" in name:
            value = torch.randn(p.shape, generator=gen)
        else:
            value = torch.randn(p.shape, generator=gen) * (1.5 / p.shape[1] ** 0.5)
        p.copy_(value.to(p.dtype))


def make_hf_checkpoint(arch: str, path: str | Path, **overrides: Any) -> Path:
    """Write a random ``arch`` checkpoint to ``path`` and return the folder.

    ``overrides`` are transformers config fields (``num_key_value_heads=1`` for MQA,
    ``tie_word_embeddings=True``, ``rope_parameters={...}``, ...), plus ``seed`` (int) and
    ``max_shard_size`` (e.g. ``"40KB"`` to get a sharded ``model.safetensors.index.json``).
    """
    config_cls, model_cls = hf_classes(arch)
    seed = int(overrides.pop("seed", 0))
    max_shard_size = overrides.pop("max_shard_size", None)
    fields = {**_BASE, **overrides}
    if arch == "mistral":
        fields.setdefault("sliding_window", None)
    config = config_cls(**fields)
    model = model_cls(config).to(torch.float32)
    reinit_spread(model, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **kwargs)
    return folder


def prefill_meta(n: int, start: int = 0, blocks: int = NUM_BLOCKS) -> AttentionMetadata:
    """One sequence whose last ``n`` of ``start + n`` tokens are new, in blocks 0..blocks-1."""
    pos = torch.arange(start, start + n)
    return AttentionMetadata(
        slot_block_ids=pos // BLOCK_SIZE,
        slot_offsets=pos % BLOCK_SIZE,
        num_decodes=0,
        decode_block_tables=torch.zeros(0, blocks, dtype=torch.int32),
        decode_seq_lens=torch.zeros(0, dtype=torch.int32),
        prefill_query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        prefill_seq_lens=torch.tensor([start + n], dtype=torch.int32),
        prefill_block_tables=torch.arange(blocks, dtype=torch.int32)[None],
        prefill_query_lens_cpu=[n],
        prefill_seq_lens_cpu=[start + n],
    )


def decode_meta(position: int, blocks: int = NUM_BLOCKS) -> AttentionMetadata:
    """One decode token at ``position`` of a sequence in blocks 0..blocks-1."""
    pos = torch.tensor([position])
    return AttentionMetadata(
        slot_block_ids=pos // BLOCK_SIZE,
        slot_offsets=pos % BLOCK_SIZE,
        num_decodes=1,
        decode_block_tables=torch.arange(blocks, dtype=torch.int32)[None],
        decode_seq_lens=torch.tensor([position + 1], dtype=torch.int32),
        prefill_query_start_loc=torch.zeros(1, dtype=torch.int32),
        prefill_seq_lens=torch.zeros(0, dtype=torch.int32),
        prefill_block_tables=torch.zeros(0, blocks, dtype=torch.int32),
        prefill_query_lens_cpu=[],
        prefill_seq_lens_cpu=[],
        max_decode_seq_len=position + 1,
    )


def new_cache(model: Any, blocks: int = NUM_BLOCKS) -> torch.Tensor:
    c = model.config
    shape = (blocks, c.num_layers, 2, BLOCK_SIZE, c.num_kv_heads, c.head_dim)
    return torch.zeros(shape, dtype=model.dtype)
