// The decoder's elementwise stages as one CPU op each: the CPU twin of
// engine/model/triton_ops.py (same contracts, same roundings). And the greedy sampler's
// row argmax.
//
// In eager torch each stage is a chain of small ops (RMSNorm alone is eight), and every op
// costs microseconds of dispatch whatever its size: at decode batch sizes, hundreds per step.
// Each op here reads its inputs once and writes its outputs once, rounding every bf16 /
// fp16 intermediate that the torch sequence materialises to that dtype (to nearest even),
// so results equal the torch path's except where a float32 sum is taken in another order
// (RMSNorm's mean) or exp() differs in its last bit (SiLU).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "simd.h"

namespace pdserve_cpu {
namespace {

// Round a float to T's precision (nearest even) and back: what materialising an
// intermediate in T does.
template <typename T>
inline float rounded(float x) {
  return static_cast<float>(static_cast<T>(x));
}
template <>
inline float rounded<float>(float x) {
  return x;
}

// Rows per parallel task: about 16K elements, so that decode-sized inputs stay on one
// thread (a parallel region costs more than they do).
inline int64_t grain(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems)); }

template <typename T>
void add_rms_norm_impl(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
                       double eps, at::Tensor& out, at::Tensor* summed) {
  const int64_t rows = x.size(0), dim = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* rp = residual ? residual->data_ptr<T>() : nullptr;
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* sp = summed ? summed->data_ptr<T>() : nullptr;
  const int64_t sx = x.stride(0), sr = residual ? residual->stride(0) : 0, so = out.stride(0),
                ss = summed ? summed->stride(0) : 0;
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, rows, grain(dim), [&](int64_t lo, int64_t hi) {
    std::vector<float> h(dim);
    for (int64_t r = lo; r < hi; ++r) {
      const T* xr = xp + r * sx;
      int64_t d = 0;
      float sq = 0.f;
#ifdef PDSERVE_AVX512
      __m512 acc = _mm512_setzero_ps();
      for (; d + 16 <= dim; d += 16) {
        __m512 v = load16(xr + d);
        if (rp) {
          v = round16<T>(_mm512_add_ps(v, load16(rp + r * sr + d)));
          store16(sp + r * ss + d, v);
        }
        _mm512_storeu_ps(h.data() + d, v);
        acc = _mm512_fmadd_ps(v, v, acc);
      }
      sq = _mm512_reduce_add_ps(acc);
#endif
      // The scalar loop sums in double: a float sum in row order drifts from torch's
      // vectorised one by enough to move a bf16 / fp16 rounding of h * inv (seen without
      // AVX-512 as two units in the last place of the output).
      double tail = 0.0;
      for (; d < dim; ++d) {
        float v = static_cast<float>(xr[d]);
        if (rp) {
          v = rounded<T>(v + static_cast<float>(rp[r * sr + d]));
          sp[r * ss + d] = static_cast<T>(v);
        }
        h[d] = v;
        tail += static_cast<double>(v) * v;
      }
      sq += static_cast<float>(tail);
      const float inv = 1.f / std::sqrt(sq / static_cast<float>(dim) + feps);
      T* orow = op + r * so;
      d = 0;
#ifdef PDSERVE_AVX512
      const __m512 vinv = _mm512_set1_ps(inv);
      for (; d + 16 <= dim; d += 16)
        store16(orow + d, _mm512_mul_ps(load16(wp + d),
                                        round16<T>(_mm512_mul_ps(_mm512_loadu_ps(h.data() + d), vinv))));
#endif
      for (; d < dim; ++d)
        orow[d] = static_cast<T>(static_cast<float>(wp[d]) * rounded<T>(h[d] * inv));
    }
  });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.stride(1) == 1, name,
              " must be a 2-D CPU tensor with contiguous rows, got ", t.sizes());
}

void check_norm(const at::Tensor& x, const at::Tensor& weight) {
  check_rows(x, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type(),
              "weight must be a contiguous [D] tensor of x's dtype");
}

template <typename F>
void by_dtype(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

// RMSNorm in float32, cast back before the weight, as transformers computes it.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm(x, weight);
  at::Tensor out = at::empty(x.sizes(), x.options());
  by_dtype(x.scalar_type(), "rms_norm", [&](auto tag) {
    add_rms_norm_impl<decltype(tag)>(x, nullptr, weight, eps, out, nullptr);
  });
  return out;
}

// (rms_norm(s), s) for the residual stream s = x + residual (s rounded to the dtype).
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_norm(x, weight);
  check_rows(residual, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "residual must match x's shape and dtype");
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor summed = at::empty(x.sizes(), x.options());
  by_dtype(x.scalar_type(), "add_rms_norm", [&](auto tag) {
    add_rms_norm_impl<decltype(tag)>(x, &residual, weight, eps, out, &summed);
  });
  return {out, summed};
}

template <typename T>
void rotate_impl(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                 at::Tensor& out) {
  const int64_t n = x.size(0), heads = x.size(1), half = x.size(2) / 2;
  const T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* snp = sin.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t sxt = x.stride(0), sxh = x.stride(1), sct = cos.stride(0), sst = sin.stride(0),
                sot = out.stride(0), soh = out.stride(1);
  at::parallel_for(0, n, grain(heads * half * 2), [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const T* c = cp + t * sct;
      const T* s = snp + t * sst;
      for (int64_t h = 0; h < heads; ++h) {
        const T* src = xp + t * sxt + h * sxh;
        T* dst = op + t * sot + h * soh;
        int64_t d = 0;
#ifdef PDSERVE_AVX512
        for (; d + 16 <= half; d += 16) {
          const __m512 x1 = load16(src + d), x2 = load16(src + d + half);
          const __m512 cd = load16(c + d), sd = load16(s + d);
          store16(dst + d, _mm512_sub_ps(round16<T>(_mm512_mul_ps(x1, cd)),
                                         round16<T>(_mm512_mul_ps(x2, sd))));
          store16(dst + d + half, _mm512_add_ps(round16<T>(_mm512_mul_ps(x2, cd)),
                                                round16<T>(_mm512_mul_ps(x1, sd))));
        }
#endif
        for (; d < half; ++d) {
          const float x1 = static_cast<float>(src[d]), x2 = static_cast<float>(src[d + half]);
          const float cd = static_cast<float>(c[d]), sd = static_cast<float>(s[d]);
          dst[d] = static_cast<T>(rounded<T>(x1 * cd) - rounded<T>(x2 * sd));
          dst[d + half] = static_cast<T>(rounded<T>(x2 * cd) + rounded<T>(x1 * sd));
        }
      }
    }
  });
}

// RoPE in the rotate_half convention: x [N, heads, D] (head_dim contiguous), cos / sin
// [N, 1, D / 2] -> a new contiguous [N, heads, D], each product and sum rounded as torch's
// elementwise ops round them.
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0,
              "x must be [N, heads, D] on the CPU with D even and contiguous");
  TORCH_CHECK(cos.dim() == 3 && sin.dim() == 3 && cos.size(0) == x.size(0) &&
                  sin.size(0) == x.size(0) && cos.size(2) == x.size(2) / 2 &&
                  sin.size(2) == x.size(2) / 2 && cos.stride(2) == 1 && sin.stride(2) == 1,
              "cos and sin must be [N, 1, D / 2] with a contiguous last dim");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "cos and sin must have x's dtype");
  at::Tensor out = at::empty(x.sizes(), x.options());
  by_dtype(x.scalar_type(), "rotate",
           [&](auto tag) { rotate_impl<decltype(tag)>(x, cos, sin, out); });
  return out;
}

template <typename T>
void silu_mul_impl(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t sg = gate_up.stride(0), so = out.stride(0);
  at::parallel_for(0, rows, grain(inter), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const T* g = gp + r * sg;
      T* o = op + r * so;
      int64_t d = 0;
#ifdef PDSERVE_AVX512
      const __m512 one = _mm512_set1_ps(1.f);
      for (; d + 16 <= inter; d += 16) {
        const __m512 gate = load16(g + d);
        const __m512 act = round16<T>(_mm512_div_ps(
            gate, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), gate)))));
        store16(o + d, _mm512_mul_ps(act, load16(g + inter + d)));
      }
#endif
      for (; d < inter; ++d) {
        const float gate = static_cast<float>(g[d]);
        const float act = rounded<T>(gate / (1.f + std::exp(-gate)));
        o[d] = static_cast<T>(act * static_cast<float>(g[inter + d]));
      }
    }
  });
}

// SwiGLU's silu(gate) * up of the fused [gate | up] projection [N, 2 I] -> [N, I].
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even width");
  at::Tensor out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  by_dtype(gate_up.scalar_type(), "silu_mul",
           [&](auto tag) { silu_mul_impl<decltype(tag)>(gate_up, out); });
  return out;
}

// Index of the first NaN of x[0 .. n), -1 if there is none.
template <typename T>
int64_t first_nan(const T* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (std::isnan(static_cast<float>(x[j]))) return j;
  return -1;
}

// Index of the first maximum of x[0 .. n) (n > 0), NaN counting as the maximum: what
// torch's max(dim=-1).indices returns. One pass for the maximum (and whether a NaN is
// there), one for where it first occurs; the row stays in L2 between them.
template <typename T>
int64_t first_max(const T* x, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t d = 0;
#ifdef PDSERVE_AVX512
  if (n >= 16) {
    __m512 vmax = _mm512_set1_ps(best);
    __mmask16 nan = 0;
    for (; d + 16 <= n; d += 16) {
      const __m512 v = load16(x + d);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      vmax = _mm512_max_ps(vmax, v);
    }
    if (nan) return first_nan(x, n);
    best = _mm512_reduce_max_ps(vmax);
  }
#endif
  for (int64_t i = d; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    if (std::isnan(v)) return first_nan(x, n);
    best = std::max(best, v);
  }
  int64_t i = 0;
#ifdef PDSERVE_AVX512
  const __m512 vbest = _mm512_set1_ps(best);
  for (; i + 16 <= n; i += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(load16(x + i), vbest, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
#endif
  for (; i < n; ++i)
    if (static_cast<float>(x[i]) == best) return i;
  return 0;  // unreachable: best is one of the row's values
}

// Each row's first maximum of a [rows, n] tensor (contiguous rows) -> int64 [rows]: the
// greedy sampler's argmax. torch's max(dim=-1) keeps an index beside every comparison and
// took 2.4-2.7 ms for the 64 x 49,152 float32 logits of a SmolLM2 decode step on two
// cores; this reads them at memory speed.
at::Tensor argmax_rows(const at::Tensor& x) {
  check_rows(x, "x");
  TORCH_CHECK(x.size(1) > 0, "x must have at least one column");
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t n = x.size(1), sx = x.stride(0);
  by_dtype(x.scalar_type(), "argmax_rows", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    at::parallel_for(0, x.size(0), grain(n), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) op[r] = first_max<T>(xp + r * sx, n);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotate(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotate", &rotate);
  m.impl("silu_mul", &silu_mul);
  m.impl("argmax_rows", &argmax_rows);
}

}  // namespace pdserve_cpu
