"""The float32 linear kernel on packed weights (``torch.ops.pdserve_cpu.linear_f32``) against
a float64 reference: within the error bound of a float32 sum taken in order, for row counts
that fill its 8-row blocks or not, widths that fill its 48-column panels and 16-column
vectors or not, with and without a bias; each row's result the same bits whatever rows are
beside it and however many threads run; bad arguments refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.model.cpu_linear import PackedF32, linear, pack, packing_supported

pytestmark = pytest.mark.skipif(
    not packing_supported(torch.float32, torch.device("cpu")),
    reason="no float32 linear kernel here (CPU kernels not built, or no AVX-512)")

UNIT = 2.0**-24  # float32's unit roundoff


def operands(m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen),
            torch.randn(n, generator=gen))


def assert_within_sum_bound(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                            b: torch.Tensor | None) -> None:
    """|out - exact| <= (k + 1) u (|x| |w|^T + |b|): the bound of k products summed in order
    and a bias added, each rounded once."""
    exact = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    if b is not None:
        exact, scale = exact + b.double(), scale + b.double().abs()
    bound = (x.shape[1] + 1) * UNIT * scale + 1e-30
    err = (out.double() - exact).abs()
    assert out.dtype == torch.float32 and out.shape == exact.shape
    assert bool((err <= bound).all()), f"worst error / bound {(err / bound).max().item():.2f}"


@pytest.mark.parametrize("m", [1, 3, 8, 9, 17, 64, 130])
@pytest.mark.parametrize("n,k", [(1, 1), (15, 7), (16, 64), (17, 33), (47, 5), (48, 576),
                                 (49, 40), (100, 3), (960, 576), (576, 1536)])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_matches_the_exact_product_within_float32_rounding(m: int, n: int, k: int,
                                                           with_bias: bool) -> None:
    x, w, b = operands(m, n, k, seed=m * 7919 + n * 31 + k)
    bias = b if with_bias else None
    packed = pack(w)
    assert isinstance(packed, PackedF32) and packed.out_features == n
    assert packed.shape == ((n + 15) // 16 * 16, k)
    assert_within_sum_bound(linear(x, packed, bias), x, w, bias)


def test_a_rows_result_does_not_depend_on_the_rows_beside_it_or_the_threads() -> None:
    x, w, b = operands(70, 200, 96, seed=5)
    packed = pack(w)
    whole = linear(x, packed, b)
    for i in (0, 7, 8, 41, 69):
        assert torch.equal(linear(x[i : i + 1], packed, b)[0], whole[i])
    assert torch.equal(linear(x[5:30], packed, b), whole[5:30])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = linear(x, packed, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, whole)


def test_inputs_of_any_layout_and_empty_ones() -> None:
    x, w, b = operands(12, 40, 64, seed=9)
    packed = pack(w)
    strided = torch.randn(64, 12).T  # a transposed view: not contiguous
    assert torch.equal(linear(strided, packed, b), linear(strided.contiguous(), packed, b))
    assert linear(x[:0], packed, b).shape == (0, 40)
    assert_within_sum_bound(linear(x, packed, b), x, w, b)


def test_close_to_mkl_on_a_models_shapes() -> None:
    """What the engine's float32 layers now compute, against what ``F.linear`` computed."""
    for n, k in ((960, 576), (3072, 576), (576, 1536)):
        x, w, _ = operands(32, n, k, seed=n + k)
        torch.testing.assert_close(linear(x, pack(w)), F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_bad_arguments_are_refused() -> None:
    x, w, b = operands(4, 20, 8, seed=1)
    packed = pack(w)
    ops = torch.ops.pdserve_cpu
    with pytest.raises(RuntimeError, match="features"):
        linear(torch.randn(4, 9), packed)
    with pytest.raises(RuntimeError, match="output features packs into"):
        ops.linear_f32(x, packed, None, 40)
    with pytest.raises(RuntimeError, match="bias"):
        linear(x, packed, torch.randn(21))
    with pytest.raises(RuntimeError, match="float32"):
        linear(x.double(), packed)
    with pytest.raises(RuntimeError, match="2-D float32"):
        ops.pack_linear_f32(w.double())



def test_the_benchmark_times_a_models_projections_three_ways(tmp_path: Path) -> None:
    from pdserve.bench import linear_kernel

    assert linear_kernel.projection_shapes("smollm2") == [(960, 576), (576, 576), (3072, 576),
                                                          (576, 1536)]
    out = tmp_path / "linear.json"
    assert linear_kernel.main(["--layers", "2", "--rows", "1", "9", "--repeats", "1",
                               "--json", str(out)]) == 0
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert [r["rows"] for r in rows] == [1, 9]
    assert all(r[k] > 0 for r in rows for k in ("mkl_ms", "mkl_packed_ms", "engine_ms"))
