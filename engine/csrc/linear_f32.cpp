// float32 linear layers on the CPU with weights packed once, for the few rows of a decode
// step or a short prefill.
//
// torch's float32 F.linear calls MKL's sgemm, which copies the [out, in] weight into its
// own panel layout on every call: at 32 rows that copy costs as much as the multiply, and
// the weight is read from memory before any arithmetic starts. Here the weight is packed
// once at load into panels of 48 output columns, each panel stored k-major ([in][48],
// contiguous), and the multiply streams a panel once per 8-row block of the input. While a
// thread works on one panel it requests the next panel's lines into L2, a line or a few per
// k step, so that the memory read overlaps the arithmetic instead of preceding it.
//
// Every output is the float32 FMA chain over k in order, plus the bias: a row's result does
// not depend on how many rows are multiplied with it or on the thread that computes it.
//
// Packed layout: panel p holds output columns n0 = 48 p .. n0 + w - 1 (w = min(48, N - n0))
// at element offset n0 * K, as K rows of w' floats, w' = w rounded up to 16 (zeros past w):
// the inner loop never masks a load, which halved its speed. The packed tensor is
// [N', K] with N' = N rounded up to 16; the multiply is told N.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "simd.h"

namespace pdserve_cpu {
namespace {

constexpr int64_t kPanel = 48;  // output columns per panel: three vectors of 16
constexpr int64_t kRows = 8;    // input rows per register block (24 accumulators)

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// Columns of panel p of an N-column weight (w), and what it stores per k (w').
inline int64_t panel_width(int64_t N, int64_t p) { return std::min(kPanel, N - p * kPanel); }
inline int64_t panel_stride(int64_t N, int64_t p) { return round16(panel_width(N, p)); }

at::Tensor pack_linear_f32(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "pack_linear_f32: expected a 2-D float32 CPU weight");
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor out = at::zeros({round16(N), K}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t panels = (N + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t n0 = p * kPanel, width = panel_width(N, p), stride = panel_stride(N, p);
      float* panel = dst + n0 * K;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < width; ++j) panel[k * stride + j] = src[(n0 + j) * K + k];
    }
  });
  return out;
}

#ifdef PDSERVE_AVX512
// C[r][0 .. w) = sum_k A[r][k] * B[k][0 .. w) (+ bias) for R rows; B's rows hold V =
// ceil(w / 16) vectors, the stores of the last one are masked by `last`. Along the way,
// `pf_per_k` lines from `pf` on are requested into L2 per k step (the next panel), stopping
// at `pf_end`.
template <int R, int V>
void block(const float* A, int64_t lda, const float* B, int64_t K, const float* bias,
           float* C, int64_t ldc, __mmask16 last, const char* pf, const char* pf_end,
           int pf_per_k) {
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * (16 * V);
    __m512 bv[V];
    for (int v = 0; v < V; ++v) bv[v] = _mm512_loadu_ps(b + 16 * v);
    for (int i = 0; i < pf_per_k && pf < pf_end; ++i, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(a, bv[v], acc[r][v]);
    }
  }
  for (int v = 0; v < V; ++v) {
    const __mmask16 m = v + 1 < V ? static_cast<__mmask16>(0xffff) : last;
    const __m512 bb = bias ? _mm512_maskz_loadu_ps(m, bias + 16 * v) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(C + r * ldc + 16 * v, m, _mm512_add_ps(acc[r][v], bb));
  }
}

template <int V>
void block_rows(int64_t rows, const float* A, int64_t lda, const float* B, int64_t K,
                const float* bias, float* C, int64_t ldc, __mmask16 last, const char* pf,
                const char* pf_end, int pf_per_k) {
#define PDSERVE_BLOCK(R) \
  block<R, V>(A, lda, B, K, bias, C, ldc, last, pf, pf_end, pf_per_k); break;
  switch (rows) {
    case 1: PDSERVE_BLOCK(1)
    case 2: PDSERVE_BLOCK(2)
    case 3: PDSERVE_BLOCK(3)
    case 4: PDSERVE_BLOCK(4)
    case 5: PDSERVE_BLOCK(5)
    case 6: PDSERVE_BLOCK(6)
    case 7: PDSERVE_BLOCK(7)
    default: PDSERVE_BLOCK(8)
  }
#undef PDSERVE_BLOCK
}
#endif

// Rows of the input multiplied per pass over the panels: a chunk's rows stay in L2 while
// every panel of the thread streams past them.
constexpr int64_t kRowChunk = 128;

void panels_f32(const float* A, int64_t M, int64_t K, const float* packed, int64_t N,
                const float* bias, float* C, int64_t p_lo, int64_t p_hi) {
#ifdef PDSERVE_AVX512
  for (int64_t m0 = 0; m0 < M; m0 += kRowChunk) {
    const int64_t m1 = std::min(M, m0 + kRowChunk);
    const int64_t blocks = (m1 - m0 + kRows - 1) / kRows;
    // Enough lines per k step that the row blocks of this panel cover the next one (one
    // panel ahead, a line or a few per k: measured best against none, fixed rates, and two
    // or three panels ahead).
    const int pf_per_k = static_cast<int>(std::clamp<int64_t>((3 + blocks - 1) / blocks, 1, 3));
    for (int64_t p = p_lo; p < p_hi; ++p) {
      const int64_t n0 = p * kPanel, w = panel_width(N, p);
      const float* B = packed + n0 * K;
      const int V = static_cast<int>((w + 15) / 16);
      const __mmask16 last = static_cast<__mmask16>((1u << (w - 16 * (V - 1))) - 1);
      const char* pf = nullptr;
      const char* pf_end = nullptr;
      if (p + 1 < p_hi) {
        pf = reinterpret_cast<const char*>(packed + (n0 + kPanel) * K);
        pf_end = reinterpret_cast<const char*>(packed + (n0 + kPanel + panel_stride(N, p + 1)) * K);
      }
      for (int64_t r0 = m0; r0 < m1; r0 += kRows) {
        const int64_t rows = std::min(kRows, m1 - r0);
        const float* a = A + r0 * K;
        float* c = C + r0 * N + n0;
        const float* bb = bias ? bias + n0 : nullptr;
        switch (V) {
          case 1: block_rows<1>(rows, a, K, B, K, bb, c, N, last, pf, pf_end, pf_per_k); break;
          case 2: block_rows<2>(rows, a, K, B, K, bb, c, N, last, pf, pf_end, pf_per_k); break;
          default: block_rows<3>(rows, a, K, B, K, bb, c, N, last, pf, pf_end, pf_per_k);
        }
        if (pf) pf = std::min(pf_end, pf + 64 * pf_per_k * K);
      }
    }
  }
#else
  for (int64_t p = p_lo; p < p_hi; ++p) {
    const int64_t n0 = p * kPanel, w = panel_width(N, p), stride = panel_stride(N, p);
    const float* B = packed + n0 * K;
    for (int64_t r = 0; r < M; ++r) {
      for (int64_t j = 0; j < w; ++j) {
        float s = 0.f;
        for (int64_t k = 0; k < K; ++k) s = std::fma(A[r * K + k], B[k * stride + j], s);
        C[r * N + n0 + j] = s + (bias ? bias[n0 + j] : 0.f);
      }
    }
  }
#endif
}

// x [M, K] times the packed weight of N output features (transposed), plus bias [N]: [M, N].
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& packed,
                      const c10::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "linear_f32: expected a 2-D float32 CPU input");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kFloat && packed.is_contiguous(),
              "linear_f32: expected a packed float32 weight");
  TORCH_CHECK(N >= 0 && packed.size(0) == round16(N), "linear_f32: a weight of ", N,
              " output features packs into ", round16(N), " rows, not ", packed.size(0));
  TORCH_CHECK(x.size(1) == packed.size(1), "linear_f32: input has ", x.size(1),
              " features, the weight ", packed.size(1));
  const at::Tensor a = x.contiguous();
  const int64_t M = a.size(0), K = a.size(1);
  const float* bp = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N && b.scalar_type() == at::kFloat,
                "linear_f32: expected a float32 bias of ", N, " elements");
    bp = b.data_ptr<float>();
  }
  at::Tensor out = at::empty({M, N}, a.options());
  if (M == 0 || N == 0) return out;
  const int64_t panels = (N + kPanel - 1) / kPanel;
  // About 64K multiply-adds per task at the least: small products stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, M * K * kPanel));
  const float* ap = a.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, panels, grain, [&](int64_t lo, int64_t hi) {
    panels_f32(ap, M, K, wp, N, bp, op, lo, hi);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve_cpu, m) {
  m.def("pack_linear_f32(Tensor weight) -> Tensor");
  m.def("linear_f32(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve_cpu, CPU, m) {
  m.impl("pack_linear_f32", &pack_linear_f32);
  m.impl("linear_f32", &linear_f32);
}

}  // namespace pdserve_cpu
