"""The C++ elementwise stages (``pdserve.engine.model.cpu_ops``) against the plain torch ops
they replace: the residual add and the rotation bit for bit, RMSNorm and SwiGLU within one
unit in the last place of the dtype (a float32 sum in another order, ``exp`` in its last
bit); and a whole model with them equal to the plain torch path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine import cpu_kernels
from pdserve.engine.model import llama

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels did not build")

DTYPES = pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
ULP = {torch.float32: 2e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def within_ulp(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    scale = ref.float().abs().clamp_min(1e-3)
    return bool(((out.float() - ref.float()).abs() / scale).max() <= ULP[dtype])


@DTYPES
@pytest.mark.parametrize("dim", [576, 37])  # SIMD rows, and a tail-only width
def test_add_rms_norm_matches_torch(dtype: torch.dtype, dim: int) -> None:
    from pdserve.engine.model import cpu_ops

    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(7, dim, generator=gen).to(dtype)
    res = torch.randn(7, dim, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype)
    out, summed = cpu_ops.add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(summed, x + res)
    assert within_ulp(out, llama.rms_norm(x + res, w, 1e-5), dtype)
    first, same = cpu_ops.add_rms_norm(x, None, w, 1e-5)
    assert same is x and within_ulp(first, llama.rms_norm(x, w, 1e-5), dtype)


@DTYPES
@pytest.mark.parametrize("head_dim", [64, 36])
def test_rotate_matches_apply_rope_bit_for_bit(dtype: torch.dtype, head_dim: int) -> None:
    from pdserve.engine.model import cpu_ops

    gen = torch.Generator().manual_seed(head_dim)
    qkv = torch.randn(9, 5 + 2, head_dim, generator=gen).to(dtype)
    x = qkv[:, :5]  # a strided view, as the model rotates it
    table = torch.randn(9, 1, head_dim, generator=gen).to(dtype)
    cos, sin = table.chunk(2, dim=-1)
    assert torch.equal(cpu_ops.rotate(x, cos, sin), llama.apply_rope(x, cos, sin))


@DTYPES
def test_silu_mul_matches_torch(dtype: torch.dtype) -> None:
    from pdserve.engine.model import cpu_ops

    gate_up = torch.randn(6, 2 * 1550, generator=torch.Generator().manual_seed(1)).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert within_ulp(cpu_ops.silu_mul(gate_up), F.silu(gate) * up, dtype)


def test_model_with_fused_cpu_stages_matches_plain_torch(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path) -> None:
    from pdserve.engine.attention.torch_backend import TorchAttentionBackend
    from pdserve.engine.model.loader import load_model
    from tests.checkpoints import make_hf_checkpoint, new_cache, prefill_meta

    path = make_hf_checkpoint("llama", tmp_path / "ckpt", seed=3)
    model = load_model(path, "bfloat16", "cpu")
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(0))
    backend = TorchAttentionBackend()
    with torch.inference_mode():
        fused = model(ids, torch.arange(40), new_cache(model), prefill_meta(40), backend)
        monkeypatch.setattr(llama, "_fused", lambda x: None)  # the plain torch ops
        plain = model(ids, torch.arange(40), new_cache(model), prefill_meta(40), backend)
    assert ((fused.float() - plain.float()).abs().max() / plain.float().abs().max()) < 2e-2
