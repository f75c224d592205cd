"""Tensor-parallel Llama-family decoder: one rank's shard of ``CausalLM``.

Built around ``pdserve.engine.model.llama`` rather than beside it: a rank's model is a
``CausalLM`` of the rank's local shapes (its query and KV heads, its slice of the MLP and of
the vocabulary; see ``pdserve.engine.tp_layout``), whose layers add the two all-reduces of
Megatron's row-parallel projections and whose embedding and LM head are vocabulary-parallel.
The attention backend and the KV cache see only the rank's own KV heads.

Numerics: each rank's partial products of o_proj and down_proj are summed by the all-reduce
(fp32 sums in another order than one matmul: logits agree with TP=1 within rounding);
o_proj's bias is added by rank 0 only. The embedding's all-reduce adds zeros to each row's
one real value and the logits are gathered, so both are exact.

Loading reads only the rank's slices of each checkpoint tensor (safetensors slices; a GGUF
tensor is dequantized and sliced one at a time), so a rank holds about ``1/world`` of the
weights.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata
from pdserve.engine.config import ModelConfig
from pdserve.engine.model.cpu_linear import linear
from pdserve.engine.model.llama import (
    INPUT_MAJOR,
    CausalLM,
    DecoderLayer,
    _empty_weight,
    add_rms_norm,
    has_o_bias,
    rope_tables,
)
from pdserve.engine.tp_group import TPGroup
from pdserve.engine.tp_layout import Span, TPLayout

logger = logging.getLogger(__name__)

Reader = Callable[[str, int, Span | None], torch.Tensor]
"""``reader(hf_name, dim, span)``: rows (``dim`` 0) or columns (``dim`` 1) ``span`` of a
checkpoint tensor, or all of it when ``span`` is None."""


def layout_for(config: ModelConfig, rank: int, world: int) -> TPLayout:
    return TPLayout(rank, world, config.num_heads, config.num_kv_heads, config.head_dim,
                    config.intermediate_size, config.vocab_size)


def local_config(config: ModelConfig, layout: TPLayout) -> ModelConfig:
    """The config of one rank's shard: its heads, MLP width and vocabulary rows."""
    return dataclasses.replace(
        config,
        num_heads=layout.local_heads,
        num_kv_heads=layout.local_kv_heads,
        intermediate_size=layout.intermediate().size,
        vocab_size=layout.local_vocab,
    )


class ParallelDecoderLayer(DecoderLayer):
    """``DecoderLayer`` over the rank's heads and MLP slice, with one all-reduce after
    o_proj and one after down_proj."""

    def __init__(self, config: ModelConfig, index: int, group: TPGroup) -> None:
        super().__init__(config, index)
        self.group = group

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(partial)


class ParallelCausalLM(CausalLM):
    """Rank ``group.rank``'s shard of a ``CausalLM`` of ``full_config``.

    ``config`` is the local shard's (what the KV cache and attention see); ``full_config``
    the model's. ``compute_logits`` returns the full vocabulary's logits on every rank.
    """

    def __init__(self, full_config: ModelConfig, group: TPGroup) -> None:
        self.layout = layout_for(full_config, group.rank, group.world)
        config = local_config(full_config, self.layout)
        super().__init__(config)
        self.full_config = full_config
        self.group = group
        self.layers = nn.ModuleList(
            ParallelDecoderLayer(config, i, group) for i in range(config.num_layers)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        vocab = self.layout.vocab()
        outside = (input_ids < vocab.start) | (input_ids >= vocab.stop)
        hidden = F.embedding((input_ids - vocab.start).masked_fill(outside, 0), self.embed_tokens)
        hidden = self.group.all_reduce(hidden.masked_fill(outside.unsqueeze(-1), 0.0))
        cos, sin = self.rope_cache[positions].unsqueeze(1).chunk(2, dim=-1)
        residual = None
        for layer, kv_layer in zip(self.layers, kv_cache.unbind(1), strict=True):
            hidden, residual = layer(hidden, residual, cos, sin, kv_layer, meta, backend)
        return add_rms_norm(hidden, residual, self.norm, self.config.rms_norm_eps)[0]

    def compute_logits(self, hidden: torch.Tensor, as_float: bool = True) -> torch.Tensor:
        # Always float32: the vocabulary shards are gathered in one dtype whatever the
        # sampler needs (``as_float`` is the single-rank model's option).
        local = linear(hidden, self.head_weight()).float()
        return torch.cat(self.group.all_gather(local), dim=-1)[:, : self.full_config.vocab_size]

    # -- sharded loading ----------------------------------------------------------------

    def _shard_plan(self) -> dict[str, tuple[str, int, int, Span | None]]:
        """HF name -> (our parameter, row offset in it, dim sliced, span of the HF tensor;
        None = the whole tensor, replicated)."""
        c, lay = self.full_config, self.layout
        d = c.head_dim
        q_rows = lay.rows(lay.heads(), d)
        kv_rows = lay.rows(lay.kv_heads(), d)
        q_local, kv_local = q_rows.size, kv_rows.size
        inter = lay.intermediate()
        vocab = lay.vocab()
        plan: dict[str, tuple[str, int, int, Span | None]] = {
            "model.embed_tokens.weight": ("embed_tokens", 0, 0, vocab),
            "model.norm.weight": ("norm", 0, 0, None),
        }
        if not c.tie_word_embeddings:
            plan["lm_head.weight"] = ("lm_head", 0, 0, vocab)
        for i in range(c.num_layers):
            hf, ours = f"model.layers.{i}.", f"layers.{i}."
            attn, mlp = hf + "self_attn.", hf + "mlp."
            plan[hf + "input_layernorm.weight"] = (ours + "input_layernorm", 0, 0, None)
            plan[hf + "post_attention_layernorm.weight"] = (
                ours + "post_attention_layernorm", 0, 0, None)
            for proj, off, rows in (("q_proj", 0, q_rows), ("k_proj", q_local, kv_rows),
                                    ("v_proj", q_local + kv_local, kv_rows)):
                plan[f"{attn}{proj}.weight"] = (ours + "qkv_proj", off, 0, rows)
                if c.qkv_bias:
                    plan[f"{attn}{proj}.bias"] = (ours + "qkv_bias", off, 0, rows)
            plan[attn + "o_proj.weight"] = (ours + "o_proj", 0, 1, q_rows)
            if has_o_bias(c) and lay.rank == 0:  # added once, before the all-reduce
                plan[attn + "o_proj.bias"] = (ours + "o_bias", 0, 0, None)
            if c.qk_norm:
                plan[attn + "q_norm.weight"] = (ours + "q_norm", 0, 0, None)
                plan[attn + "k_norm.weight"] = (ours + "k_norm", 0, 0, None)
            plan[mlp + "gate_proj.weight"] = (ours + "gate_up_proj", 0, 0, inter)
            plan[mlp + "up_proj.weight"] = (ours + "gate_up_proj", inter.size, 0, inter)
            plan[mlp + "down_proj.weight"] = (ours + "down_proj", 0, 1, inter)
        return plan

    def load_shards(self, read: Reader, dtype: torch.dtype, device: torch.device | str,
                    rope_table: torch.Tensor | None = None) -> None:
        """Fill every parameter with this rank's slices, read through ``read`` (the full
        checkpoint was validated by the caller); parameters nothing fills (padding rows,
        the o_proj bias of ranks other than 0) are zero."""
        on_cuda = torch.device(device).type == "cuda"
        fresh = {
            name: _empty_weight(p.shape, dtype, device, on_cuda and name.endswith(INPUT_MAJOR))
            .zero_()
            for name, p in self.named_parameters()
        }
        for hf_name, (ours, offset, dim, span) in self._shard_plan().items():
            value = read(hf_name, dim, span)
            rows = value.shape[0]
            fresh[ours][offset : offset + rows].copy_(value)
            del value
        for name, value in fresh.items():
            module_name, _, attr = name.rpartition(".")
            module = self.get_submodule(module_name) if module_name else self
            setattr(module, attr, nn.Parameter(value, requires_grad=False))
        c = self.full_config
        table = rope_tables(c.rope, c.head_dim, c.max_position_embeddings)
        self.rope_cache = (table if rope_table is None else rope_table).to(
            device=device, dtype=dtype)


def slicing_reader(full: Mapping[str, torch.Tensor]) -> Reader:
    """A ``Reader`` over a mapping of whole tensors (each read whole, then sliced)."""

    def read(name: str, dim: int, span: Span | None) -> torch.Tensor:
        value = full[name]
        if span is None:
            return value
        return value.narrow(dim, span.start, span.size).clone()

    return read


def load_parallel_model(path: str | Path, dtype: torch.dtype, device: torch.device,
                        group: TPGroup) -> ParallelCausalLM:
    """This rank's shard of the checkpoint folder or GGUF file at ``path``, validated as a
    whole (the same errors as ``load_model``), eval mode."""
    from pdserve.engine.model import loader
    from pdserve.engine.model.gguf import is_gguf

    if is_gguf(path):
        from pdserve.engine.model.gguf_loader import gguf_shard_source

        config, gguf_tensors, table = gguf_shard_source(path, device)
        read = slicing_reader(gguf_tensors)
    else:
        folder = loader.check_folder(path)
        config = loader.load_model_config(folder)
        tensors = loader._LazyTensors(loader._weight_files(folder))
        loader._validate(folder, CausalLM(config), tensors)
        read, table = safetensors_reader(tensors), None
    model = ParallelCausalLM(config, group)
    model.load_shards(read, dtype, device, table)
    logger.info("loaded rank %d of %d of %s: %.1fM of %.1fM params", group.rank, group.world,
                config.architecture, sum(p.numel() for p in model.parameters()) / 1e6,
                _full_params(config) / 1e6)
    return model.eval()


def safetensors_reader(tensors: object) -> Reader:
    """A ``Reader`` that reads only the asked slice from the safetensors file."""

    def read(name: str, dim: int, span: Span | None) -> torch.Tensor:
        handle = tensors._open(name)  # type: ignore[attr-defined]
        if span is None:
            return handle.get_tensor(name)
        sl = handle.get_slice(name)
        return sl[span.start : span.stop] if dim == 0 else sl[:, span.start : span.stop]

    return read


def _full_params(config: ModelConfig) -> int:
    return sum(p.numel() for p in CausalLM(config).parameters())
