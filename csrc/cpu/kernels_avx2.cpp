// AVX2 + FMA (+ F16C for fp16 weights) versions of the routed-FFN dot and row-sum kernels
// (see kernels.h).
//
// Every function here carries __attribute__((target(...))) instead of the whole build using
// -mavx2/-march=native, so the same binary runs on any x86-64 CPU: routed_ffn.cpp calls these
// only when cpu_has_avx2() says the CPU supports them. Nothing from torch or the C++ standard
// library is instantiated in this file (see kernels.h for why).
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define PP_TARGET __attribute__((target("avx2,fma,f16c")))
#define PP_INLINE PP_TARGET inline __attribute__((always_inline))

namespace prunepath {
namespace cpu {
namespace {

struct F32 {
  using T = float;
  PP_INLINE static __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
  PP_INLINE static float get(const T* p) { return *p; }
};

struct BF16 {
  using T = uint16_t;
  // bf16 is the top half of an fp32: widen to 32 bits and shift left by 16.
  PP_INLINE static __m256 load8(const T* p) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  }
  PP_INLINE static float get(const T* p) { return bf16_bits_to_float(*p); }
};

struct F16 {
  using T = uint16_t;
  PP_INLINE static __m256 load8(const T* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  PP_INLINE static float get(const T* p) { return _cvtsh_ss(*p); }
};

PP_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// acc[r][k][u] += w[r][j..] * x[k][j..] over j < n: R weight rows (R concurrent memory
// streams) times NT tokens, U independent vectors per pair to hide the FMA latency; the last
// n % 8 elements go to the scalar tail[r][k].
template <typename W, int R, int NT, int U>
PP_INLINE void accumulate(const typename W::T* const (&w)[R], const float* const (&x)[NT],
                          int64_t n, __m256 (&acc)[R][NT][U], float (&tail)[R][NT]) {
  int64_t j = 0;
  for (; j + 8 * U <= n; j += 8 * U) {
    for (int u = 0; u < U; ++u) {
      __m256 xv[NT];
      for (int k = 0; k < NT; ++k) xv[k] = _mm256_loadu_ps(x[k] + j + 8 * u);
      for (int r = 0; r < R; ++r) {
        const __m256 wv = W::load8(w[r] + j + 8 * u);
        for (int k = 0; k < NT; ++k) acc[r][k][u] = _mm256_fmadd_ps(wv, xv[k], acc[r][k][u]);
      }
    }
  }
  for (; j + 8 <= n; j += 8) {
    __m256 xv[NT];
    for (int k = 0; k < NT; ++k) xv[k] = _mm256_loadu_ps(x[k] + j);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = W::load8(w[r] + j);
      for (int k = 0; k < NT; ++k) acc[r][k][0] = _mm256_fmadd_ps(wv, xv[k], acc[r][k][0]);
    }
  }
  for (; j < n; ++j)
    for (int r = 0; r < R; ++r) {
      const float wj = W::get(w[r] + j);
      for (int k = 0; k < NT; ++k) tail[r][k] += wj * x[k][j];
    }
}

// Rows [r0, r0 + R) against tokens [k0, k0 + NT), summed over all segments.
template <typename W, int R, int NT>
PP_INLINE void tile(const SegsDot& a, const typename W::T* w, int64_t r0, int64_t k0) {
  constexpr int U = R * NT <= 4 ? 2 : 1;
  __m256 acc[R][NT][U];
  float tail[R][NT];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < NT; ++k) {
      tail[r][k] = 0.f;
      for (int u = 0; u < U; ++u) acc[r][k][u] = _mm256_setzero_ps();
    }
  for (int64_t s = 0; s < a.nseg; ++s) {
    const typename W::T* ws[R];
    const float* xs[NT];
    for (int r = 0; r < R; ++r) ws[r] = w + (r0 + r) * a.ldw + a.seg_col[s];
    for (int k = 0; k < NT; ++k) xs[k] = a.h[k0 + k] + a.seg_off[s];
    accumulate<W, R, NT, U>(ws, xs, a.seg_len[s], acc, tail);
  }
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < NT; ++k) {
      __m256 v = acc[r][k][0];
      for (int u = 1; u < U; ++u) v = _mm256_add_ps(v, acc[r][k][u]);
      a.out[(k0 + k) * a.ldo + r0 + r] = hsum(v) + tail[r][k];
    }
}

// Rows [r0, r0 + R) against every token, in tiles of up to 4 tokens (one token: R rows).
template <typename W, int R>
PP_INLINE void row_block(const SegsDot& a, const typename W::T* w, int64_t r0) {
  int64_t k0 = 0;
  if constexpr (R <= 2) {
    for (; k0 + 4 <= a.nt; k0 += 4) tile<W, R, 4>(a, w, r0, k0);
    switch (a.nt - k0) {
      case 3: tile<W, R, 3>(a, w, r0, k0); return;
      case 2: tile<W, R, 2>(a, w, r0, k0); return;
      default: break;
    }
  }
  for (; k0 < a.nt; ++k0) tile<W, R, 1>(a, w, r0, k0);
}

// Whole contiguous rows (one segment spanning each row: a linear layer's slab, an expert's
// gate/up block) are read one after another, in address order: the slab is one front-to-back
// memory stream, the pattern hardware prefetchers follow best. Interleaving 8 such rows (576
// floats each) starts 8 short streams per block: 11-14% slower in fp32, up to 2x in bf16, on a
// 2-core Zen 4 (BENCHMARKS.md, measured 2026-12-05). Row pieces a stride apart (W_down's runs of expert
// columns, nn.Linear layout) are read several rows at a time: 8 for one token, 2 for more.
template <typename W>
PP_TARGET void segs_dot(const SegsDot& a);

// Row r of a.w and of a.w2 together for one token (whole rows): out[r], out2[r].
template <typename W>
PP_INLINE void pair_rows(const SegsDot& a) {
  const auto* w = static_cast<const typename W::T*>(a.w);
  const auto* w2 = static_cast<const typename W::T*>(a.w2);
  const float* const xs[1] = {a.h[0]};
  for (int64_t r = 0; r < a.nrows; ++r) {
    const typename W::T* const ws[2] = {w + r * a.ldw, w2 + r * a.ldw};
    __m256 acc[2][1][2];
    float tail[2][1] = {{0.f}, {0.f}};
    for (int i = 0; i < 2; ++i) acc[i][0][0] = acc[i][0][1] = _mm256_setzero_ps();
    accumulate<W, 2, 1, 2>(ws, xs, a.ldw, acc, tail);
    a.out[r] = hsum(_mm256_add_ps(acc[0][0][0], acc[0][0][1])) + tail[0][0];
    a.out2[r] = hsum(_mm256_add_ps(acc[1][0][0], acc[1][0][1])) + tail[1][0];
  }
}

template <typename W>
PP_TARGET void pair_blocks(const PairBlocks& a) {
  using T = typename W::T;
  const int64_t half = (a.nblk + 1) / 2;
  const float* const xs[1] = {a.x};
  for (int64_t b = 0; b < half; ++b) {
    const int64_t b2 = b + half;
    const T* wu = static_cast<const T*>(a.w[b]);
    const T* wg = static_cast<const T*>(a.w2[b]);
    if (b2 < a.nblk) {
      const T* wu2 = static_cast<const T*>(a.w[b2]);
      const T* wg2 = static_cast<const T*>(a.w2[b2]);
      for (int64_t r = 0; r < a.nrows; ++r) {
        const int64_t o = r * a.d;
        const T* const ws[4] = {wu + o, wg + o, wu2 + o, wg2 + o};
        __m256 acc[4][1][2];
        float tail[4][1] = {{0.f}, {0.f}, {0.f}, {0.f}};
        for (int i = 0; i < 4; ++i) acc[i][0][0] = acc[i][0][1] = _mm256_setzero_ps();
        accumulate<W, 4, 1, 2>(ws, xs, a.d, acc, tail);
        float v[4];
        for (int i = 0; i < 4; ++i)
          v[i] = hsum(_mm256_add_ps(acc[i][0][0], acc[i][0][1])) + tail[i][0];
        a.out[b * a.nrows + r] = v[0];
        a.out2[b * a.nrows + r] = v[1];
        a.out[b2 * a.nrows + r] = v[2];
        a.out2[b2 * a.nrows + r] = v[3];
      }
    } else {
      const int64_t zero = 0;
      const SegsDot one{a.wtype, wu, a.d, a.nrows, &zero, &a.d, &zero, 1, xs, 1,
                        a.out + b * a.nrows, a.nrows, wg, a.out2 + b * a.nrows};
      pair_rows<W>(one);
    }
  }
}

template <typename W>
PP_TARGET void segs_dot(const SegsDot& a) {
  const auto* w = static_cast<const typename W::T*>(a.w);
  int64_t r = 0;
  const bool whole_rows = a.nseg == 1 && a.seg_col[0] == 0 && a.seg_len[0] == a.ldw;
  if (a.w2 != nullptr) {
    if (whole_rows && a.nt == 1) return pair_rows<W>(a);
    SegsDot first, second;
    split_pair(a, first, second);
    segs_dot<W>(first);
    return segs_dot<W>(second);
  }
  if (!whole_rows && a.nt == 1) {
    for (; r + 8 <= a.nrows; r += 8) row_block<W, 8>(a, w, r);
  } else if (!whole_rows) {
    for (; r + 2 <= a.nrows; r += 2) row_block<W, 2>(a, w, r);
  }
  for (; r < a.nrows; ++r) row_block<W, 1>(a, w, r);
}

// out[k][c] += sum_r h[k][r] * w[r][c] for R rows and NT tokens over all ncols columns: the R
// rows stream front to back (R memory streams), each 8-column vector of them is loaded once
// for all NT tokens, and out (fp32, a few KB) stays in L1.
template <typename W, int R, int NT>
PP_INLINE void axpy_rows(const typename W::T* const (&w)[R], const float (&hv)[NT][R],
                         float* const (&out)[NT], int64_t n) {
  __m256 hb[NT][R];
  for (int k = 0; k < NT; ++k)
    for (int r = 0; r < R; ++r) hb[k][r] = _mm256_set1_ps(hv[k][r]);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = W::load8(w[r] + c);
    for (int k = 0; k < NT; ++k) {
      __m256 o = _mm256_loadu_ps(out[k] + c);
      for (int r = 0; r < R; ++r) o = _mm256_fmadd_ps(hb[k][r], wv[r], o);
      _mm256_storeu_ps(out[k] + c, o);
    }
  }
  for (; c < n; ++c)
    for (int k = 0; k < NT; ++k) {
      float o = out[k][c];
      for (int r = 0; r < R; ++r) o += hv[k][r] * W::get(w[r] + c);
      out[k][c] = o;
    }
}

// A position in the concatenation of the segments' rows: segment s, row j of it.
struct RowCursor {
  int64_t s, j;
};

PP_INLINE RowCursor row_at(const SegsAxpy& a, int64_t p) {
  int64_t s = 0;
  while (p >= a.seg_len[s]) p -= a.seg_len[s++];
  return {s, p};
}

PP_INLINE void next_row(const SegsAxpy& a, RowCursor& c) {
  if (++c.j == a.seg_len[c.s]) {
    c.j = 0;
    ++c.s;
  }
}

// The R rows under the cursors against tokens [k0, k0 + NT).
template <typename W, int R, int NT>
PP_INLINE void axpy_tile(const SegsAxpy& a, const typename W::T* w, const RowCursor (&c)[R],
                         int64_t k0) {
  const typename W::T* ws[R];
  float hv[NT][R];
  float* outs[NT];
  for (int r = 0; r < R; ++r) ws[r] = w + (a.seg_row[c[r].s] + c[r].j) * a.ldw;
  for (int k = 0; k < NT; ++k) {
    outs[k] = a.out + (k0 + k) * a.ldo;
    for (int r = 0; r < R; ++r) hv[k][r] = a.h[k0 + k][a.seg_off[c[r].s] + c[r].j];
  }
  axpy_rows<W, R, NT>(ws, hv, outs, a.ncols);
}

template <typename W, int R>
PP_INLINE void axpy_rows_all_tokens(const SegsAxpy& a, const typename W::T* w,
                                    const RowCursor (&c)[R]) {
  int64_t k0 = 0;
  for (; k0 + 2 <= a.nt; k0 += 2) axpy_tile<W, R, 2>(a, w, c, k0);
  if (k0 < a.nt) axpy_tile<W, R, 1>(a, w, c, k0);
}

// The rows of all segments, taken as one list and read as 4 interleaved quarters of it: 4
// memory streams that jump from one segment (an expert's run of rows) to the next at
// different times, so one stream's restart overlaps the others' steady reading. Quarters of
// each segment started and ended the 4 streams together at every segment: SmolLM2's FFN
// (16-neuron experts), T=1, paired, 2-core Zen 4: bf16 1.05-1.11x with 24-72 of 96 experts
// live at random or every other one, fp32 1.01-1.04x, one run of experts unchanged; 8 streams
// instead of 4 gained nothing (measured 2026-12-05).
template <typename W>
PP_TARGET void segs_axpy(const SegsAxpy& a) {
  const auto* w = static_cast<const typename W::T*>(a.w);
  int64_t n = 0;
  for (int64_t s = 0; s < a.nseg; ++s) n += a.seg_len[s];
  const int64_t q = n / 4;
  if (q > 0) {
    RowCursor c[4];
    for (int r = 0; r < 4; ++r) c[r] = row_at(a, r * q);
    for (int64_t i = 0; i < q; ++i) {
      axpy_rows_all_tokens<W, 4>(a, w, c);
      for (int r = 0; r < 4; ++r) next_row(a, c[r]);
    }
  }
  for (int64_t p = 4 * q; p < n; ++p) {
    const RowCursor c1[1] = {row_at(a, p)};
    axpy_rows_all_tokens<W, 1>(a, w, c1);
  }
}

}  // namespace

PP_TARGET void segs_axpy_avx2(const SegsAxpy& a) {
  switch (a.wtype) {
    case WType::F32: return segs_axpy<F32>(a);
    case WType::BF16: return segs_axpy<BF16>(a);
    case WType::F16: return segs_axpy<F16>(a);
  }
}

PP_TARGET void pair_blocks_avx2(const PairBlocks& a) {
  switch (a.wtype) {
    case WType::F32: return pair_blocks<F32>(a);
    case WType::BF16: return pair_blocks<BF16>(a);
    case WType::F16: return pair_blocks<F16>(a);
  }
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

PP_TARGET void segs_dot_avx2(const SegsDot& a) {
  switch (a.wtype) {
    case WType::F32: return segs_dot<F32>(a);
    case WType::BF16: return segs_dot<BF16>(a);
    case WType::F16: return segs_dot<F16>(a);
  }
}

}  // namespace cpu
}  // namespace prunepath

#else  // not x86-64: only the generic kernels exist

namespace prunepath {
namespace cpu {
bool cpu_has_avx2() { return false; }
void segs_dot_avx2(const SegsDot& a) { segs_dot_generic(a); }
void segs_axpy_avx2(const SegsAxpy& a) { segs_axpy_generic(a); }
void pair_blocks_avx2(const PairBlocks& a) { pair_blocks_generic(a); }
}  // namespace cpu
}  // namespace prunepath

#endif
