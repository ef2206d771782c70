// Shared device helpers for the prunepath CUDA kernels: dtype conversions, 16-byte vector
// loads, warp/block reductions, activations.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace prunepath {
namespace cuda {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(bool v) { return v ? 1.f : 0.f; }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements of T in one 16-byte vector.
template <typename T>
struct Vec16 {
  static constexpr int N = 16 / sizeof(T);
};

// Load N = Vec16<T>::N consecutive elements (16-byte aligned) as floats, through the
// read-only path, without allocating in L1 for streamed weights.
template <typename T>
__device__ __forceinline__ void load16_stream(const T* p, float* out);

template <>
__device__ __forceinline__ void load16_stream<float>(const float* p, float* out) {
  float4 v = __ldcs(reinterpret_cast<const float4*>(p));
  out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
}
template <>
__device__ __forceinline__ void load16_stream<__half>(const __half* p, float* out) {
  uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __half22float2(h[i]);
    out[2 * i] = f.x; out[2 * i + 1] = f.y;
  }
}
template <>
__device__ __forceinline__ void load16_stream<__nv_bfloat16>(const __nv_bfloat16* p, float* out) {
  uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x; out[2 * i + 1] = f.y;
  }
}

// Same for small, reused operands (activations x): cached load.
template <typename T>
__device__ __forceinline__ void load16_cached(const T* p, float* out) {
  uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < Vec16<T>::N; ++i) out[i] = to_f(e[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Activation ids: 0 silu, 1 gelu (erf), 2 gelu_tanh, 3 relu (as prunepath.ops.reference).
__device__ __forceinline__ float activate(float h, int act) {
  switch (act) {
    case 0:
      return h / (1.f + expf(-h));
    case 1:
      return 0.5f * h * (1.f + erff(h * 0.70710678118654752f));
    case 2: {
      const float inner = 0.7978845608028654f * (h + 0.044715f * h * h * h);
      return 0.5f * h * (1.f + tanhf(inner));
    }
    default:
      return fmaxf(h, 0.f);
  }
}

}  // namespace cuda
}  // namespace prunepath
