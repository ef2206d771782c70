// CPU kernel of prunepath::route (schema in csrc/ops.cpp): cumulative-mass expert routing.
//
// Semantics are those of prunepath/ops/reference.py::route_reference, reproduced bit for bit:
//   probs       = softmax(float(logits))                      (ATen's softmax, see below)
//   sorted, ord = stable descending sort of probs              (ties toward the lower index)
//   mass_before = float(cumsum(sorted)) - sorted               (cumsum accumulated in double,
//                                                              rounded to fp32, as ATen's CPU
//                                                              cumsum does; the subtraction in fp32)
//   count       = #{k : mass_before[k] < budget or budget >= 1}, clamped to [min, max]
//   mask[ord[k]] = k < count
// The softmax is computed by ATen itself: its vectorized exp differs in the last bit from
// any hand-written one, and a last-bit difference can flip an expert at the budget boundary.
// Sorting, the cumulative mass and the mask are fused into one pass per token (route_row.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "route_row.h"

namespace prunepath {
namespace cpu {
namespace {

at::Tensor route_cpu(const at::Tensor& logits, const at::Tensor& budget, int64_t min_experts,
                     int64_t max_experts) {
  TORCH_CHECK(logits.dim() == 2, "prunepath::route: logits must be 2-D [T, E], got shape ",
              logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "prunepath::route: logits must be a floating-point tensor, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.is_contiguous(), "prunepath::route: logits must be contiguous");
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(E >= 1, "prunepath::route: logits must have at least one expert (E >= 1)");
  TORCH_CHECK(budget.dim() == 1 && budget.size(0) == T,
              "prunepath::route: budget must be a 1-D [T] tensor with T=", T, ", got shape ",
              budget.sizes());
  TORCH_CHECK(budget.scalar_type() == at::kFloat,
              "prunepath::route: budget must be float32, got ", budget.scalar_type());
  TORCH_CHECK(budget.is_contiguous(), "prunepath::route: budget must be contiguous");
  TORCH_CHECK(budget.device() == logits.device(),
              "prunepath::route: budget and logits must be on the same device");
  TORCH_CHECK(0 <= min_experts && min_experts <= max_experts && max_experts <= E,
              "prunepath::route: need 0 <= min_experts <= max_experts <= E=", E, ", got min_experts=",
              min_experts, ", max_experts=", max_experts);

  const at::Tensor probs = at::softmax(logits.to(at::kFloat), -1).contiguous();
  at::Tensor mask = at::zeros({T, E}, logits.options().dtype(at::kBool));
  if (T == 0) return mask;

  const float* p_all = probs.const_data_ptr<float>();
  const float* b_all = budget.const_data_ptr<float>();
  bool* m_all = mask.data_ptr<bool>();
  const int64_t grain = std::max<int64_t>(1, 16384 / E);

  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    std::vector<int32_t> order;
    for (int64_t t = t0; t < t1; ++t)
      route_row(p_all + t * E, E, b_all[t], min_experts, max_experts, order, m_all + t * E);
  });
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(prunepath, CPU, m) { m.impl("route", &route_cpu); }

}  // namespace cpu
}  // namespace prunepath
