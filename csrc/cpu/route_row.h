// One token's cumulative-mass routing over its softmax probabilities, shared by the CPU
// ops route (route.cpp) and router_route (router_route.cpp). Semantics:
// prunepath/ops/reference.py::route_reference:
//   sorted, ord = stable descending sort of p                  (ties toward the lower index;
//                                                               NaN ranks above every number)
//   mass_before = float(cumsum(sorted)) - sorted               (cumsum accumulated in double,
//                                                               rounded to fp32, as ATen's CPU
//                                                               cumsum does; subtraction in fp32)
//   count       = #{k : mass_before[k] < budget or budget >= 1}, clamped to [lo, hi]
//   m[ord[k]]   = true for k < count                           (m must be all false before)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace prunepath {
namespace cpu {

inline void route_row(const float* p, int64_t E, float budget, int64_t lo, int64_t hi,
                      std::vector<int32_t>& order, bool* m) {
  order.resize(E);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [p](int32_t a, int32_t b) {
    const float pa = p[a], pb = p[b];
    return (std::isnan(pa) && !std::isnan(pb)) || pa > pb;
  });
  const bool every = budget >= 1.0f;
  double cum = 0.0;
  int64_t count = 0;
  for (int64_t k = 0; k < E; ++k) {
    const float pk = p[order[k]];
    cum += pk;
    const float mass_before = static_cast<float>(cum) - pk;
    count += (every || mass_before < budget) ? 1 : 0;
  }
  count = std::min(std::max(count, lo), hi);
  for (int64_t k = 0; k < count; ++k) m[order[k]] = true;
}

}  // namespace cpu
}  // namespace prunepath
