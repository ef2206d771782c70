// CPU kernel of prunepath::linear (schema in csrc/ops.cpp): y = x W^T + b for a few tokens,
// the matrix-vector products of a decode step (attention projections, lm_head, a dense FFN).
// Same kernels as the routed FFN (kernels.h): W is read once in its storage type
// (fp32/bf16/fp16) and widened in registers, accumulation in fp32.
//  * W [N, d] contiguous (nn.Linear): dot products, the rows of W split over the OpenMP
//    threads in slabs of >= 1 MiB. On 2 Zen 3 cores this streams an fp32 weight at ~1.8x the
//    rate of at::linear's GEMV (BENCHMARKS.md).
//  * W the [N, d] view of a contiguous W^T [d, N] (a packed W_down, prunepath.packed_down):
//    row-weighted sums y[t, :] += x[t, k] W^T[k, :], the rows k split over the threads, each
//    thread summing into its own fp32 partial output, the partials added at the end.
// More than kMaxTokens tokens (and fp64, other strides) go to at::linear: a matrix-matrix
// product is at::mm's job.
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

// out[t, n] = W[n, :] . x[t, :] for W [N, d] contiguous: the rows of W split over the threads.
void linear_rows(WType wt, const char* wp, const std::vector<const float*>& rows, int64_t d,
                 int64_t N, float* out) {
  const int64_t esz = wtype_size(wt);
  const int64_t T = static_cast<int64_t>(rows.size());
  const auto segs_dot = segs_dot_kernel();
  const int64_t zero = 0;
  const int64_t grain = std::max<int64_t>(8, kMinBytesPerThread / std::max<int64_t>(1, d * esz));
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    segs_dot(SegsDot{wt, wp + r0 * d * esz, d, r1 - r0, &zero, &d, &zero, 1, rows.data(), T,
                     out + r0, N});
  });
}

// out[t, :] = sum_k x[t, k] Wt[k, :] for Wt [d, N] contiguous: each of up to
// get_num_threads() chunks of >= kMinBytesPerThread of rows k sums into its own fp32 partial
// [T, N] (chunk 0 into out itself), the partials added in the end.
void linear_transposed(WType wt, const char* wp, const std::vector<const float*>& rows,
                       int64_t d, int64_t N, float* out) {
  const int64_t esz = wtype_size(wt);
  const int64_t T = static_cast<int64_t>(rows.size());
  const auto segs_axpy = segs_axpy_kernel();
  const int64_t rows_per = std::max<int64_t>(8, kMinBytesPerThread / std::max<int64_t>(1, N * esz));
  const int64_t n_chunks =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (d + rows_per - 1) / rows_per));
  std::vector<float> partial((n_chunks - 1) * T * N);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t k0 = d * c / n_chunks, k1 = d * (c + 1) / n_chunks, len = k1 - k0;
      float* o = c == 0 ? out : partial.data() + (c - 1) * T * N;
      std::fill(o, o + T * N, 0.0f);
      std::vector<const float*> h(T);
      for (int64_t t = 0; t < T; ++t) h[t] = rows[t] + k0;
      const int64_t zero = 0;
      segs_axpy(SegsAxpy{wt, wp + k0 * N * esz, N, N, &zero, &len, &zero, 1, h.data(), T, o, N});
    }
  });
  for (int64_t c = 1; c < n_chunks; ++c) {
    const float* p = partial.data() + (c - 1) * T * N;
    for (int64_t i = 0; i < T * N; ++i) out[i] += p[i];
  }
}

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
  const bool transposed = !w.is_contiguous() && w.t().is_contiguous();
  if (dt == at::kDouble || T > kMaxTokens || !(w.is_contiguous() || transposed))
    return at::linear(x, w, b);
  const WType wt = wtype_of(dt, kOp);
  at::Tensor out = at::empty({T, N}, x.options());
  if (T == 0 || N == 0) return out;
  const at::Tensor xc = x.contiguous();
  std::vector<float> xbuf, ybuf;
  const float* xf = float_values(xc, xbuf);
  std::vector<const float*> rows(T);
  for (int64_t t = 0; t < T; ++t) rows[t] = xf + t * d;
  // fp32 results go straight into out; bf16/fp16 ones through an fp32 buffer
  if (dt != at::kFloat) ybuf.resize(static_cast<size_t>(T * N));
  float* y = dt == at::kFloat ? out.data_ptr<float>() : ybuf.data();
  const char* wp = static_cast<const char*>(w.const_data_ptr());
  if (transposed) {
    linear_transposed(wt, wp, rows, d, N, y);
  } else {
    linear_rows(wt, wp, rows, d, N, y);
  }
  if (b.has_value()) {
    const std::vector<float> bf = to_float_vector(b);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < N; ++n) y[t * N + n] += bf[n];
  }
  if (dt != at::kFloat) store_floats(y, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(prunepath, CPU, m) { m.impl("linear", &linear_cpu); }

}  // namespace cpu
}  // namespace prunepath
