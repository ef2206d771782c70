// The CPU ops' entry points that other CPU ops call directly (no dispatcher round trip):
// router_routed_ffn.cpp runs the router and the routed FFN as one op.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace prunepath {
namespace cpu {

// prunepath::router_route (router_route.cpp): bool mask [T, E].
at::Tensor router_route_cpu(const at::Tensor& x, const at::Tensor& w1,
                            const std::optional<at::Tensor>& b1,
                            const std::optional<at::Tensor>& w2,
                            const std::optional<at::Tensor>& b2,
                            c10::string_view hidden_activation, const at::Tensor& budget,
                            int64_t min_experts, int64_t max_experts);

// prunepath::routed_ffn (packed = false: w_down [d, F]) and prunepath::routed_ffn_packed
// (packed = true: w_down = W_down^T [F, d]) (routed_ffn.cpp): [T, d].
at::Tensor routed_ffn_any(const at::Tensor& x, const std::optional<at::Tensor>& w_gate,
                          const at::Tensor& w_up, const at::Tensor& w_down, const at::Tensor& mask,
                          c10::string_view activation, const std::optional<at::Tensor>& b_up,
                          const std::optional<at::Tensor>& b_down, bool packed);

}  // namespace cpu
}  // namespace prunepath
