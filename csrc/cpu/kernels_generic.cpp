// Portable versions of the routed-FFN dot and row-sum kernels (see kernels.h). Compiled for
// the baseline ISA; `#pragma omp simd` lets the compiler vectorize the reductions. Used when
// the CPU has no AVX2/FMA/F16C, on non-x86 machines, and when PRUNEPATH_CPU_ISA=generic.
#include "kernels.h"

namespace prunepath {
namespace cpu {
namespace {

struct F32 {
  using T = float;
  static float get(const T* p, int64_t j) { return p[j]; }
};
struct BF16 {
  using T = uint16_t;
  static float get(const T* p, int64_t j) { return bf16_bits_to_float(p[j]); }
};
struct F16 {
  using T = uint16_t;
  static float get(const T* p, int64_t j) { return f16_bits_to_float(p[j]); }
};

// Four weight rows against one vector (four memory streams, one pass over x).
template <typename W>
void dot4(const typename W::T* w0, const typename W::T* w1, const typename W::T* w2,
          const typename W::T* w3, const float* x, int64_t n, float* acc) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t j = 0; j < n; ++j) {
    const float xj = x[j];
    a0 += W::get(w0, j) * xj;
    a1 += W::get(w1, j) * xj;
    a2 += W::get(w2, j) * xj;
    a3 += W::get(w3, j) * xj;
  }
  acc[0] += a0;
  acc[1] += a1;
  acc[2] += a2;
  acc[3] += a3;
}

template <typename W>
float dot(const typename W::T* w, const float* x, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += W::get(w, j) * x[j];
  return acc;
}

template <typename W>
void segs_dot(const SegsDot& a) {
  const auto* w = static_cast<const typename W::T*>(a.w);
  int64_t r = 0;
  for (; r + 4 <= a.nrows; r += 4) {
    const auto* row = w + r * a.ldw;
    for (int64_t k = 0; k < a.nt; ++k) {
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t s = 0; s < a.nseg; ++s) {
        const auto* ws = row + a.seg_col[s];
        dot4<W>(ws, ws + a.ldw, ws + 2 * a.ldw, ws + 3 * a.ldw, a.h[k] + a.seg_off[s],
                a.seg_len[s], acc);
      }
      for (int q = 0; q < 4; ++q) a.out[k * a.ldo + r + q] = acc[q];
    }
  }
  for (; r < a.nrows; ++r) {
    const auto* row = w + r * a.ldw;
    for (int64_t k = 0; k < a.nt; ++k) {
      float acc = 0.f;
      for (int64_t s = 0; s < a.nseg; ++s)
        acc += dot<W>(row + a.seg_col[s], a.h[k] + a.seg_off[s], a.seg_len[s]);
      a.out[k * a.ldo + r] = acc;
    }
  }
}

template <typename W>
void segs_axpy(const SegsAxpy& a) {
  const auto* w = static_cast<const typename W::T*>(a.w);
  for (int64_t s = 0; s < a.nseg; ++s)
    for (int64_t j = 0; j < a.seg_len[s]; ++j) {
      const auto* row = w + (a.seg_row[s] + j) * a.ldw;
      for (int64_t k = 0; k < a.nt; ++k) {
        const float hk = a.h[k][a.seg_off[s] + j];
        float* out = a.out + k * a.ldo;
#pragma omp simd
        for (int64_t c = 0; c < a.ncols; ++c) out[c] += hk * W::get(row, c);
      }
    }
}

}  // namespace

void segs_axpy_generic(const SegsAxpy& a) {
  switch (a.wtype) {
    case WType::F32: return segs_axpy<F32>(a);
    case WType::BF16: return segs_axpy<BF16>(a);
    case WType::F16: return segs_axpy<F16>(a);
  }
}

void pair_blocks_generic(const PairBlocks& a) {
  const int64_t zero = 0;
  for (int64_t b = 0; b < a.nblk; ++b) {
    SegsDot one{a.wtype, a.w[b], a.d, a.nrows, &zero, &a.d, &zero, 1, &a.x, 1,
                a.out + b * a.nrows, a.nrows, a.w2[b], a.out2 + b * a.nrows};
    segs_dot_generic(one);
  }
}

void segs_dot_generic(const SegsDot& a) {
  if (a.w2 != nullptr) {  // the two weights one after the other
    SegsDot first, second;
    split_pair(a, first, second);
    segs_dot_generic(first);
    return segs_dot_generic(second);
  }
  switch (a.wtype) {
    case WType::F32: return segs_dot<F32>(a);
    case WType::BF16: return segs_dot<BF16>(a);
    case WType::F16: return segs_dot<F16>(a);
  }
}

}  // namespace cpu
}  // namespace prunepath
