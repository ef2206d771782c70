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
//
// Up to kSortBelow experts (and for rows holding a NaN) the row is sorted. Above, no sort: a
// quickselect on the order (value descending, index ascending: the stable sort's order) finds the
// crossing expert, deciding at each pivot from the double sum of the experts ranked above it --
// the same sums as the sorted cumsum, added in another order (equal unless a sum of these fp32
// values is inexact in double and rounds across an fp32 step at the budget). Expected O(E).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace prunepath {
namespace cpu {

constexpr int64_t kSortBelow = 256;

// the routing order: NaN first, then larger probability, then lower index
struct RankAbove {
  const float* p;
  bool operator()(int32_t a, int32_t b) const {
    const float pa = p[a], pb = p[b];
    const bool na = std::isnan(pa), nb = std::isnan(pb);
    if (na != nb) return na;
    if (pa != pb && !na) return pa > pb;
    return a < b;
  }
};

inline void route_row_sorted(const float* p, int64_t E, float budget, int64_t lo, int64_t hi,
                             std::vector<int32_t>& order, bool* m) {
  std::sort(order.begin(), order.end(), RankAbove{p});
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

// count of the cumulative-mass rule (before clamping) by quickselect; leaves order[0, count)
// holding exactly the experts ranked first (in no particular order among themselves)
inline int64_t mass_count_select(const float* p, float budget, std::vector<int32_t>& order) {
  const RankAbove above{p};
  int64_t lo = 0, hi = static_cast<int64_t>(order.size());  // undecided: order[lo, hi)
  double cum_above = 0.0;                                  // mass of order[0, lo)
  while (lo < hi) {
    // median of three as pivot, moved to order[hi - 1]
    const int64_t mid = lo + (hi - lo) / 2;
    int32_t a = order[lo], b = order[mid], c = order[hi - 1];
    int64_t piv = (above(a, b) == above(b, c)) ? mid : ((above(b, a) == above(a, c)) ? lo : hi - 1);
    std::swap(order[piv], order[hi - 1]);
    const int32_t pv = order[hi - 1];
    // partition: experts ranked above the pivot to the front of the range
    int64_t store = lo;
    double s_before = 0.0;
    for (int64_t k = lo; k < hi - 1; ++k) {
      if (above(order[k], pv)) {
        s_before += p[order[k]];
        std::swap(order[k], order[store++]);
      }
    }
    std::swap(order[store], order[hi - 1]);  // the pivot at its rank
    const float ppv = p[pv];
    const float mass_before = static_cast<float>(cum_above + s_before + ppv) - ppv;
    if (mass_before < budget) {  // the pivot and everything ranked above it are taken
      cum_above += s_before + ppv;
      lo = store + 1;
    } else {  // the pivot and everything ranked below it are not
      hi = store;
    }
  }
  return lo;
}

inline void route_row(const float* p, int64_t E, float budget, int64_t lo, int64_t hi,
                      std::vector<int32_t>& order, bool* m) {
  order.resize(E);
  std::iota(order.begin(), order.end(), 0);
  bool has_nan = false;
  if (E >= kSortBelow) {
    for (int64_t k = 0; k < E && !has_nan; ++k) has_nan = std::isnan(p[k]);
  }
  if (E < kSortBelow || has_nan) {
    route_row_sorted(p, E, budget, lo, hi, order, m);
    return;
  }
  int64_t count = budget >= 1.0f ? E : mass_count_select(p, budget, order);
  const int64_t clamped = std::min(std::max(count, lo), hi);
  if (clamped != count) {  // the first `clamped` experts in the routing order instead
    std::iota(order.begin(), order.end(), 0);
    if (clamped > 0 && clamped < E)
      std::nth_element(order.begin(), order.begin() + (clamped - 1), order.end(), RankAbove{p});
  }
  for (int64_t k = 0; k < clamped; ++k) m[order[k]] = true;
}

}  // namespace cpu
}  // namespace prunepath
