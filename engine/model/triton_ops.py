"""The decoder's elementwise stages as fused Triton kernels: the CUDA path of
``pdserve.engine.model.llama``'s ``add_rms_norm``, ``rotate`` and ``silu_mul``.

In plain torch each of these is a chain of small kernels (RMSNorm alone is eight), and at
decode batch sizes every kernel costs about a microsecond and a half whatever its size:
together they took a fifth of a batch-1 decode step, and at prefill their float32
intermediates cost a quarter of the step's memory traffic. Here each stage is one kernel
that reads its inputs once and writes its outputs once.

Each kernel rounds where the torch sequence rounds (every bf16 / fp16 intermediate that
torch materialises is rounded to that dtype here too, to nearest even), so bf16 results
equal the torch path's except where a float32 sum is taken in a different order (RMSNorm's
mean) or ``exp`` differs in its last bit (SiLU); the residual add and the rotation are
bit-exact. The kernels need CUDA tensors, or ``TRITON_INTERPRET=1``
set before triton is first imported (CPU tensors, for tests). Importing this module without
``triton`` raises ``ImportError``; ``pdserve.engine.model.llama`` imports it only for CUDA tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SILU_BLOCK = 1024


# fmt: off
@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """Float32 ``x`` rounded to the nearest ``dtype`` value (ties to even), kept in float32.
    bf16 is rounded on the bits: a cast there and back may be folded away by the compiler,
    and Triton's interpreter truncates instead of rounding."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    elif dtype == tl.float16:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    dim, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One row: ``s = x + residual`` (rounded, stored), then RMSNorm of ``s``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    dtype = x_ptr.dtype.element_ty
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h = _rounded(h + r, dtype)
        tl.store(res_out_ptr + row * stride_ro + cols, h.to(dtype), mask=mask)
    inv = tl.math.rsqrt(tl.sum(h * h, 0) / dim + eps)
    normed = _rounded(h * inv, dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = _rounded(w * normed, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh,
    num_heads,
    BLOCK_H: tl.constexpr, HALF: tl.constexpr,
):
    """One token, all its heads: ``(x1 cos - x2 sin, x2 cos + x1 sin)``, each product and
    sum rounded to the tensor's dtype as torch's elementwise ops round them."""
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, HALF)[None, :]
    mask = heads < num_heads
    src = x_ptr + tok * stride_xt + heads * stride_xh + dims
    dtype = x_ptr.dtype.element_ty
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + tok * stride_ct + dims).to(tl.float32)
    s = tl.load(sin_ptr + tok * stride_st + dims).to(tl.float32)
    first = _rounded(_rounded(x1 * c, dtype) - _rounded(x2 * s, dtype), dtype)
    second = _rounded(_rounded(x2 * c, dtype) + _rounded(x1 * s, dtype), dtype)
    dst = out_ptr + tok * stride_ot + heads * stride_oh + dims
    tl.store(dst, first.to(dtype), mask=mask)
    tl.store(dst + HALF, second.to(dtype), mask=mask)


@triton.jit
def _silu_mul_kernel(
    x_ptr, out_ptr, stride_x, stride_o, inter,
    BLOCK: tl.constexpr,
):
    """``silu(gate) * up`` for one row's block, ``gate_up`` = ``[gate | up]``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    act = _rounded(gate / (1.0 + tl.exp(-gate)), dtype)
    tl.store(out_ptr + row * stride_o + cols, _rounded(act * up, dtype).to(dtype), mask=mask)
# fmt: on


def _rows(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"{name} must be 2-D with contiguous rows, got {tuple(x.shape)}")


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (or ``x`` when ``residual`` is None), then ``(rms_norm(s),
    s)``: RMSNorm in float32, cast back before the weight. ``x`` and ``residual`` are
    ``[N, D]``, ``weight`` ``[D]``; both results are new tensors."""
    _rows(x, "x")
    num_rows, dim = x.shape
    out = torch.empty_like(x)
    if residual is None:
        summed, res, res_out = x, x, x
    else:
        _rows(residual, "residual")
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual {tuple(residual.shape)} {residual.dtype} does not match "
                f"x {tuple(x.shape)} {x.dtype}"
            )
        summed = torch.empty_like(x)
        res, res_out = residual, summed
    if num_rows:
        block = triton.next_power_of_2(dim)
        _rms_norm_kernel[(num_rows,)](
            x,
            res,
            weight,
            out,
            res_out,
            x.stride(0),
            res.stride(0),
            out.stride(0),
            res_out.stride(0),
            dim,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK_D=block,
            num_warps=min(16, max(1, block // 512)),
        )
    return out, summed


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` ``[N, heads, D]`` (last dim contiguous) with ``cos``/``sin``
    ``[N, 1, D/2]`` in the rotate_half convention -> a new contiguous ``[N, heads, D]``."""
    num_tokens, num_heads, head_dim = x.shape
    half = head_dim // 2
    if x.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("rotate needs the last dim of x, cos and sin contiguous")
    if half & (half - 1) or cos.shape[-1] != half or sin.shape[-1] != half:
        raise ValueError(
            f"rotate needs head_dim a power of two matching cos/sin, got x "
            f"{tuple(x.shape)}, cos {tuple(cos.shape)}"
        )
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=x.dtype, device=x.device)
    if num_tokens:
        _rotate_kernel[(num_tokens,)](
            x,
            cos,
            sin,
            out,
            x.stride(0),
            x.stride(1),
            cos.stride(0),
            sin.stride(0),
            out.stride(0),
            out.stride(1),
            num_heads,
            BLOCK_H=triton.next_power_of_2(num_heads),
            HALF=half,
            num_warps=4,
        )
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up`` ``[N, 2 I]`` = ``[gate | up]`` -> ``[N, I]``."""
    _rows(gate_up, "gate_up")
    num_rows, width = gate_up.shape
    inter = width // 2
    out = torch.empty((num_rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    if num_rows:
        _silu_mul_kernel[(num_rows, triton.cdiv(inter, _SILU_BLOCK))](
            gate_up,
            out,
            gate_up.stride(0),
            out.stride(0),
            inter,
            BLOCK=_SILU_BLOCK,
            num_warps=4,
        )
    return out
