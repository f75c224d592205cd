// Paged attention on the CPU that reads the KV cache in place.
//
// Built and loaded by engine/cpu_kernels.py (one compiler call, no Python
// headers): the ops are registered with torch's dispatcher as torch.ops.pdserve_cpu.*.
//
// Layout (engine.config.KVCacheSpec): one layer's view kv[num_blocks, 2, block_size,
// num_kv_heads, head_dim], any strides but a contiguous head_dim. A batch is a list of
// sequences; sequence i's queries query[qsl[i]:qsl[i+1]] are the LAST q_len tokens of its
// seq_lens[i]-token context, attending causally (a decode is q_len = 1).
//
// The work is split into items (sequence, tile of 16 query rows, key segment); an item
// covers every KV head, so that it reads each cached token's keys and values of all heads
// (one contiguous run per block) in one pass. Within a head, the rows of a tile are
// (query token, query head) pairs, one per SIMD lane: a key read from the cache is used by
// up to 16 queries at once (the GQA group, and consecutive prefill tokens). Keys are taken
// in chunks of 32 with an online softmax in float32; nothing is gathered or converted as a
// whole. When a batch has too few items to keep every thread busy (one long decode), each
// item's keys are split into segments whose partial results are merged through their
// log-sum-exps.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace pdserve_cpu {
namespace {

constexpr int kLanes = 16;        // query rows per tile (one zmm of float32)
constexpr int kChunk = 32;        // keys per online-softmax step
constexpr float kNoMax = -1e30f;  // running max before any key: finite, so exp() stays 0
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------- geometry

struct Cache {
  const char* base;                      // kv_layer data
  int64_t s_block, s_kv, s_tok, s_head;  // element strides
  int64_t block_size;
};

struct Sequence {
  int64_t q_start;  // first query row in the batch
  int64_t q_len;
  int64_t seq_len;
  const int32_t* table;  // block table row
};

struct Batch {
  Cache cache;
  std::vector<Sequence> seqs;
  int64_t num_kv_heads, group, head_dim;
  const char* q_base;
  int64_t q_s_tok, q_s_head;  // element strides of query
  char* out_base;
  int64_t o_s_tok, o_s_head;
  float scale;
};

// The rows of one tile, the same for every KV head: row r is query token tok[r] of the
// sequence (absolute position qpos[r]) and query head (kv head * group + g[r]).
struct TileRows {
  int nrows;
  int64_t tok[kLanes];
  int64_t g[kLanes];
  int64_t qpos[kLanes];
  int64_t qpos_min, qpos_max;
};

TileRows make_rows(const Batch& b, const Sequence& s, int64_t row0) {
  TileRows rows;
  rows.nrows = static_cast<int>(std::min<int64_t>(kLanes, s.q_len * b.group - row0));
  const int64_t ctx = s.seq_len - s.q_len;
  for (int r = 0; r < kLanes; ++r) {
    const int64_t flat = row0 + std::min(r, rows.nrows - 1);
    rows.tok[r] = flat / b.group;
    rows.g[r] = flat % b.group;
    rows.qpos[r] = r < rows.nrows ? ctx + rows.tok[r] : -1;
  }
  rows.qpos_min = rows.qpos[0];
  rows.qpos_max = rows.qpos[rows.nrows - 1];
  return rows;
}

template <typename T>
inline const T* query_row(const Batch& b, const Sequence& s, const TileRows& rows, int r,
                          int64_t head) {
  return reinterpret_cast<const T*>(b.q_base) + (s.q_start + rows.tok[r]) * b.q_s_tok +
         (head * b.group + rows.g[r]) * b.q_s_head;
}

template <typename T>
inline T* out_row(const Batch& b, const Sequence& s, const TileRows& rows, int r, int64_t head) {
  return reinterpret_cast<T*>(b.out_base) + (s.q_start + rows.tok[r]) * b.o_s_tok +
         (head * b.group + rows.g[r]) * b.o_s_head;
}

// Pointers to the head-0 key row of tokens kc .. kc + n - 1 (one division per block).
template <typename T>
inline void token_rows(const Cache& c, const int32_t* table, int64_t kc, int n, const T** out) {
  int j = 0;
  int64_t t = kc;
  while (j < n) {
    int64_t off = t % c.block_size;
    const T* base = reinterpret_cast<const T*>(c.base) + table[t / c.block_size] * c.s_block;
    for (; j < n && off < c.block_size; ++j, ++off, ++t) out[j] = base + off * c.s_tok;
  }
}

#ifdef PDSERVE_AVX512
// One token's keys and values of every head (run_bytes each, the engine's layout keeps
// them contiguous) into L2.
template <typename T>
inline void prefetch_run(const T* key, int64_t s_kv, int64_t run_bytes) {
  const char* k = reinterpret_cast<const char*>(key);
  const char* v = reinterpret_cast<const char*>(key + s_kv);
  for (int64_t o = 0; o < run_bytes; o += 64) {
    _mm_prefetch(k + o, _MM_HINT_T1);
    _mm_prefetch(v + o, _MM_HINT_T1);
  }
}

// One head's D keys (or values) of a token into L2, a line at a time.
template <typename T, int D>
inline void prefetch_head(const T* row) {
  const char* p = reinterpret_cast<const char*>(row);
  const char* end = p + D * sizeof(T);
  for (const char* q = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63});
       q < end; q += 64)
    _mm_prefetch(q, _MM_HINT_T1);
}
#endif

// Softmax state of one KV head's rows in a tile.
struct HeadState {
  float* m;  // [kLanes]
  float* l;  // [kLanes]
  float* o;  // [kLanes][D], unnormalized
};

// ---------------------------------------------------------------------------- generic

// Portable path (any head_dim, no SIMD intrinsics): the same algorithm with plain loops.
template <typename T>
void item_generic(const Batch& b, const Sequence& s, const TileRows& rows, int64_t k_begin,
                  int64_t k_end, std::vector<HeadState>& st) {
  const int D = static_cast<int>(b.head_dim);
  const Cache& c = b.cache;
  std::vector<float> qf(static_cast<size_t>(kLanes) * D);
  float sc[kChunk][kLanes];
  const T* tok[kChunk];
  for (int64_t h = 0; h < b.num_kv_heads; ++h) {
    HeadState& hs = st[h];
    for (int r = 0; r < rows.nrows; ++r) {
      const T* q = query_row<T>(b, s, rows, r, h);
      for (int d = 0; d < D; ++d) qf[r * D + d] = static_cast<float>(q[d]);
    }
    for (int r = 0; r < kLanes; ++r) {
      hs.m[r] = kNoMax;
      hs.l[r] = 0.f;
    }
    std::fill(hs.o, hs.o + static_cast<size_t>(kLanes) * D, 0.f);
    for (int64_t kc = k_begin; kc < k_end; kc += kChunk) {
      const int n = static_cast<int>(std::min<int64_t>(kChunk, k_end - kc));
      token_rows<T>(c, s.table, kc, n, tok);
      float cmax[kLanes];
      for (int r = 0; r < kLanes; ++r) cmax[r] = kNoMax;
      for (int j = 0; j < n; ++j) {
        const T* k = tok[j] + h * c.s_head;
        for (int r = 0; r < rows.nrows; ++r) {
          float acc = 0.f;
          // Vectorised by the compiler (AVX2 where -march=native has it): the path that
          // machines without AVX-512 take.
#pragma omp simd reduction(+ : acc)
          for (int d = 0; d < D; ++d) acc += qf[r * D + d] * static_cast<float>(k[d]);
          const bool ok = kc + j <= rows.qpos[r];
          sc[j][r] = ok ? acc * b.scale : kNegInf;
          if (ok) cmax[r] = std::max(cmax[r], sc[j][r]);
        }
      }
      for (int r = 0; r < rows.nrows; ++r) {
        const float m_new = std::max(hs.m[r], cmax[r]);
        const float corr = std::exp(hs.m[r] - m_new);
        float* orow = hs.o + r * D;
        for (int d = 0; d < D; ++d) orow[d] *= corr;
        float sum = 0.f;
        for (int j = 0; j < n; ++j) {
          const float p = kc + j <= rows.qpos[r] ? std::exp(sc[j][r] - m_new) : 0.f;
          sum += p;
          if (p == 0.f) continue;
          const T* v = tok[j] + h * c.s_head + c.s_kv;
#pragma omp simd
          for (int d = 0; d < D; ++d) orow[d] += p * static_cast<float>(v[d]);
        }
        hs.l[r] = hs.l[r] * corr + sum;
        hs.m[r] = m_new;
      }
    }
  }
}

// ---------------------------------------------------------------------------- AVX-512

#ifdef PDSERVE_AVX512

// Scores of keys against a head's 16 query rows, sum_d q[lane][d] * k[d], as one zmm per
// key. Float path: qt[d] = the 16 lanes' dimension d (keys of other dtypes are converted
// to float32 first).
template <typename T, int D>
struct FloatDot {
  alignas(64) float qt[D][kLanes];

  void load(const Batch& b, const Sequence& s, const TileRows& rows, int64_t head) {
    std::memset(qt, 0, sizeof(qt));
    for (int r = 0; r < rows.nrows; ++r) {
      const T* q = query_row<T>(b, s, rows, r, head);
      for (int d = 0; d < D; ++d) qt[d][r] = static_cast<float>(q[d]);
    }
  }

  template <int N>
  inline void dot(const T* const* k, __m512* out) const {
    __m512 a[N];
    for (int j = 0; j < N; ++j) a[j] = _mm512_setzero_ps();
    if constexpr (std::is_same_v<T, float>) {
#pragma GCC unroll 4
      for (int d = 0; d < D; ++d) {
        const __m512 q = _mm512_load_ps(qt[d]);
#pragma GCC unroll 8
        for (int j = 0; j < N; ++j) a[j] = _mm512_fmadd_ps(q, _mm512_set1_ps(k[j][d]), a[j]);
      }
    } else {
      alignas(64) float kf[N][D];
      for (int j = 0; j < N; ++j)
        for (int d = 0; d < D; d += 16) _mm512_store_ps(kf[j] + d, load16(k[j] + d));
#pragma GCC unroll 4
      for (int d = 0; d < D; ++d) {
        const __m512 q = _mm512_load_ps(qt[d]);
#pragma GCC unroll 8
        for (int j = 0; j < N; ++j) a[j] = _mm512_fmadd_ps(q, _mm512_set1_ps(kf[j][d]), a[j]);
      }
    }
    for (int j = 0; j < N; ++j) out[j] = a[j];
  }
};

#ifdef __AVX512BF16__
// bfloat16 path: one vdpbf16ps multiplies and sums a pair of dimensions (the products are
// exact in float32); qp[i] = the 16 lanes' pair (2i, 2i + 1).
template <int D>
struct Bf16Dot {
  alignas(64) uint32_t qp[D / 2][kLanes];

  void load(const Batch& b, const Sequence& s, const TileRows& rows, int64_t head) {
    std::memset(qp, 0, sizeof(qp));
    for (int r = 0; r < rows.nrows; ++r) {
      uint32_t q[D / 2];
      std::memcpy(q, query_row<c10::BFloat16>(b, s, rows, r, head), sizeof(q));
      for (int i = 0; i < D / 2; ++i) qp[i][r] = q[i];
    }
  }

  static inline __m512bh pair(const c10::BFloat16* k, int i) {
    int32_t v;
    std::memcpy(&v, k + 2 * i, 4);
    return (__m512bh)_mm512_set1_epi32(v);
  }

  template <int N>
  inline void dot(const c10::BFloat16* const* k, __m512* out) const {
    __m512 a[N];
    for (int j = 0; j < N; ++j) a[j] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int i = 0; i < D / 2; ++i) {
      const __m512bh q = (__m512bh)_mm512_load_si512(qp[i]);
#pragma GCC unroll 8
      for (int j = 0; j < N; ++j) a[j] = _mm512_dpbf16_ps(a[j], q, pair(k[j], i));
    }
    for (int j = 0; j < N; ++j) out[j] = a[j];
  }
};
template <typename T, int D>
using Dot = std::conditional_t<std::is_same_v<T, c10::BFloat16>, Bf16Dot<D>, FloatDot<T, D>>;
#else
template <typename T, int D>
using Dot = FloatDot<T, D>;
#endif

template <typename T, int D>
struct Workspace {
  std::vector<Dot<T, D>> dots;  // one per KV head
};

template <typename T, int D>
void item_avx512(const Batch& b, const Sequence& s, const TileRows& rows, int64_t k_begin,
                 int64_t k_end, std::vector<HeadState>& st, Workspace<T, D>& ws) {
  const Cache& c = b.cache;
  const int64_t heads = b.num_kv_heads;
  if (static_cast<int64_t>(ws.dots.size()) < heads) ws.dots.resize(heads);
  for (int64_t h = 0; h < heads; ++h) {
    ws.dots[h].load(b, s, rows, h);
    for (int r = 0; r < kLanes; ++r) {
      st[h].m[r] = kNoMax;
      st[h].l[r] = 0.f;
    }
    for (int r = 0; r < rows.nrows; ++r)
      for (int d = 0; d < D; d += 16) _mm512_store_ps(st[h].o + r * D + d, _mm512_setzero_ps());
  }
  const __m512 vscale = _mm512_set1_ps(b.scale);
  alignas(64) int32_t qpos32[kLanes];
  for (int r = 0; r < kLanes; ++r) qpos32[r] = static_cast<int32_t>(rows.qpos[r]);
  const __m512i qpos = _mm512_load_si512(qpos32);
  // Bytes of one token's keys (all heads) in a block: one contiguous run.
  const int64_t run_bytes = ((heads - 1) * c.s_head + D) * static_cast<int64_t>(sizeof(T));

  alignas(64) float p[kChunk][kLanes];
  alignas(64) float vf[std::is_same_v<T, float> ? 1 : kChunk][D];
  const T* tok[kChunk];
  const T* tok_next[kChunk];
  __m512 sc[kChunk];
  __mmask16 valid[kChunk];

  if (k_begin < k_end)
    token_rows<T>(c, s.table, k_begin, static_cast<int>(std::min<int64_t>(kChunk, k_end - k_begin)),
                  tok_next);
  for (int64_t kc = k_begin; kc < k_end; kc += kChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, k_end - kc));
    std::copy(tok_next, tok_next + n, tok);
    const int n_next = static_cast<int>(std::clamp<int64_t>(k_end - kc - kChunk, 0, kChunk));
    if (n_next > 0) token_rows<T>(c, s.table, kc + kChunk, n_next, tok_next);
    // Which lanes each key counts for (only chunks reaching past a query need a mask).
    const bool masked = kc + n - 1 > rows.qpos_min;
    for (int j = 0; j < n; ++j)
      valid[j] = masked ? _mm512_cmp_epi32_mask(_mm512_set1_epi32(static_cast<int32_t>(kc + j)),
                                                qpos, _MM_CMPINT_LE)
                        : static_cast<__mmask16>(0xffff);

    for (int64_t h = 0; h < heads; ++h) {
      const Dot<T, D>& dot = ws.dots[h];
      HeadState& hs = st[h];
      const T* krow[kChunk];
      for (int j = 0; j < n; ++j) krow[j] = tok[j] + h * c.s_head;
      int j = 0;
      for (; j + 8 <= n; j += 8) {
        dot.template dot<8>(krow + j, sc + j);
        // The next chunk's tokens, a few at a time along the first head's pass (spread
        // over every head's pass as in the decode path, prefill measured the same).
        if (h == 0)
          for (int p = j; p < std::min(j + 8, n_next); ++p)
            prefetch_run(tok_next[p], c.s_kv, run_bytes);
      }
      for (; j + 4 <= n; j += 4) dot.template dot<4>(krow + j, sc + j);
      for (; j < n; ++j) dot.template dot<1>(krow + j, sc + j);
      if (h == 0)
        for (int p = n - n % 8; p < n_next; ++p) prefetch_run(tok_next[p], c.s_kv, run_bytes);

      __m512 cmax = _mm512_set1_ps(kNoMax);
      for (j = 0; j < n; ++j) {
        sc[j] = _mm512_mul_ps(sc[j], vscale);
        cmax = _mm512_mask_max_ps(cmax, valid[j], cmax, sc[j]);
      }
      const __m512 m_old = _mm512_load_ps(hs.m);
      const __m512 m_new = _mm512_max_ps(m_old, cmax);
      const __m512 corr = exp512(_mm512_sub_ps(m_old, m_new));
      __m512 sum = _mm512_setzero_ps();
      for (j = 0; j < n; ++j) {
        const __m512 e = _mm512_maskz_mov_ps(valid[j], exp512(_mm512_sub_ps(sc[j], m_new)));
        sum = _mm512_add_ps(sum, e);
        _mm512_store_ps(p[j], e);
      }
      _mm512_store_ps(hs.l, _mm512_fmadd_ps(_mm512_load_ps(hs.l), corr, sum));
      _mm512_store_ps(hs.m, m_new);

      // The chunk's values as float32 rows (read straight from the cache when float32).
      const float* vptr[kChunk];
      for (j = 0; j < n; ++j) {
        const T* v = tok[j] + h * c.s_head + c.s_kv;
        if constexpr (std::is_same_v<T, float>) {
          vptr[j] = v;
        } else {
          for (int d = 0; d < D; d += 16) _mm512_store_ps(vf[j] + d, load16(v + d));
          vptr[j] = vf[j];
        }
      }
      alignas(64) float corr_a[kLanes];
      _mm512_store_ps(corr_a, corr);
      for (int r = 0; r < rows.nrows; ++r) {
        __m512 acc[D / 16];
        const __m512 cr = _mm512_set1_ps(corr_a[r]);
        float* orow = hs.o + r * D;
#pragma GCC unroll 16
        for (int q = 0; q < D / 16; ++q) acc[q] = _mm512_mul_ps(_mm512_load_ps(orow + 16 * q), cr);
        for (j = 0; j < n; ++j) {
          const __m512 pj = _mm512_set1_ps(p[j][r]);
#pragma GCC unroll 16
          for (int q = 0; q < D / 16; ++q)
            acc[q] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vptr[j] + 16 * q), acc[q]);
        }
#pragma GCC unroll 16
        for (int q = 0; q < D / 16; ++q) _mm512_store_ps(orow + 16 * q, acc[q]);
      }
    }
  }
}

// ---------------------------------------------------------------------------- decode

// r[i] = sum of v[i]'s 16 lanes (a transpose-and-add tree: 45 operations for 16 sums).
inline __m512 hsum16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(3, 1, 3, 1)));
}

constexpr int kMaxDecodeGroup = 8;  // query heads per KV head the decode path takes

// One KV head's queries of a decode item, kept in registers' shape: q[g][c] holds
// dimensions 16c .. 16c + 15 of query head g (float32), or 32c .. 32c + 31 (bfloat16 pairs).
template <typename T, int D>
struct DecodeQueries {
#ifdef __AVX512BF16__
  static constexpr bool kBf16Dot = std::is_same_v<T, c10::BFloat16>;
#else
  static constexpr bool kBf16Dot = false;
#endif
  static constexpr int kVecs = kBf16Dot ? D / 32 : D / 16;
  __m512 q[kMaxDecodeGroup][kVecs > 0 ? kVecs : 1];

  void load(const T* const* rows, int group) {
    for (int g = 0; g < group; ++g) {
      if constexpr (kBf16Dot) {
        for (int c = 0; c < kVecs; ++c)
          q[g][c] = _mm512_castsi512_ps(_mm512_loadu_si512(rows[g] + 32 * c));
      } else {
        for (int c = 0; c < kVecs; ++c) q[g][c] = load16(rows[g] + 16 * c);
      }
    }
  }

  // partial[g] = lane-wise partial products of query g with key row k (sum of the lanes
  // is the score).
  inline void partials(const T* k, int group, __m512* partial /* [group] */) const {
    __m512 kv[kVecs > 0 ? kVecs : 1];
    if constexpr (kBf16Dot) {
#ifdef __AVX512BF16__
      for (int c = 0; c < kVecs; ++c) kv[c] = _mm512_castsi512_ps(_mm512_loadu_si512(k + 32 * c));
      for (int g = 0; g < group; ++g) {
        __m512 a = _mm512_setzero_ps();
        for (int c = 0; c < kVecs; ++c)
          a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_castps_si512(q[g][c]),
                               (__m512bh)_mm512_castps_si512(kv[c]));
        partial[g] = a;
      }
#endif
    } else {
      for (int c = 0; c < kVecs; ++c) kv[c] = load16(k + 16 * c);
      for (int g = 0; g < group; ++g) {
        __m512 a = _mm512_mul_ps(q[g][0], kv[0]);
        for (int c = 1; c < kVecs; ++c) a = _mm512_fmadd_ps(q[g][c], kv[c], a);
        partial[g] = a;
      }
    }
  }
};

// A decode item (one query token per sequence): per KV head, the scores of a chunk are
// computed with the keys' dimensions in lanes and reduced to one lane per key, so that a
// key costs about (2 + 3 * group) vector operations instead of head_dim / 2.
template <typename T, int D>
void item_decode_avx512(const Batch& b, const Sequence& s, const TileRows& rows,
                        int64_t k_begin, int64_t k_end, std::vector<HeadState>& st) {
  const Cache& c = b.cache;
  const int64_t heads = b.num_kv_heads;
  const int group = rows.nrows;  // == b.group
  // Rows of O kept in registers per pass over a chunk's values.
  constexpr int kRowsPerPass = std::max(1, std::min(kMaxDecodeGroup, 16 / (D / 16)));
  const T* tok[kChunk];
  const T* tok_next[kChunk];
  alignas(64) float sc[kMaxDecodeGroup][kChunk];
  __m512 partial[16][kMaxDecodeGroup];

  std::vector<DecodeQueries<T, D>> qs(heads);
  for (int64_t h = 0; h < heads; ++h) {
    const T* qrows[kMaxDecodeGroup];
    for (int g = 0; g < group; ++g) qrows[g] = query_row<T>(b, s, rows, g, h);
    qs[h].load(qrows, group);
    for (int g = 0; g < kLanes; ++g) {
      st[h].m[g] = kNoMax;
      st[h].l[g] = 0.f;
    }
    for (int g = 0; g < group; ++g)
      for (int d = 0; d < D; d += 16) _mm512_store_ps(st[h].o + g * D + d, _mm512_setzero_ps());
  }
  if (k_begin < k_end)
    token_rows<T>(c, s.table, k_begin, static_cast<int>(std::min<int64_t>(kChunk, k_end - k_begin)),
                  tok_next);
  for (int64_t kc = k_begin; kc < k_end; kc += kChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, k_end - kc));
    std::copy(tok_next, tok_next + n, tok);
    const int n_next = static_cast<int>(std::clamp<int64_t>(k_end - kc - kChunk, 0, kChunk));
    if (n_next > 0) token_rows<T>(c, s.table, kc + kChunk, n_next, tok_next);
    for (int64_t h = 0; h < heads; ++h) {
      const DecodeQueries<T, D>& q = qs[h];
      HeadState& hs = st[h];
      // Scores, 16 keys at a time. Each key row read here (and each value row read
      // below) requests the same row of the next chunk's token into L2: the requests are
      // spread evenly over the whole chunk's work, one or two lines at a time, within what
      // the core keeps in flight. (Requesting a token's rows of every head at once along
      // the first head's pass, as bursts a third of the chunk long, was 8-16% slower from
      // memory on the shapes of SmolLM2 and of 'small': bench.attention_kernel.)
      for (int j0 = 0; j0 < n; j0 += 16) {
        const int m = std::min(16, n - j0);
        for (int j = 0; j < m; ++j) {
          q.partials(tok[j0 + j] + h * c.s_head, group, partial[j]);
          if (j0 + j < n_next) prefetch_head<T, D>(tok_next[j0 + j] + h * c.s_head);
        }
        for (int j = m; j < 16; ++j)
          for (int g = 0; g < group; ++g) partial[j][g] = _mm512_setzero_ps();
        for (int g = 0; g < group; ++g) {
          __m512 col[16];
          for (int j = 0; j < 16; ++j) col[j] = partial[j][g];
          _mm512_store_ps(sc[g] + j0, _mm512_mul_ps(hsum16(col), _mm512_set1_ps(b.scale)));
        }
      }
      // Online softmax per query head (the keys fill the lanes).
      alignas(64) float corr[kMaxDecodeGroup];
      for (int g = 0; g < group; ++g) {
        float cmax = kNoMax;
        for (int j0 = 0; j0 < n; j0 += 16) {
          const __mmask16 k = static_cast<__mmask16>((n - j0 >= 16) ? 0xffff : ((1u << (n - j0)) - 1));
          cmax = std::max(cmax, _mm512_mask_reduce_max_ps(k, _mm512_load_ps(sc[g] + j0)));
        }
        const float m_new = std::max(hs.m[g], cmax);
        corr[g] = std::exp(hs.m[g] - m_new);
        __m512 sum = _mm512_setzero_ps();
        const __m512 vm = _mm512_set1_ps(m_new);
        for (int j0 = 0; j0 < n; j0 += 16) {
          const __mmask16 k = static_cast<__mmask16>((n - j0 >= 16) ? 0xffff : ((1u << (n - j0)) - 1));
          const __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_load_ps(sc[g] + j0), vm)));
          _mm512_store_ps(sc[g] + j0, e);
          sum = _mm512_add_ps(sum, e);
        }
        hs.l[g] = hs.l[g] * corr[g] + _mm512_reduce_add_ps(sum);
        hs.m[g] = m_new;
      }
      // Values: each row converted once per pass, accumulated into up to kRowsPerPass heads.
      for (int g0 = 0; g0 < group; g0 += kRowsPerPass) {
        const int gn = std::min(kRowsPerPass, group - g0);
        __m512 acc[kRowsPerPass][D / 16];
        for (int g = 0; g < kRowsPerPass; ++g) {
          if (g >= gn) break;
          const __m512 cr = _mm512_set1_ps(corr[g0 + g]);
          for (int v = 0; v < D / 16; ++v)
            acc[g][v] = _mm512_mul_ps(_mm512_load_ps(hs.o + (g0 + g) * D + 16 * v), cr);
        }
        for (int j = 0; j < n; ++j) {
          const T* vrow = tok[j] + h * c.s_head + c.s_kv;
          if (g0 == 0 && j < n_next) prefetch_head<T, D>(tok_next[j] + h * c.s_head + c.s_kv);
          __m512 vv[D / 16];
          for (int v = 0; v < D / 16; ++v) vv[v] = load16(vrow + 16 * v);
          for (int g = 0; g < kRowsPerPass; ++g) {
            if (g >= gn) break;
            const __m512 pj = _mm512_set1_ps(sc[g0 + g][j]);
            for (int v = 0; v < D / 16; ++v) acc[g][v] = _mm512_fmadd_ps(pj, vv[v], acc[g][v]);
          }
        }
        for (int g = 0; g < kRowsPerPass; ++g) {
          if (g >= gn) break;
          for (int v = 0; v < D / 16; ++v)
            _mm512_store_ps(hs.o + (g0 + g) * D + 16 * v, acc[g][v]);
        }
      }
    }
  }
}
#endif  // PDSERVE_AVX512

// ---------------------------------------------------------------------------- driver

template <typename T>
void store_row(T* dst, const float* src, float inv, int D) {
#ifdef PDSERVE_AVX512
  if (D % 16 == 0) {
    const __m512 vinv = _mm512_set1_ps(inv);
    for (int d = 0; d < D; d += 16) store16(dst + d, _mm512_mul_ps(_mm512_loadu_ps(src + d), vinv));
    return;
  }
#endif
  for (int d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d] * inv);
}

struct Item {
  int32_t seq;
  int32_t row0;   // first flattened row (token * group + g) of the tile
  int32_t split;  // key segment index
  int64_t keys;   // keys this item attends (for scheduling)
};

template <typename T, int D>
void run_items(const Batch& b, const std::vector<Item>& items, const std::vector<int32_t>& order,
               int64_t splits, int64_t num_threads, float* part_o, float* part_lse) {
  const int64_t heads = b.num_kv_heads;
  const int64_t Dr = b.head_dim;  // == D, or the runtime head_dim when D == 0 (generic)
  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  auto worker = [&]() {
    // m, l: kLanes each; o: kLanes * head_dim; one block per KV head, 64-byte aligned.
    const int64_t per_head = ceil_div(2 * kLanes + kLanes * Dr, 16) * 16;
    std::unique_ptr<float[], void (*)(float*)> mem(
        static_cast<float*>(std::aligned_alloc(64, sizeof(float) * per_head * heads)),
        [](float* f) { std::free(f); });
    std::vector<HeadState> st(heads);
    for (int64_t h = 0; h < heads; ++h) {
      float* base = mem.get() + h * per_head;
      st[h] = {base, base + kLanes, base + 2 * kLanes};
    }
#ifdef PDSERVE_AVX512
    Workspace<T, (D > 0 ? D : 16)> ws;
#endif
    for (int64_t k = next.fetch_add(1); k < n_items; k = next.fetch_add(1)) {
      const int32_t idx = order[k];
      const Item& it = items[idx];
      const Sequence& s = b.seqs[it.seq];
      const TileRows rows = make_rows(b, s, it.row0);
      const int64_t kmax = rows.qpos_max + 1;
      int64_t k_begin = 0, k_end = kmax;
      if (splits > 1) {
        const int64_t seg = ceil_div(ceil_div(kmax, splits), kChunk) * kChunk;
        k_begin = std::min(kmax, it.split * seg);
        k_end = std::min(kmax, k_begin + seg);
      }
#ifdef PDSERVE_AVX512
      if constexpr (D > 0) {
        if (s.q_len == 1 && b.group <= kMaxDecodeGroup && D >= 32) {
          item_decode_avx512<T, D>(b, s, rows, k_begin, k_end, st);
        } else {
          item_avx512<T, D>(b, s, rows, k_begin, k_end, st, ws);
        }
      } else {
        item_generic<T>(b, s, rows, k_begin, k_end, st);
      }
#else
      item_generic<T>(b, s, rows, k_begin, k_end, st);
#endif
      for (int64_t h = 0; h < heads; ++h) {
        const HeadState& hs = st[h];
        for (int r = 0; r < rows.nrows; ++r) {
          if (splits > 1) {
            const size_t base = (static_cast<size_t>(idx) * heads + h) * kLanes + r;
            const float inv = hs.l[r] > 0.f ? 1.f / hs.l[r] : 0.f;
            for (int64_t d = 0; d < Dr; ++d) part_o[base * Dr + d] = hs.o[r * Dr + d] * inv;
            part_lse[base] = hs.l[r] > 0.f ? hs.m[r] + std::log(hs.l[r]) : kNegInf;
          } else {
            store_row<T>(out_row<T>(b, s, rows, r, h), hs.o + r * Dr, 1.f / hs.l[r],
                         static_cast<int>(Dr));
          }
        }
      }
    }
  };
  if (num_threads <= 1 || n_items <= 1) {
    worker();
  } else {
    at::parallel_for(0, num_threads, 1, [&](int64_t, int64_t) { worker(); });
  }
}

template <typename T>
void run_batch(const Batch& b, int64_t num_threads) {
  const int64_t G = b.group;
  std::vector<Item> items;
  int64_t max_keys = 0;
  for (int32_t i = 0; i < static_cast<int32_t>(b.seqs.size()); ++i) {
    const Sequence& s = b.seqs[i];
    const int64_t ctx = s.seq_len - s.q_len;
    for (int64_t row0 = 0; row0 < s.q_len * G; row0 += kLanes) {
      const int64_t last_tok = (std::min(s.q_len * G, row0 + kLanes) - 1) / G;
      const int64_t keys = ctx + last_tok + 1;
      max_keys = std::max(max_keys, keys);
      items.push_back({i, static_cast<int32_t>(row0), 0, keys});
    }
  }
  // Too few items for the threads and long contexts: split each item's keys.
  int64_t splits = 1;
  if (static_cast<int64_t>(items.size()) < 2 * num_threads && max_keys > 4 * kChunk) {
    splits = std::min(ceil_div(2 * num_threads, static_cast<int64_t>(items.size())),
                      ceil_div(max_keys, 4 * kChunk));
  }
  if (splits > 1) {
    std::vector<Item> split_items;
    split_items.reserve(items.size() * splits);
    for (const Item& it : items)
      for (int32_t sp = 0; sp < splits; ++sp)
        split_items.push_back({it.seq, it.row0, sp, ceil_div(it.keys, splits)});
    items.swap(split_items);
  }
  // Longest first, taken one at a time: ragged batches stay balanced.
  std::vector<int32_t> order(items.size());
  for (size_t i = 0; i < items.size(); ++i) order[i] = static_cast<int32_t>(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t c) { return items[a].keys > items[c].keys; });

  const int64_t D = b.head_dim;
  const int64_t heads = b.num_kv_heads;
  std::vector<float> part_o(splits > 1 ? items.size() * heads * kLanes * D : 0);
  std::vector<float> part_lse(splits > 1 ? items.size() * heads * kLanes : 0);
  auto run = [&](auto dim) {
    run_items<T, decltype(dim)::value>(b, items, order, splits, num_threads, part_o.data(),
                                       part_lse.data());
  };
  switch (D) {
    case 16: run(std::integral_constant<int, 16>{}); break;
    case 32: run(std::integral_constant<int, 32>{}); break;
    case 64: run(std::integral_constant<int, 64>{}); break;
    case 128: run(std::integral_constant<int, 128>{}); break;
    case 256: run(std::integral_constant<int, 256>{}); break;
    default: run(std::integral_constant<int, 0>{}); break;
  }
  if (splits == 1) return;

  // Merge the segments of each (sequence, tile): a tile's items are consecutive.
  const int64_t tiles = static_cast<int64_t>(items.size()) / splits;
  at::parallel_for(0, tiles * heads, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> acc(D);
    for (int64_t th = lo; th < hi; ++th) {
      const int64_t t = th / heads, h = th % heads;
      const Item& it = items[t * splits];
      const Sequence& s = b.seqs[it.seq];
      const TileRows rows = make_rows(b, s, it.row0);
      for (int r = 0; r < rows.nrows; ++r) {
        auto at = [&](int64_t sp) {
          return (static_cast<size_t>(t * splits + sp) * heads + h) * kLanes + r;
        };
        float top = kNegInf;
        for (int64_t sp = 0; sp < splits; ++sp) top = std::max(top, part_lse[at(sp)]);
        std::fill(acc.begin(), acc.end(), 0.f);
        float total = 0.f;
        for (int64_t sp = 0; sp < splits; ++sp) {
          if (part_lse[at(sp)] == kNegInf) continue;
          const float w = std::exp(part_lse[at(sp)] - top);
          total += w;
          const float* src = part_o.data() + at(sp) * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += w * src[d];
        }
        store_row<T>(out_row<T>(b, s, rows, r, h), acc.data(), 1.f / total,
                     static_cast<int>(D));
      }
    }
  });
}

// ---------------------------------------------------------------------------- ops

void check_kv(const at::Tensor& kv) {
  TORCH_CHECK(kv.device().is_cpu(), "kv_layer must be on the CPU");
  TORCH_CHECK(kv.dim() == 5 && kv.size(1) == 2,
              "kv_layer must be [num_blocks, 2, block_size, num_kv_heads, head_dim], got ",
              kv.sizes());
  TORCH_CHECK(kv.stride(4) == 1, "kv_layer's head_dim must be contiguous");
}

void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv,
                     const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                     const at::Tensor& block_tables, double scale) {
  check_kv(kv);
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1,
              "query must be [num_tokens, num_heads, head_dim] with a contiguous head_dim");
  TORCH_CHECK(out.sizes() == query.sizes() && out.stride(2) == 1 &&
                  out.scalar_type() == query.scalar_type(),
              "out must match query's shape and dtype");
  TORCH_CHECK(query.scalar_type() == kv.scalar_type(), "query and kv_layer dtypes differ: ",
              query.scalar_type(), " vs ", kv.scalar_type());
  TORCH_CHECK(query.size(2) == kv.size(4), "head_dim of query and kv_layer differ");
  const int64_t hq = query.size(1), hkv = kv.size(3);
  TORCH_CHECK(hq % hkv == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(query_start_loc.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  block_tables.scalar_type() == at::kInt,
              "query_start_loc, seq_lens and block_tables must be int32");
  const at::Tensor qsl = query_start_loc.contiguous();
  const at::Tensor lens = seq_lens.contiguous();
  const at::Tensor tables = block_tables.contiguous();
  const int64_t num_seqs = lens.size(0);
  TORCH_CHECK(qsl.size(0) == num_seqs + 1, "query_start_loc needs num_seqs + 1 entries");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) >= num_seqs, "block_tables too short");

  Batch b;
  b.cache = {static_cast<const char*>(kv.data_ptr()), kv.stride(0), kv.stride(1), kv.stride(2),
             kv.stride(3), kv.size(2)};
  b.num_kv_heads = hkv;
  b.group = hq / hkv;
  b.head_dim = query.size(2);
  b.q_base = static_cast<const char*>(query.data_ptr());
  b.q_s_tok = query.stride(0);
  b.q_s_head = query.stride(1);
  b.out_base = static_cast<char*>(out.data_ptr());
  b.o_s_tok = out.stride(0);
  b.o_s_head = out.stride(1);
  b.scale = static_cast<float>(scale);
  const int32_t* q = qsl.data_ptr<int32_t>();
  const int32_t* n = lens.data_ptr<int32_t>();
  const int64_t width = tables.size(1);
  const int64_t num_blocks = kv.size(0);
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t q_len = q[i + 1] - q[i];
    if (q_len == 0) continue;
    TORCH_CHECK(q[i] >= 0 && q[i + 1] <= query.size(0), "sequence ", i,
                ": its queries lie outside the query tensor");
    TORCH_CHECK(q_len <= n[i] && ceil_div(n[i], kv.size(2)) <= width, "sequence ", i, ": ",
                q_len, " queries over ", n[i], " tokens do not fit its block table of ", width,
                " blocks");
    const int32_t* row = tables.data_ptr<int32_t>() + i * width;
    for (int64_t j = 0; j < ceil_div(n[i], kv.size(2)); ++j)
      TORCH_CHECK(row[j] >= 0 && row[j] < num_blocks, "sequence ", i, ": block ", row[j],
                  " is outside the cache of ", num_blocks, " blocks");
    b.seqs.push_back({q[i], q_len, n[i], row});
  }
  at::internal::lazy_init_num_threads();  // this thread's pool size, as torch's ops see it
  const int64_t threads = at::get_num_threads();
  switch (query.scalar_type()) {
    case at::kFloat: run_batch<float>(b, threads); break;
    case at::kBFloat16: run_batch<c10::BFloat16>(b, threads); break;
    case at::kHalf: run_batch<c10::Half>(b, threads); break;
    default: TORCH_CHECK(false, "unsupported dtype ", query.scalar_type());
  }
}

// kv[block, 0, offset] = key[i]; kv[block, 1, offset] = value[i].
void write_kv(at::Tensor& kv, const at::Tensor& key, const at::Tensor& value,
              const at::Tensor& slot_block_ids, const at::Tensor& slot_offsets) {
  check_kv(kv);
  TORCH_CHECK(key.scalar_type() == kv.scalar_type() && value.scalar_type() == kv.scalar_type(),
              "key/value dtype must match the cache's");
  TORCH_CHECK(key.dim() == 3 && value.dim() == 3 && key.stride(2) == 1 && value.stride(2) == 1,
              "key and value must be [num_tokens, num_kv_heads, head_dim], head_dim contiguous");
  TORCH_CHECK(key.size(1) == kv.size(3) && key.size(2) == kv.size(4) &&
                  value.sizes() == key.sizes(),
              "key/value shape does not match the cache");
  const at::Tensor blocks = slot_block_ids.to(at::kLong).contiguous();
  const at::Tensor offsets = slot_offsets.to(at::kLong).contiguous();
  const int64_t n = key.size(0), heads = key.size(1);
  TORCH_CHECK(blocks.numel() == n && offsets.numel() == n, "one slot per token");
  const int64_t elem = key.element_size();
  const int64_t row_bytes = key.size(2) * elem;
  const char* kb = static_cast<const char*>(key.data_ptr());
  const char* vb = static_cast<const char*>(value.data_ptr());
  char* cb = static_cast<char*>(kv.data_ptr());
  const int64_t* bl = blocks.data_ptr<int64_t>();
  const int64_t* of = offsets.data_ptr<int64_t>();
  const int64_t num_blocks = kv.size(0), block_size = kv.size(2);
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(bl[i] >= 0 && bl[i] < num_blocks && of[i] >= 0 && of[i] < block_size, "slot ",
                i, " (block ", bl[i], ", offset ", of[i], ") is outside the cache");
  const int64_t s_block = kv.stride(0), s_kv = kv.stride(1), s_tok = kv.stride(2),
                s_head = kv.stride(3);
  at::parallel_for(0, n, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t slot = bl[i] * s_block + of[i] * s_tok;
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t dst = (slot + h * s_head) * elem;
        std::memcpy(cb + dst, kb + (i * key.stride(0) + h * key.stride(1)) * elem, row_bytes);
        std::memcpy(cb + dst + s_kv * elem,
                    vb + (i * value.stride(0) + h * value.stride(1)) * elem, row_bytes);
      }
    }
  });
}

// 0: portable loops, 1: AVX-512, 2: AVX-512 with bfloat16 dot products.
int64_t simd_level() {
#if defined(PDSERVE_AVX512) && defined(__AVX512BF16__)
  return 2;
#elif defined(PDSERVE_AVX512)
  return 1;
#else
  return 0;
#endif
}

}  // namespace

TORCH_LIBRARY(pdserve_cpu, m) {
  m.def("paged_attention(Tensor(a!) out, Tensor query, Tensor kv_layer, Tensor query_start_loc, "
        "Tensor seq_lens, Tensor block_tables, float scale) -> ()");
  m.def("write_kv(Tensor(a!) kv_layer, Tensor key, Tensor value, Tensor slot_block_ids, "
        "Tensor slot_offsets) -> ()");
  m.def("simd_level() -> int", &simd_level);
}

TORCH_LIBRARY_IMPL(pdserve_cpu, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("write_kv", &write_kv);
}

}  // namespace pdserve_cpu
