// Helpers shared by the CPU ops (routed_ffn.cpp, router_route.cpp): activations (semantics of
// prunepath/ops/reference.py::activate; "gelu" is the exact erf form), the dot kernels'
// weight type of a tensor, small optional tensors as fp32 vectors, and the kernel choice.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "kernels.h"

namespace prunepath {
namespace cpu {

enum class Act { None, Silu, Gelu, GeluTanh, Relu };

// `op` names the calling op in the error; "none" is accepted only where `allow_none`.
inline Act parse_activation(c10::string_view name, const char* op, bool allow_none) {
  if (name == "silu") return Act::Silu;
  if (name == "gelu") return Act::Gelu;
  if (name == "gelu_tanh") return Act::GeluTanh;
  if (name == "relu") return Act::Relu;
  if (allow_none && name == "none") return Act::None;
  TORCH_CHECK(false, op, ": activation must be one of ", allow_none ? "none, " : "",
              "silu, gelu, gelu_tanh, relu; got '", std::string(name), "'");
}

inline float activate(Act act, float v) {
  switch (act) {
    case Act::None: return v;
    case Act::Silu: return v / (1.0f + std::exp(-v));
    case Act::Gelu: return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    case Act::GeluTanh: {
      const float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.0f + std::tanh(inner));
    }
    case Act::Relu: return v < 0.0f ? 0.0f : v;
  }
  return v;
}

inline WType wtype_of(at::ScalarType s, const char* op) {
  switch (s) {
    case at::kFloat: return WType::F32;
    case at::kBFloat16: return WType::BF16;
    case at::kHalf: return WType::F16;
    default: TORCH_CHECK(false, op, ": no dot kernel for dtype ", s);
  }
}

inline std::vector<float> to_float_vector(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return {};
  const at::Tensor f = t->to(at::kFloat).contiguous();
  return std::vector<float>(f.const_data_ptr<float>(), f.const_data_ptr<float>() + f.numel());
}

// A contiguous float tensor's values as fp32, without an ATen op (a decode step calls the CPU
// ops ~150 times; each to()/copy_() pair cost ~8 us of dispatch and allocation there): fp32 is
// read in place, bf16/fp16 are widened into `buf`.
inline const float* float_values(const at::Tensor& t, std::vector<float>& buf) {
  if (t.scalar_type() == at::kFloat) return t.const_data_ptr<float>();
  const int64_t n = t.numel();
  buf.resize(static_cast<size_t>(n));
  if (t.scalar_type() == at::kBFloat16) {
    const at::BFloat16* p = t.const_data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
  } else {
    TORCH_CHECK(t.scalar_type() == at::kHalf, "float_values: unsupported dtype ", t.scalar_type());
    const at::Half* p = t.const_data_ptr<at::Half>();
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
  }
  return buf.data();
}

// Writes fp32 values into a contiguous fp32/bf16/fp16 tensor (round to nearest even, as
// Tensor::to does).
inline void store_floats(const float* v, at::Tensor& out) {
  const int64_t n = out.numel();
  switch (out.scalar_type()) {
    case at::kFloat: std::memcpy(out.data_ptr<float>(), v, n * sizeof(float)); return;
    case at::kBFloat16: {
      at::BFloat16* o = out.data_ptr<at::BFloat16>();
      for (int64_t i = 0; i < n; ++i) o[i] = at::BFloat16(v[i]);
      return;
    }
    case at::kHalf: {
      at::Half* o = out.data_ptr<at::Half>();
      for (int64_t i = 0; i < n; ++i) o[i] = at::Half(v[i]);
      return;
    }
    default: TORCH_CHECK(false, "store_floats: unsupported dtype ", out.scalar_type());
  }
}

// The AVX2 dot kernels where the CPU has them; PRUNEPATH_CPU_ISA=generic forces the portable
// ones (read per call so tests can toggle it).
inline bool use_avx2_kernels() {
  static const bool has_avx2 = cpu_has_avx2();
  const char* isa = std::getenv("PRUNEPATH_CPU_ISA");
  return has_avx2 && (isa == nullptr || std::strcmp(isa, "generic") != 0);
}

inline void (*segs_dot_kernel())(const SegsDot&) {
  return use_avx2_kernels() ? segs_dot_avx2 : segs_dot_generic;
}

inline void (*pair_blocks_kernel())(const PairBlocks&) {
  return use_avx2_kernels() ? pair_blocks_avx2 : pair_blocks_generic;
}

inline void (*segs_axpy_kernel())(const SegsAxpy&) {
  return use_avx2_kernels() ? segs_axpy_avx2 : segs_axpy_generic;
}

}  // namespace cpu
}  // namespace prunepath
