// Raw CPU dot-product kernels behind the block-sparse routed FFN (csrc/cpu/routed_ffn.cpp).
//
// This header deliberately includes no torch headers: csrc/cpu/kernels_avx2.cpp compiles its
// functions with __attribute__((target("avx2,fma,f16c"))), and any inline torch/std function
// instantiated there could be emitted with AVX2 instructions and picked by the linker for
// callers on machines without AVX2. The AVX2 versions are chosen at run time
// (cpu_has_avx2()); the generic versions (kernels_generic.cpp) run everywhere.
//
// Weights are read in their storage type (fp32, bf16 or fp16 bit patterns) and converted
// to fp32 in registers; activations (x, h) and every accumulation are fp32.
#pragma once

#include <cstdint>

namespace prunepath {
namespace cpu {

enum class WType : int { F32 = 0, BF16 = 1, F16 = 2 };

inline int64_t wtype_size(WType t) { return t == WType::F32 ? 4 : 2; }

// Segmented rows x tokens dot products:
//   out[k * ldo + r] = sum_s sum_{j < seg_len[s]} w[r * ldw + seg_col[s] + j] * h[k][seg_off[s] + j]
// for r < nrows, k < nt. With one segment (col 0, off 0, len d) this is a plain block of
// dot products (the up/gate projection of one expert's rows); with the runs of active
// experts as segments and h[k] a compact vector of the active columns, it is the down
// projection. Each weight element is loaded once per tile of up to 4 tokens. Whole contiguous
// rows are read one after another (one memory stream); row pieces a stride apart 8 rows at a
// time for one token, 2 rows for several (kernels_avx2.cpp says why).
struct SegsDot {
  WType wtype;
  const void* w;
  int64_t ldw;
  int64_t nrows;
  const int64_t* seg_col;
  const int64_t* seg_len;
  const int64_t* seg_off;
  int64_t nseg;
  const float* const* h;  // nt pointers to fp32 vectors (indexed by seg_off + j)
  int64_t nt;
  float* out;
  int64_t ldo;
  // optional second weight of the same layout, summed against the same tokens into out2
  // (a gated FFN's W_gate next to W_up): with whole rows and one token, row r of both is
  // computed together (two memory streams, twice the independent FMA chains)
  const void* w2 = nullptr;
  float* out2 = nullptr;
};

// A SegsDot with a second weight as two plain ones (w, out) and (w2, out2).
inline void split_pair(const SegsDot& a, SegsDot& first, SegsDot& second) {
  first = a;
  first.w2 = nullptr;
  first.out2 = nullptr;
  second = first;
  second.w = a.w2;
  second.out = a.out2;
}

void segs_dot_generic(const SegsDot& a);

// The up and gate projections of several experts for one token: block b is nrows whole rows
// of length d at w[b] (W_up) and w2[b] (W_gate), out[b * nrows + r] = w[b][r] . x and
// out2[b * nrows + r] = w2[b][r] . x. Blocks b and b + ceil(nblk / 2) are read together (four
// memory streams), so that where one stream jumps to its next expert's rows and the
// prefetchers start over, the other two keep reading (SmolLM2's FFN, T=1, paired, 2-core
// Zen 4: bf16 1.07-1.13x, fp32 1.02-1.08x over one expert's pair of rows at a time).
struct PairBlocks {
  WType wtype;
  const void* const* w;
  const void* const* w2;
  int64_t d;
  int64_t nrows;
  int64_t nblk;
  const float* x;
  float* out;
  float* out2;
};

void pair_blocks_generic(const PairBlocks& a);

// Segmented row-weighted sums (the down projection with a packed W_down^T [F, d]):
//   out[k * ldo + c] += sum_s sum_{j < seg_len[s]} h[k][seg_off[s] + j] * w[(seg_row[s] + j) * ldw + c]
// for c < ncols, k < nt. Each active expert is seg_len contiguous rows of w, read once for all
// tokens; the segments' rows, taken as one list, are read as 4 interleaved quarters of it (4
// memory streams); out (fp32, L1-resident) accumulates.
struct SegsAxpy {
  WType wtype;
  const void* w;
  int64_t ldw;
  int64_t ncols;
  const int64_t* seg_row;
  const int64_t* seg_len;
  const int64_t* seg_off;
  int64_t nseg;
  const float* const* h;  // nt pointers to fp32 vectors (indexed by seg_off + j)
  int64_t nt;
  float* out;
  int64_t ldo;
};

void segs_axpy_generic(const SegsAxpy& a);

// True when the AVX2 kernels were compiled in (x86) and the CPU has AVX2, FMA and F16C.
bool cpu_has_avx2();
void segs_dot_avx2(const SegsDot& a);
void segs_axpy_avx2(const SegsAxpy& a);
void pair_blocks_avx2(const PairBlocks& a);

// Bit-pattern conversions shared by the generic kernels.
inline float bf16_bits_to_float(uint16_t b) {
  union {
    uint32_t u;
    float f;
  } v;
  v.u = static_cast<uint32_t>(b) << 16;
  return v.f;
}

inline float f16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {  // inf / nan
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {  // normal
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {  // zero
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113u;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  union {
    uint32_t u;
    float f;
  } v;
  v.u = bits;
  return v.f;
}

}  // namespace cpu
}  // namespace prunepath
