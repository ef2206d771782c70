// CPU kernel of prunepath::router_routed_ffn (schema in csrc/ops.cpp): prunepath::router_route
// and then prunepath::routed_ffn(_packed) on its mask, as one op. Same results as the two ops
// (it calls their kernels); what it saves is the second call's trip through the dispatcher and
// the graph's wrapper code, once per routed layer and decode step.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "ops_cpu.h"

namespace prunepath {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> router_routed_ffn_cpu(
    const at::Tensor& x, const at::Tensor& w_router, const std::optional<at::Tensor>& b_router,
    const std::optional<at::Tensor>& w_router_out, const std::optional<at::Tensor>& b_router_out,
    c10::string_view hidden_activation, const at::Tensor& budget, int64_t min_experts,
    int64_t max_experts, const std::optional<at::Tensor>& w_gate, const at::Tensor& w_up,
    const at::Tensor& w_down, c10::string_view activation, const std::optional<at::Tensor>& b_up,
    const std::optional<at::Tensor>& b_down, bool packed_down) {
  at::Tensor mask = router_route_cpu(x, w_router, b_router, w_router_out, b_router_out,
                                     hidden_activation, budget, min_experts, max_experts);
  at::Tensor y =
      routed_ffn_any(x, w_gate, w_up, w_down, mask, activation, b_up, b_down, packed_down);
  return {y, mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(prunepath, CPU, m) { m.impl("router_routed_ffn", &router_routed_ffn_cpu); }

}  // namespace cpu
}  // namespace prunepath
