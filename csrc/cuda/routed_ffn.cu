// CUDA kernels of prunepath::routed_ffn and prunepath::routed_ffn_packed (schemas in
// csrc/ops.cpp): the block-sparse routed FFN for decoding (few tokens per step).
//
// Semantics: prunepath/ops/reference.py::routed_ffn_reference (the dense FFN with each token's
// inactive experts' neurons zeroed). An expert is *live* when some token of the step chose it;
// only live experts' weights are read, each once for all tokens of the step.
//
//   1. ffn_up_kernel: one warp per neuron n (rows of W_gate / W_up, 16-byte loads along d);
//      h[t, n] = act(x_t . Wg_n) * (x_t . Wu_n + b_up_n), zeroed where token t did not choose
//      n's expert (fp32 [T, F]); a dead neuron's warp only writes zeros.
//   2a. ffn_down_rows_kernel (nn.Linear W_down [d, F]): one warp per output feature j, reading
//      the live stretches of row j; writes out[t, j] = h_t . W_down[j] + b_down_j directly.
//   2b. ffn_down_cols_kernel (packed W_down^T [F, d], contiguous expert blocks): a block owns
//      a slab of output columns (16 bytes per thread) and a slice of F; it streams the live
//      rows of its slice and writes fp32 partial sums, which ffn_reduce_kernel adds in a fixed
//      order (deterministic, no atomics) with b_down.
// Tokens are processed TT at a time (TT in {1, 2, 4, 8}); more tokens loop over passes.
// Every launch depends only on shapes: safe inside CUDA graphs, no host synchronization.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <utility>

#include "common.cuh"

namespace prunepath {
namespace cuda {
namespace {

constexpr int kWarps = 8;         // warps per block of the up and row kernels
constexpr int kColThreads = 128;  // threads per block of the column kernel

__device__ __forceinline__ void mark_live_experts(const bool* __restrict__ mask, int Tn, int E,
                                                  unsigned char* live_e) {
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    bool u = false;
    for (int t = 0; t < Tn; ++t) u |= mask[static_cast<int64_t>(t) * E + e];
    live_e[e] = u;
  }
  __syncthreads();
}

template <typename T, int TT, bool GATED, bool VEC>
__global__ void __launch_bounds__(kWarps * 32)
ffn_up_kernel(const T* __restrict__ x, const T* __restrict__ wg, const T* __restrict__ wu,
              const T* __restrict__ bu, const bool* __restrict__ mask, float* __restrict__ h,
              int Tn, int D, int F, int NE, int E, int act) {
  constexpr int V = VEC ? Vec16<T>::N : 1;
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (n >= F) return;
  const int e = n / NE;
  bool live = false;
  for (int t = lane; t < Tn; t += 32) live |= mask[static_cast<int64_t>(t) * E + e];
  if (!__any_sync(0xffffffffu, live)) {
    for (int t = lane; t < Tn; t += 32) h[static_cast<int64_t>(t) * F + n] = 0.f;
    return;
  }
  const T* wu_row = wu + static_cast<int64_t>(n) * D;
  const T* wg_row = GATED ? wg + static_cast<int64_t>(n) * D : nullptr;
  const float bias = bu != nullptr ? to_f(bu[n]) : 0.f;

  for (int t0 = 0; t0 < Tn; t0 += TT) {
    float au[TT], ag[TT];
#pragma unroll
    for (int tt = 0; tt < TT; ++tt) au[tt] = ag[tt] = 0.f;
#pragma unroll 4
    for (int k = lane * V; k < D; k += 32 * V) {
      float u[V], g[V];
      if constexpr (VEC) {
        load16_stream(wu_row + k, u);
        if constexpr (GATED) load16_stream(wg_row + k, g);
      } else {
        u[0] = to_f(wu_row[k]);
        if constexpr (GATED) g[0] = to_f(wg_row[k]);
      }
#pragma unroll
      for (int tt = 0; tt < TT; ++tt) {
        if (t0 + tt < Tn) {
          const T* xp = x + static_cast<int64_t>(t0 + tt) * D + k;
          float xv[V];
          if constexpr (VEC) {
            load16_cached(xp, xv);
          } else {
            xv[0] = to_f(__ldg(xp));
          }
#pragma unroll
          for (int v = 0; v < V; ++v) {
            au[tt] = fmaf(xv[v], u[v], au[tt]);
            if constexpr (GATED) ag[tt] = fmaf(xv[v], g[v], ag[tt]);
          }
        }
      }
    }
#pragma unroll
    for (int tt = 0; tt < TT; ++tt) {
      const float su = warp_sum(au[tt]);
      const float sg = GATED ? warp_sum(ag[tt]) : 0.f;
      const int t = t0 + tt;
      if (lane == tt && t < Tn) {
        const float up = su + bias;
        const float val = GATED ? activate(sg, act) * up : activate(up, act);
        h[static_cast<int64_t>(t) * F + n] = mask[static_cast<int64_t>(t) * E + e] ? val : 0.f;
      }
    }
  }
}

template <typename T, int TT, bool VEC>
__global__ void __launch_bounds__(kWarps * 32)
ffn_down_rows_kernel(const float* __restrict__ h, const T* __restrict__ wd,
                     const T* __restrict__ bd, const bool* __restrict__ mask, T* __restrict__ out,
                     int Tn, int D, int F, int NE, int E, int64_t stride_j, int64_t stride_n) {
  extern __shared__ unsigned char live_e[];
  mark_live_experts(mask, Tn, E, live_e);
  constexpr int V = VEC ? Vec16<T>::N : 1;
  const int lane = threadIdx.x & 31;
  const int j = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (j >= D) return;
  const T* row = wd + static_cast<int64_t>(j) * stride_j;
  const float bias = bd != nullptr ? to_f(bd[j]) : 0.f;

  for (int t0 = 0; t0 < Tn; t0 += TT) {
    float acc[TT];
#pragma unroll
    for (int tt = 0; tt < TT; ++tt) acc[tt] = 0.f;
#pragma unroll 4
    for (int n0 = lane * V; n0 < F; n0 += 32 * V) {
      bool lv = false;
      const int e_last = (n0 + V - 1) / NE;
      for (int e = n0 / NE; e <= e_last; ++e) lv |= live_e[e];
      if (!lv) continue;
      float w[V];
      if constexpr (VEC) {
        load16_stream(row + n0, w);
      } else {
        w[0] = to_f(row[static_cast<int64_t>(n0) * stride_n]);
      }
#pragma unroll
      for (int tt = 0; tt < TT; ++tt) {
        if (t0 + tt < Tn) {
          const float* hp = h + static_cast<int64_t>(t0 + tt) * F + n0;
          float hv[V];
          if constexpr (VEC) {
#pragma unroll
            for (int q = 0; q < V / 4; ++q) {
              const float4 f = __ldg(reinterpret_cast<const float4*>(hp) + q);
              hv[4 * q] = f.x; hv[4 * q + 1] = f.y; hv[4 * q + 2] = f.z; hv[4 * q + 3] = f.w;
            }
          } else {
            hv[0] = __ldg(hp);
          }
#pragma unroll
          for (int v = 0; v < V; ++v) acc[tt] = fmaf(hv[v], w[v], acc[tt]);
        }
      }
    }
#pragma unroll
    for (int tt = 0; tt < TT; ++tt) {
      const float s = warp_sum(acc[tt]);
      if (lane == 0 && t0 + tt < Tn) out[static_cast<int64_t>(t0 + tt) * D + j] = from_f<T>(s + bias);
    }
  }
}

template <typename T, int TT>
__global__ void __launch_bounds__(kColThreads)
ffn_down_cols_kernel(const float* __restrict__ h, const T* __restrict__ wdt,
                     const bool* __restrict__ mask, float* __restrict__ part, int Tn, int D, int F,
                     int NE, int E, int rows_per_split) {
  extern __shared__ unsigned char live_e[];
  mark_live_experts(mask, Tn, E, live_e);
  constexpr int V = Vec16<T>::N;
  const int col = (blockIdx.x * kColThreads + threadIdx.x) * V;
  const bool col_ok = col < D;
  const int n_begin = blockIdx.y * rows_per_split;
  const int n_end = min(F, n_begin + rows_per_split);

  for (int t0 = 0; t0 < Tn; t0 += TT) {
    float acc[TT][V];
#pragma unroll
    for (int tt = 0; tt < TT; ++tt)
#pragma unroll
      for (int v = 0; v < V; ++v) acc[tt][v] = 0.f;
    if (col_ok) {
      for (int e = n_begin / NE; e * NE < n_end; ++e) {
        if (!live_e[e]) continue;  // uniform across the block
        const int a = max(n_begin, e * NE), b = min(n_end, (e + 1) * NE);
#pragma unroll 4
        for (int n = a; n < b; ++n) {
          float w[V];
          load16_stream(wdt + static_cast<int64_t>(n) * D + col, w);
#pragma unroll
          for (int tt = 0; tt < TT; ++tt) {
            if (t0 + tt < Tn) {
              const float hv = __ldg(h + static_cast<int64_t>(t0 + tt) * F + n);
#pragma unroll
              for (int v = 0; v < V; ++v) acc[tt][v] = fmaf(hv, w[v], acc[tt][v]);
            }
          }
        }
      }
#pragma unroll
      for (int tt = 0; tt < TT; ++tt) {
        if (t0 + tt < Tn) {
          float* dst = part + (static_cast<int64_t>(blockIdx.y) * Tn + t0 + tt) * D + col;
#pragma unroll
          for (int q = 0; q < V / 4; ++q)
            reinterpret_cast<float4*>(dst)[q] =
                make_float4(acc[tt][4 * q], acc[tt][4 * q + 1], acc[tt][4 * q + 2], acc[tt][4 * q + 3]);
        }
      }
    }
  }
}

template <typename T>
__global__ void ffn_reduce_kernel(const float* __restrict__ part, const T* __restrict__ bd,
                                  T* __restrict__ out, int64_t N, int D, int S) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N) return;
  float s = bd != nullptr ? to_f(bd[i % D]) : 0.f;
  for (int k = 0; k < S; ++k) s += part[static_cast<int64_t>(k) * N + i];
  out[i] = from_f<T>(s);
}

// ---------------------------------------------------------------------------------- host

int activation_id(const std::string& a) {
  if (a == "silu") return 0;
  if (a == "gelu") return 1;
  if (a == "gelu_tanh") return 2;
  if (a == "relu") return 3;
  TORCH_CHECK(false, "prunepath::routed_ffn: activation must be silu, gelu, gelu_tanh or relu, got ",
              a);
}

template <typename Fn>
void dispatch_dtype(at::ScalarType st, Fn&& fn) {
  switch (st) {
    case at::kFloat: fn(static_cast<float*>(nullptr)); break;
    case at::kHalf: fn(static_cast<__half*>(nullptr)); break;
    case at::kBFloat16: fn(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, "prunepath::routed_ffn (CUDA): dtype must be float32, float16 or "
                                "bfloat16, got ", st);
  }
}

template <typename Fn>
void dispatch_tt(int64_t T, Fn&& fn) {
  if (T <= 1) fn(std::integral_constant<int, 1>{});
  else if (T <= 2) fn(std::integral_constant<int, 2>{});
  else if (T <= 4) fn(std::integral_constant<int, 4>{});
  else fn(std::integral_constant<int, 8>{});
}

template <typename Fn>
void dispatch_bool(bool b, Fn&& fn) {
  if (b) fn(std::true_type{});
  else fn(std::false_type{});
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
const T* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? reinterpret_cast<const T*>(t->const_data_ptr()) : nullptr;
}

void check_args(const at::Tensor& x, const c10::optional<at::Tensor>& w_gate,
                const at::Tensor& w_up, const at::Tensor& mask,
                const c10::optional<at::Tensor>& b_up, const c10::optional<at::Tensor>& b_down,
                const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous [T, d] tensor");
  TORCH_CHECK(w_up.dim() == 2 && w_up.size(1) == x.size(1) && w_up.is_contiguous(), op,
              ": w_up must be a contiguous [F, d] tensor");
  if (w_gate.has_value())
    TORCH_CHECK(w_gate->sizes() == w_up.sizes() && w_gate->is_contiguous() &&
                    w_gate->scalar_type() == x.scalar_type(),
                op, ": w_gate must be a contiguous [F, d] tensor like w_up");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == x.size(0) && mask.scalar_type() == at::kBool &&
                  mask.is_contiguous(),
              op, ": mask must be a contiguous bool [T, E] tensor");
  TORCH_CHECK(mask.size(1) >= 1 && w_up.size(0) % mask.size(1) == 0, op,
              ": F must be divisible by E");
  TORCH_CHECK(w_up.scalar_type() == x.scalar_type(), op, ": weights must have x's dtype");
  if (b_up.has_value())
    TORCH_CHECK(b_up->numel() == w_up.size(0) && b_up->is_contiguous() &&
                    b_up->scalar_type() == x.scalar_type(),
                op, ": b_up must be a contiguous [F] tensor of x's dtype");
  if (b_down.has_value())
    TORCH_CHECK(b_down->numel() == x.size(1) && b_down->is_contiguous() &&
                    b_down->scalar_type() == x.scalar_type(),
                op, ": b_down must be a contiguous [d] tensor of x's dtype");
}

// Phase 1 into a fresh fp32 h [T, F].
at::Tensor launch_up(const at::Tensor& x, const c10::optional<at::Tensor>& w_gate,
                     const at::Tensor& w_up, const at::Tensor& mask,
                     const c10::optional<at::Tensor>& b_up, int act, cudaStream_t stream) {
  const int64_t T = x.size(0), D = x.size(1), F = w_up.size(0), E = mask.size(1);
  at::Tensor h = at::empty({T, F}, x.options().dtype(at::kFloat));
  const bool gated = w_gate.has_value();
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T_ = std::remove_pointer_t<decltype(tag)>;
    constexpr int V = Vec16<T_>::N;
    const bool vec = D % V == 0 && aligned16(x.const_data_ptr()) &&
                     aligned16(w_up.const_data_ptr()) &&
                     (!gated || aligned16(w_gate->const_data_ptr()));
    dispatch_tt(T, [&](auto tt) {
      dispatch_bool(gated, [&](auto g) {
        dispatch_bool(vec, [&](auto v) {
          ffn_up_kernel<T_, decltype(tt)::value, decltype(g)::value, decltype(v)::value>
              <<<(F + kWarps - 1) / kWarps, kWarps * 32, 0, stream>>>(
                  ptr<T_>(x), gated ? ptr<T_>(*w_gate) : nullptr, ptr<T_>(w_up),
                  opt_ptr<T_>(b_up), mask.const_data_ptr<bool>(), h.data_ptr<float>(), T, D, F,
                  F / E, E, act);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  return h;
}

// Phase 2 over any-strided W_down viewed as [d, F] (element (j, n) at j*stride_j + n*stride_n).
void launch_down_rows(const at::Tensor& h, const at::Tensor& x, const at::Tensor& wd,
                      int64_t stride_j, int64_t stride_n, const at::Tensor& mask,
                      const c10::optional<at::Tensor>& b_down, at::Tensor& out,
                      cudaStream_t stream) {
  const int64_t T = x.size(0), D = x.size(1), F = h.size(1), E = mask.size(1);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T_ = std::remove_pointer_t<decltype(tag)>;
    constexpr int V = Vec16<T_>::N;
    const bool vec = F % V == 0 && stride_n == 1 && stride_j % V == 0 &&
                     aligned16(wd.const_data_ptr());
    dispatch_tt(T, [&](auto tt) {
      dispatch_bool(vec, [&](auto v) {
        ffn_down_rows_kernel<T_, decltype(tt)::value, decltype(v)::value>
            <<<(D + kWarps - 1) / kWarps, kWarps * 32, E, stream>>>(
                h.const_data_ptr<float>(), ptr<T_>(wd), opt_ptr<T_>(b_down),
                mask.const_data_ptr<bool>(), reinterpret_cast<T_*>(out.data_ptr()), T, D, F,
                F / E, E, stride_j, stride_n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

at::Tensor routed_ffn_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& w_gate,
                           const at::Tensor& w_up, const at::Tensor& w_down,
                           const at::Tensor& mask, c10::string_view activation,
                           const c10::optional<at::Tensor>& b_up,
                           const c10::optional<at::Tensor>& b_down) {
  const char* op = "prunepath::routed_ffn (CUDA)";
  check_args(x, w_gate, w_up, mask, b_up, b_down, op);
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(0) == x.size(1) && w_down.size(1) == w_up.size(0) &&
                  w_down.scalar_type() == x.scalar_type(),
              op, ": w_down must be [d, F] with x's dtype");
  const int act = activation_id(std::string(activation));
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  if (x.size(0) == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor h = launch_up(x, w_gate, w_up, mask, b_up, act, stream);
  launch_down_rows(h, x, w_down, w_down.stride(0), w_down.stride(1), mask, b_down, out, stream);
  return out;
}

at::Tensor routed_ffn_packed_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& w_gate,
                                  const at::Tensor& w_up, const at::Tensor& w_down_t,
                                  const at::Tensor& mask, c10::string_view activation,
                                  const c10::optional<at::Tensor>& b_up,
                                  const c10::optional<at::Tensor>& b_down) {
  const char* op = "prunepath::routed_ffn_packed (CUDA)";
  check_args(x, w_gate, w_up, mask, b_up, b_down, op);
  TORCH_CHECK(w_down_t.sizes() == w_up.sizes() && w_down_t.scalar_type() == x.scalar_type() &&
                  w_down_t.is_contiguous(),
              op, ": w_down_t must be a contiguous [F, d] tensor (W_down^T) with x's dtype");
  const int act = activation_id(std::string(activation));
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  const int64_t T = x.size(0), D = x.size(1), F = w_up.size(0), E = mask.size(1);
  if (T == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor h = launch_up(x, w_gate, w_up, mask, b_up, act, stream);
  const int64_t V = 16 / x.element_size();
  if (D % V != 0 || !aligned16(w_down_t.const_data_ptr())) {
    // odd widths: the row kernel over the transposed view (scalar loads)
    launch_down_rows(h, x, w_down_t, 1, D, mask, b_down, out, stream);
    return out;
  }
  const int64_t col_blocks = (D / V + kColThreads - 1) / kColThreads;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  int64_t splits = std::max<int64_t>(1, (4 * sms + col_blocks - 1) / col_blocks);
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, F / 16));
  if (T > 8) splits = std::min<int64_t>(splits, 16);
  const int64_t rows = (F + splits - 1) / splits;
  splits = (F + rows - 1) / rows;
  at::Tensor part = at::empty({splits, T, D}, x.options().dtype(at::kFloat));
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T_ = std::remove_pointer_t<decltype(tag)>;
    dispatch_tt(T, [&](auto tt) {
      ffn_down_cols_kernel<T_, decltype(tt)::value>
          <<<dim3(col_blocks, splits), kColThreads, E, stream>>>(
              h.const_data_ptr<float>(), ptr<T_>(w_down_t), mask.const_data_ptr<bool>(),
              part.data_ptr<float>(), T, D, F, F / E, E, static_cast<int>(rows));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const int64_t N = T * D;
    ffn_reduce_kernel<T_><<<(N + 255) / 256, 256, 0, stream>>>(
        part.const_data_ptr<float>(), opt_ptr<T_>(b_down), reinterpret_cast<T_*>(out.data_ptr()),
        N, D, static_cast<int>(splits));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(prunepath, CUDA, m) {
  m.impl("routed_ffn", &routed_ffn_cuda);
  m.impl("routed_ffn_packed", &routed_ffn_packed_cuda);
}

}  // namespace cuda
}  // namespace prunepath
