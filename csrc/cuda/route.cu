// CUDA kernel of prunepath::route (schema in csrc/ops.cpp): cumulative-mass expert routing.
//
// Semantics: prunepath/ops/reference.py::route_reference. One block per token; no sort:
// expert j is ranked above i when p_j > p_i or (p_j == p_i and j < i) (a stable descending
// order), so rank_i = #{j above i} and mass_before_i = sum of p_j over j above i (summed in
// index order, deterministic). take_i = mass_before_i < budget or budget >= 1;
// count = clamp(#take, min, max); mask_i = rank_i < count. No host synchronization.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.cuh"

namespace prunepath {
namespace cuda {
namespace {

constexpr int kRouteThreads = 128;

__device__ float block_reduce(float v, float* scratch, bool is_max) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, other) : v + other;
  }
  __syncthreads();  // scratch may still be read from a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = scratch[0];
  for (int w = 1; w < kRouteThreads / 32; ++w) r = is_max ? fmaxf(r, scratch[w]) : r + scratch[w];
  return r;
}

template <typename T>
__global__ void __launch_bounds__(kRouteThreads)
route_kernel(const T* __restrict__ logits, const float* __restrict__ budget,
             bool* __restrict__ mask, int E, int min_e, int max_e) {
  extern __shared__ float p[];  // [E] probabilities, then [E] ranks (as int)
  int* rank = reinterpret_cast<int*>(p + E);
  __shared__ float scratch[kRouteThreads / 32];
  const int t = blockIdx.x;
  const T* z = logits + static_cast<int64_t>(t) * E;

  float m = -INFINITY;
  for (int i = threadIdx.x; i < E; i += kRouteThreads) m = fmaxf(m, to_f(z[i]));
  m = block_reduce(m, scratch, true);
  float s = 0.f;
  for (int i = threadIdx.x; i < E; i += kRouteThreads) {
    const float ex = expf(to_f(z[i]) - m);
    p[i] = ex;
    s += ex;
  }
  s = block_reduce(s, scratch, false);
  for (int i = threadIdx.x; i < E; i += kRouteThreads) p[i] = p[i] / s;
  __syncthreads();

  const float b = budget[t];
  float take = 0.f;
  for (int i = threadIdx.x; i < E; i += kRouteThreads) {
    const float pi = p[i];
    float mass = 0.f;
    int r = 0;
    for (int j = 0; j < E; ++j) {
      const float pj = p[j];
      const bool above = pj > pi || (pj == pi && j < i);
      mass += above ? pj : 0.f;
      r += above;
    }
    rank[i] = r;
    take += (mass < b || b >= 1.f) ? 1.f : 0.f;
  }
  const int count = min(max(static_cast<int>(block_reduce(take, scratch, false)), min_e), max_e);
  __syncthreads();
  bool* out = mask + static_cast<int64_t>(t) * E;
  for (int i = threadIdx.x; i < E; i += kRouteThreads) out[i] = rank[i] < count;
}

at::Tensor route_cuda(const at::Tensor& logits, const at::Tensor& budget, int64_t min_experts,
                      int64_t max_experts) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(),
              "prunepath::route: logits must be a contiguous [T, E] tensor, got ", logits.sizes());
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(E >= 1, "prunepath::route: logits must have at least one expert");
  TORCH_CHECK(budget.dim() == 1 && budget.size(0) == T && budget.scalar_type() == at::kFloat &&
                  budget.is_contiguous() && budget.device() == logits.device(),
              "prunepath::route: budget must be a contiguous float32 [T] tensor on ",
              logits.device());
  TORCH_CHECK(0 <= min_experts && min_experts <= max_experts && max_experts <= E,
              "prunepath::route: need 0 <= min_experts <= max_experts <= E");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor mask = at::empty({T, E}, logits.options().dtype(at::kBool));
  if (T == 0) return mask;
  const size_t smem = static_cast<size_t>(E) * (sizeof(float) + sizeof(int));
  TORCH_CHECK(smem <= 48 * 1024, "prunepath::route (CUDA): at most 6144 experts, got E=", E);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float* b = budget.const_data_ptr<float>();
  bool* m = mask.data_ptr<bool>();
  const int e = static_cast<int>(E), lo = static_cast<int>(min_experts),
            hi = static_cast<int>(max_experts);
  switch (logits.scalar_type()) {
    case at::kFloat:
      route_kernel<float><<<T, kRouteThreads, smem, stream>>>(logits.const_data_ptr<float>(), b,
                                                               m, e, lo, hi);
      break;
    case at::kHalf:
      route_kernel<__half><<<T, kRouteThreads, smem, stream>>>(
          reinterpret_cast<const __half*>(logits.const_data_ptr<at::Half>()), b, m, e, lo, hi);
      break;
    case at::kBFloat16:
      route_kernel<__nv_bfloat16><<<T, kRouteThreads, smem, stream>>>(
          reinterpret_cast<const __nv_bfloat16*>(logits.const_data_ptr<at::BFloat16>()), b, m, e,
          lo, hi);
      break;
    default: {
      // float64 (or anything else): route on the fp32 copy, as the reference does
      return route_cuda(logits.to(at::kFloat), budget, min_experts, max_experts);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(prunepath, CUDA, m) { m.impl("route", &route_cuda); }

}  // namespace cuda
}  // namespace prunepath
