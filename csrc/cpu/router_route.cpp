// CPU kernel of prunepath::router_route (schema in csrc/ops.cpp): the router projection and
// cumulative-mass routing in one call, the CPU counterpart of the fused Triton router.
//
// Semantics: prunepath/ops/router_route.py (router_logits_reference, then route):
//   linear:   logits = x W1^T + b1
//   low rank: logits = act(x W1^T + b1) W2^T + b2
//   mask     = route(logits, budget, min_experts, max_experts)      (route_row.h)
// W1 is read in its storage type (fp32/bf16/fp16, the dtype of x) and widened in registers by
// the routed FFN's dot kernels (kernels.h); x, the hidden vector, the logits and every
// accumulation are fp32. Summation order differs from at::linear and the softmax is computed
// here (std::exp), so a token whose cumulative mass sits within fp32 rounding of its budget
// can get a different mask than backend="torch" (as with the Triton kernel); elsewhere the
// masks are equal. One parallel region per call, over tokens; at decode (a few tokens) the
// call is a handful of microseconds where the unfused path is two at::addmm calls, a GELU,
// a softmax and the route op.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "kernels.h"
#include "op_utils.h"
#include "ops_cpu.h"
#include "route_row.h"

namespace prunepath {
namespace cpu {
namespace {

constexpr const char* kOp = "prunepath::router_route";

void check_small(const std::optional<at::Tensor>& t, const char* name, c10::IntArrayRef shape) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu(), kOp, ": ", name, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), kOp, ": ", name,
              " must be floating point, got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, kOp, ": ", name, " must have shape ", shape, ", got ",
              t->sizes());
}

// softmax of z[0..E) into p, in fp32 with a double sum; NaN anywhere gives NaN everywhere
// (as at::softmax does).
void softmax_row(const float* z, int64_t E, float* p) {
  float zmax = -std::numeric_limits<float>::infinity();
  bool nan = false;
  for (int64_t e = 0; e < E; ++e) {
    nan |= std::isnan(z[e]);
    zmax = std::max(zmax, z[e]);
  }
  if (nan) {
    std::fill(p, p + E, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  double sum = 0.0;
  for (int64_t e = 0; e < E; ++e) {
    p[e] = std::exp(z[e] - zmax);  // +inf logits: inf - inf = NaN, as at::softmax gives
    sum += p[e];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t e = 0; e < E; ++e) p[e] *= inv;
}

}  // namespace

at::Tensor router_route_cpu(const at::Tensor& x, const at::Tensor& w1,
                            const std::optional<at::Tensor>& b1,
                            const std::optional<at::Tensor>& w2,
                            const std::optional<at::Tensor>& b2,
                            c10::string_view hidden_activation, const at::Tensor& budget,
                            int64_t min_experts, int64_t max_experts) {
  const Act act = parse_activation(hidden_activation, kOp, /*allow_none=*/true);
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be 2-D [T, d], got shape ", x.sizes());
  const at::ScalarType dt = x.scalar_type();
  const WType wt = wtype_of(dt, kOp);
  const int64_t T = x.size(0), d = x.size(1);
  TORCH_CHECK(x.is_contiguous(), kOp, ": x must be contiguous");
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == d, kOp, ": w_router must have shape [E or R, d=", d,
              "], got ", w1.sizes());
  TORCH_CHECK(w1.scalar_type() == dt, kOp, ": w_router must have dtype ", dt, " (like x), got ",
              w1.scalar_type());
  TORCH_CHECK(w1.is_contiguous(), kOp, ": w_router must be contiguous");
  const int64_t R = w1.size(0);
  check_small(b1, "b_router", {R});
  TORCH_CHECK(!w2.has_value() || (w2->dim() == 2 && w2->size(1) == R), kOp,
              ": w_router_out must have shape [E, R=", R, "]");
  TORCH_CHECK(w2.has_value() || !b2.has_value(), kOp, ": b_router_out needs w_router_out");
  const int64_t E = w2.has_value() ? w2->size(0) : R;
  check_small(w2, "w_router_out", {E, R});
  check_small(b2, "b_router_out", {E});
  TORCH_CHECK(E >= 1, kOp, ": the router must have at least one expert");
  TORCH_CHECK(budget.dim() == 1 && budget.size(0) == T && budget.scalar_type() == at::kFloat &&
                  budget.is_contiguous() && budget.device().is_cpu(),
              kOp, ": budget must be a contiguous float32 CPU tensor [T=", T, "], got ",
              budget.sizes(), " ", budget.scalar_type());
  TORCH_CHECK(0 <= min_experts && min_experts <= max_experts && max_experts <= E, kOp,
              ": need 0 <= min_experts <= max_experts <= E=", E, ", got min_experts=", min_experts,
              ", max_experts=", max_experts);

  at::Tensor mask = at::zeros({T, E}, x.options().dtype(at::kBool));
  if (T == 0) return mask;
  std::vector<float> xbuf;
  const float* x_ptr = float_values(x, xbuf);
  const at::Tensor w2f = w2.has_value() ? w2->to(at::kFloat).contiguous() : at::Tensor();
  const std::vector<float> b1v = to_float_vector(b1), b2v = to_float_vector(b2);
  const float* b_all = budget.const_data_ptr<float>();
  bool* m_all = mask.data_ptr<bool>();
  const auto segs_dot = segs_dot_kernel();
  const int64_t zero = 0;
  const int64_t macs = R * d + (w2.has_value() ? E * R : 0);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(macs, 1));

  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    const int64_t nt = t1 - t0;
    std::vector<const float*> rows(nt);
    std::vector<float> h(nt * R), logits, p(E);
    std::vector<int32_t> order;
    for (int64_t i = 0; i < nt; ++i) rows[i] = x_ptr + (t0 + i) * d;
    segs_dot(SegsDot{wt, w1.const_data_ptr(), d, R, &zero, &d, &zero, 1, rows.data(), nt,
                     h.data(), R});
    for (int64_t i = 0; i < nt; ++i)
      for (int64_t r = 0; r < R; ++r) {
        float v = h[i * R + r] + (b1v.empty() ? 0.0f : b1v[r]);
        h[i * R + r] = w2.has_value() ? activate(act, v) : v;  // a linear router has no act
      }
    const float* z = h.data();
    if (w2.has_value()) {
      logits.resize(nt * E);
      for (int64_t i = 0; i < nt; ++i) rows[i] = h.data() + i * R;
      segs_dot(SegsDot{WType::F32, w2f.const_data_ptr(), R, E, &zero, &R, &zero, 1, rows.data(),
                       nt, logits.data(), E});
      if (!b2v.empty())
        for (int64_t i = 0; i < nt; ++i)
          for (int64_t e = 0; e < E; ++e) logits[i * E + e] += b2v[e];
      z = logits.data();
    }
    for (int64_t i = 0; i < nt; ++i) {
      softmax_row(z + i * E, E, p.data());
      route_row(p.data(), E, b_all[t0 + i], min_experts, max_experts, order,
                m_all + (t0 + i) * E);
    }
  });
  return mask;
}

TORCH_LIBRARY_IMPL(prunepath, CPU, m) { m.impl("router_route", &router_route_cpu); }

}  // namespace cpu
}  // namespace prunepath
