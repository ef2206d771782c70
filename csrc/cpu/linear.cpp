// CPU kernel of prunepath::linear (schema in csrc/ops.cpp): y = x W^T + b for a few tokens,
// the matrix-vector products of a decode step outside the FFN (attention projections,
// lm_head). Same dot kernels as the routed FFN (kernels.h): W is read once in its storage
// type (fp32/bf16/fp16) and widened in registers, accumulation in fp32, the rows of W split
// over the OpenMP threads in slabs of >= 1 MiB. On 2 Zen 3 cores this streams an fp32 weight
// at ~1.8x the rate of at::linear's GEMV (BENCHMARKS.md). More than kMaxTokens tokens (and
// fp64) go to at::linear: a matrix-matrix product is at::mm's job.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "kernels.h"
#include "op_utils.h"

namespace prunepath {
namespace cpu {
namespace {

constexpr const char* kOp = "prunepath::linear";
constexpr int64_t kMaxTokens = 8;
constexpr int64_t kMinBytesPerThread = int64_t{1} << 20;

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be 2-D [T, d], got shape ", x.sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), kOp, ": weight must have shape [N, d=",
              x.size(1), "], got ", w.sizes());
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(w.scalar_type() == dt, kOp, ": weight must have dtype ", dt, " (like x), got ",
              w.scalar_type());
  const int64_t T = x.size(0), d = x.size(1), N = w.size(0);
  if (b.has_value())
    TORCH_CHECK(b->dim() == 1 && b->size(0) == N && b->scalar_type() == dt, kOp,
                ": bias must be a [N=", N, "] tensor of dtype ", dt, ", got ", b->sizes(), " ",
                b->scalar_type());
  if (dt == at::kDouble || T > kMaxTokens || !w.is_contiguous()) return at::linear(x, w, b);
  const WType wt = wtype_of(dt, kOp);
  const int64_t esz = wtype_size(wt);
  at::Tensor out = at::empty({T, N}, x.options().dtype(at::kFloat));
  if (T == 0 || N == 0) return out.to(dt);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  std::vector<const float*> rows(T);
  for (int64_t t = 0; t < T; ++t) rows[t] = xf.const_data_ptr<float>() + t * d;
  const auto segs_dot = segs_dot_kernel();
  const char* wp = static_cast<const char*>(w.const_data_ptr());
  float* op = out.data_ptr<float>();
  const int64_t zero = 0;
  const int64_t grain = std::max<int64_t>(8, kMinBytesPerThread / std::max<int64_t>(1, d * esz));
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    segs_dot(SegsDot{wt, wp + r0 * d * esz, d, r1 - r0, &zero, &d, &zero, 1, rows.data(), T,
                     op + r0, N});
  });
  if (b.has_value()) out.add_(b->to(at::kFloat));
  return dt == at::kFloat ? out : out.to(dt);
}

}  // namespace

TORCH_LIBRARY_IMPL(prunepath, CPU, m) { m.impl("linear", &linear_cpu); }

}  // namespace cpu
}  // namespace prunepath
