"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache.

One module covers the family; the variants differ only in flags of ``ModelConfig``:
``qkv_bias`` (Qwen2, or ``attention_bias``), ``qk_norm`` (Qwen3: RMSNorm over each head of q
and k before RoPE), ``tie_word_embeddings`` and GQA / MQA head counts.

The numerics follow transformers' implementation op for op where it matters for exactness:
RMSNorm in float32 then cast back before the weight, RoPE tables computed in float32 from
the same ``inv_freq`` and cast to the model dtype, the ``rotate_half`` convention.
Query, key and value projections are fused into one ``qkv_proj`` and gate / up into one
``gate_up_proj``; ``hf_tensor_shapes`` and ``load_hf_tensors`` map the checkpoint's
Hugging Face names onto the fused parameters.

The residual stream is carried beside each layer's output and added by the next norm
(``add_rms_norm``), so that the add, the norm, the rotation and the SwiGLU product each run
as one fused kernel, with the same roundings: Triton's on CUDA
(``pdserve.engine.model.triton_ops``), C++ on the CPU (``pdserve.engine.model.cpu_ops``).
Elsewhere, or without ``triton`` / a C++ compiler, the plain torch ops run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata
from pdserve.engine.config import ModelConfig, RopeConfig
from pdserve.engine.model.cpu_linear import linear

# Checkpoint entries that carry no weights (recomputed buffers of older exports).
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (float32), computed as transformers does for
    the 'default', 'linear' and 'llama3' rope types."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.kind == "llama3":
        old_context_len = rope.original_max_position
        low_freq_wavelen = old_context_len / rope.low_freq_factor
        high_freq_wavelen = old_context_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_context_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    elif rope.kind != "default":
        raise ValueError(f"unsupported rope type {rope.kind!r}")
    return inv_freq


def rope_tables(rope: RopeConfig, head_dim: int, max_positions: int) -> torch.Tensor:
    """``[max_positions, head_dim]`` float32: cos of the half-frequencies in the first half,
    sin in the second (the rotate_half tables repeat each half, so one copy suffices)."""
    inv_freq = rope_inv_freq(rope, head_dim)
    freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, heads, D]`` rotated with ``cos``/``sin`` ``[N, 1, D/2]``; equal element for
    element to transformers' ``x * cos + rotate_half(x) * sin``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32 and cast back before the weight (as
    transformers does). ``weight`` broadcasts against ``x`` (``[D]``, or ``[heads, D]``)."""
    if x.dtype == torch.float32:
        if weight.dim() == 1:
            return F.rms_norm(x, weight.shape, weight, eps)  # fused; same values on fp32
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@functools.cache
def _load_triton_ops() -> ModuleType | None:
    try:
        from pdserve.engine.model import triton_ops
    except ImportError:
        return None
    return triton_ops


@functools.cache
def _load_cpu_ops() -> ModuleType | None:
    from pdserve.engine import cpu_kernels

    if not cpu_kernels.available():
        return None
    from pdserve.engine.model import cpu_ops

    return cpu_ops


def _fused(x: torch.Tensor) -> ModuleType | None:
    """The fused kernels: Triton's on CUDA (when triton imports), the C++ ones on the CPU
    (when they build); None elsewhere."""
    if x.is_cuda:
        return _load_triton_ops()
    return _load_cpu_ops() if x.is_cpu else None  # not x.device: that builds an object


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(s), s)`` for the residual stream ``s = x + residual`` (``s = x`` when
    ``residual`` is None). ``x`` is ``[N, D]``."""
    ops = _fused(x)
    if ops is not None and x.stride(-1) == 1:
        return ops.add_rms_norm(x, residual, weight, eps)
    summed = x if residual is None else x + residual
    return rms_norm(summed, weight, eps), summed


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rope``, as one kernel on CUDA (for head_dim a power of two)."""
    ops = _fused(x)
    head_dim = x.shape[-1]
    if ops is not None and x.stride(-1) == 1 and (not x.is_cuda or head_dim & (head_dim - 1) == 0):
        return ops.rotate(x, cos, sin)
    return apply_rope(x, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up`` of the fused ``[gate | up]`` projection."""
    ops = _fused(gate_up)
    if ops is not None:
        return ops.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


INPUT_MAJOR = ("o_proj", "gate_up_proj", "down_proj")
"""Weights stored input-major on CUDA: ``[in, out]`` contiguous, the parameter being its
transposed ``[out, in]`` view, so ``F.linear`` runs cuBLAS's plain (NN) product. Measured on
an H100 at 1-64 rows, that streams these three 2-11% faster than the ``[out, in]`` layout
(o_proj 23.5 -> 20.9 us); the fused qkv projection is faster as it is."""


def _empty_weight(
    shape: torch.Size, dtype: torch.dtype, device: torch.device | str, input_major: bool
) -> torch.Tensor:
    if input_major and len(shape) == 2:
        return torch.empty(shape[::-1], dtype=dtype, device=device).t()
    return torch.empty(shape, dtype=dtype, device=device)


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP block with fused projections."""

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.eps = config.rms_norm_eps
        self.scale = config.head_dim**-0.5
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        hidden, inter = config.hidden_size, config.intermediate_size

        self.input_layernorm = _param(hidden)
        self.qkv_proj = _param(q_size + 2 * kv_size, hidden)
        self.qkv_bias = _param(q_size + 2 * kv_size) if config.qkv_bias else None
        self.q_norm = _param(config.head_dim) if config.qk_norm else None
        self.k_norm = _param(config.head_dim) if config.qk_norm else None
        self.o_proj = _param(hidden, q_size)
        self.o_bias = _param(hidden) if has_o_bias(config) else None
        self.post_attention_layernorm = _param(hidden)
        self.gate_up_proj = _param(2 * inter, hidden)
        self.down_proj = _param(hidden, inter)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual + hidden`` is the stream entering the layer (``hidden`` alone for the
        first layer, ``residual`` None); returns ``(mlp output, stream after attention)``,
        whose sum is the stream leaving it."""
        n = hidden.shape[0]
        x, residual = add_rms_norm(hidden, residual, self.input_layernorm, self.eps)
        qkv = linear(x, self.qkv_proj, self.qkv_bias)
        # q and k heads side by side: one norm and one rotation for both.
        qk_heads = self.num_heads + self.num_kv_heads
        # split_with_sizes: Tensor.split is a Python wrapper, called twice per layer and step
        qk, v = qkv.view(n, qk_heads + self.num_kv_heads, self.head_dim).split_with_sizes(
            (qk_heads, self.num_kv_heads), dim=1)
        if self.q_norm is not None:
            qk_weight = torch.cat(
                (
                    self.q_norm.expand(self.num_heads, -1),
                    self.k_norm.expand(self.num_kv_heads, -1),
                )
            )
            qk = rms_norm(qk, qk_weight, self.eps)
        q, k = rotate(qk, cos, sin).split_with_sizes((self.num_heads, self.num_kv_heads), dim=1)
        backend.write_kv(kv_layer, k, v, meta)
        attn = backend.attend(q, kv_layer, meta, self.scale)
        attn_out = self.reduce(linear(attn.reshape(n, self.q_size), self.o_proj, self.o_bias))

        x, residual = add_rms_norm(attn_out, residual, self.post_attention_layernorm, self.eps)
        mlp_out = linear(silu_mul(linear(x, self.gate_up_proj)), self.down_proj)
        return self.reduce(mlp_out), residual

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over tensor-parallel ranks of a row-parallel projection's output (after
        o_proj and after down_proj); one rank holds the whole product."""
        return partial


def has_o_bias(config: ModelConfig) -> bool:
    """Qwen2 biases q/k/v only; Llama and Qwen3 with ``attention_bias`` bias o_proj too."""
    return config.qkv_bias and config.architecture not in ("Qwen2ForCausalLM",)


class CausalLM(nn.Module):
    """A Llama-family decoder whose attention goes through an ``AttentionBackend``.

    ``__init__`` allocates nothing: parameters live on the meta device until
    ``load_hf_tensors`` (see ``pdserve.engine.model.loader.load_model``) assigns real ones, together
    with the RoPE table ``rope_cache`` for positions ``[0, max_position_embeddings)``.
    The model holds no per-request state.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = _param(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = _param(config.hidden_size)
        self.lm_head = (
            None if config.tie_word_embeddings else _param(config.vocab_size, config.hidden_size)
        )
        self.packed_head: torch.Tensor | None = None
        self.register_buffer(
            "rope_cache",
            torch.empty(config.max_position_embeddings, config.head_dim, device="meta"),
            persistent=False,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """Run ``N`` new tokens (flattened batch, ``[N]`` ids and absolute positions) and
        return their final-normed hidden states ``[N, hidden]``.

        Each layer ``i`` writes the tokens' K/V into ``kv_cache[:, i]`` (slots from ``meta``)
        before attending over it; the cache layout is ``pdserve.engine.config.KVCacheSpec``'s.
        """
        hidden = F.embedding(input_ids, self.embed_tokens)
        cos, sin = self.rope_cache[positions].unsqueeze(1).chunk(2, dim=-1)
        residual = None
        for layer, kv_layer in zip(self.layers, kv_cache.unbind(1), strict=True):
            hidden, residual = layer(hidden, residual, cos, sin, kv_layer, meta, backend)
        return add_rms_norm(hidden, residual, self.norm, self.config.rms_norm_eps)[0]

    def compute_logits(self, hidden: torch.Tensor, as_float: bool = True) -> torch.Tensor:
        """``[n, hidden]`` final hidden states -> ``[n, vocab]`` float32 logits; in the
        model's dtype when ``as_float`` is false, for a sampler that only compares them
        (``pdserve.engine.sampler.compares_only``)."""
        logits = linear(hidden, self.head_weight())
        return logits.float() if as_float else logits

    def head_weight(self) -> torch.Tensor:
        """The output projection's weight: a packed copy of the tied embedding where
        ``pdserve.engine.model.cpu_linear.pack_model`` made one."""
        if self.packed_head is not None:
            return self.packed_head
        return self.embed_tokens if self.lm_head is None else self.lm_head

    # -- checkpoint mapping -------------------------------------------------------------

    def hf_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a Hugging Face checkpoint of this config must hold, with its shape."""
        return {name: shape for name, (_, _, shape) in self._hf_plan().items()}

    def _hf_plan(self) -> dict[str, tuple[str, int, tuple[int, ...]]]:
        """HF name -> (our parameter name, row offset in it, shape)."""
        c = self.config
        plan: dict[str, tuple[str, int, tuple[int, ...]]] = {
            "model.embed_tokens.weight": ("embed_tokens", 0, (c.vocab_size, c.hidden_size)),
            "model.norm.weight": ("norm", 0, (c.hidden_size,)),
        }
        if not c.tie_word_embeddings:
            plan["lm_head.weight"] = ("lm_head", 0, (c.vocab_size, c.hidden_size))
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        h, inter = c.hidden_size, c.intermediate_size
        for i in range(c.num_layers):
            hf, ours = f"model.layers.{i}.", f"layers.{i}."
            attn = hf + "self_attn."
            plan[hf + "input_layernorm.weight"] = (ours + "input_layernorm", 0, (h,))
            plan[hf + "post_attention_layernorm.weight"] = (
                ours + "post_attention_layernorm",
                0,
                (h,),
            )
            for proj, off, rows in (("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv)):
                plan[f"{attn}{proj}.weight"] = (ours + "qkv_proj", off, (rows, h))
                if c.qkv_bias:
                    plan[f"{attn}{proj}.bias"] = (ours + "qkv_bias", off, (rows,))
            plan[attn + "o_proj.weight"] = (ours + "o_proj", 0, (h, q))
            if has_o_bias(c):
                plan[attn + "o_proj.bias"] = (ours + "o_bias", 0, (h,))
            if c.qk_norm:
                plan[attn + "q_norm.weight"] = (ours + "q_norm", 0, (c.head_dim,))
                plan[attn + "k_norm.weight"] = (ours + "k_norm", 0, (c.head_dim,))
            mlp = hf + "mlp."
            plan[mlp + "gate_proj.weight"] = (ours + "gate_up_proj", 0, (inter, h))
            plan[mlp + "up_proj.weight"] = (ours + "gate_up_proj", inter, (inter, h))
            plan[mlp + "down_proj.weight"] = (ours + "down_proj", 0, (h, inter))
        return plan

    def load_hf_tensors(
        self,
        tensors: Mapping[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        """Replace every parameter with real storage on ``device`` in ``dtype``, filled from
        ``tensors`` (HF names, shapes as ``hf_tensor_shapes``; the caller validated them),
        and move the RoPE table there (computed in float32, then cast, as transformers does).
        """
        params = dict(self.named_parameters())
        on_cuda = torch.device(device).type == "cuda"
        fresh = {
            name: _empty_weight(p.shape, dtype, device, on_cuda and name.endswith(INPUT_MAJOR))
            for name, p in params.items()
        }
        for hf_name, (ours, offset, shape) in self._hf_plan().items():
            fresh[ours][offset : offset + shape[0]].copy_(tensors[hf_name])
        for name, value in fresh.items():
            module_name, _, attr = name.rpartition(".")
            module = self.get_submodule(module_name) if module_name else self
            setattr(module, attr, nn.Parameter(value, requires_grad=False))
        c = self.config
        table = rope_tables(c.rope, c.head_dim, c.max_position_embeddings)
        self.rope_cache = table.to(device=device, dtype=dtype)
