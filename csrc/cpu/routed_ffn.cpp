// CPU kernels of prunepath::routed_ffn and prunepath::routed_ffn_packed (schemas in
// csrc/ops.cpp): the FFN with each token's inactive experts' neurons zeroed, reading only the
// active experts' weights.
//
// Semantics: prunepath/ops/reference.py::routed_ffn_reference. Expert e owns neurons
// [e*B, (e+1)*B), B = F/E: rows of w_gate/w_up ([F, d], contiguous slab of B rows) and
// columns of w_down ([d, F], a strided slab of d rows x B columns), or with the packed
// W_down^T [F, d] (routed_ffn_packed) B contiguous rows, read front to back.
//
// Two paths, same result:
//  * decode (few tokens, T < gather_min_tokens()): the active experts (union over the
//    tokens) are split into one contiguous chunk per OpenMP thread; each chunk
//      1. up/gate: for each of its experts e and each token t that chose e,
//         h[t, e-block] = act(Wg_e x_t) * (Wu_e x_t + b_up_e)   (0 for tokens that did not),
//         reading each weight row once for all its tokens (tiles of up to 4 tokens; for one
//         token of a gated FFN, the W_up and W_gate rows of two of the chunk's experts at
//         once: four memory streams, kernels.h PairBlocks), and
//      2. down: y_chunk[t, i] = sum over runs of consecutive experts of the chunk of
//         Wd[i, run] . h[t, run], for every output row i (8 rows streamed at a time), or
//         packed: y_chunk[t, :] += h[t, n] * Wd^T[n, :] over the chunk's rows n (4 streams,
//         each a quarter of them);
//    then the chunks' partial outputs are summed (+ b_down). One parallel region per call.
//    Weights stay in their dtype (fp32/bf16/fp16) and are widened to fp32 in registers
//    (kernels_avx2.cpp, or kernels_generic.cpp without AVX2); accumulation is fp32.
//  * gather (prefill, T >= gather_min_tokens(), or fp64): at::mm on the weight slices (in fp32
//    for bf16/fp16 weights, fp64 for fp64), per group of consecutive experts chosen by the
//    same tokens (gathering those tokens, index_add into y), or, where that would mean many
//    small products, per run of consecutive active experts with the inactive neurons zeroed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kernels.h"
#include "op_utils.h"
#include "ops_cpu.h"

namespace prunepath {
namespace cpu {
namespace {

// From this many tokens on, the gather path (at::mm per run of experts) beats the decode
// kernels: their down projection computes every token against the union of the tokens'
// experts, and at::mm is the better matrix-matrix kernel. For bf16/fp16 the gather path
// must first widen the weight slices to fp32, so the decode kernels win for longer.
// Measured at d=2048, F=8192, E=64 on 2 threads (sparsity 0.5 and 0.9), see BENCHMARKS.md.
// PRUNEPATH_CPU_GATHER_MIN_TOKENS=N overrides both (tests use it to compare the paths).
int64_t gather_min_tokens(at::ScalarType dtype) {
  if (const char* env = std::getenv("PRUNEPATH_CPU_GATHER_MIN_TOKENS")) return std::atoll(env);
  return dtype == at::kFloat ? 10 : 32;
}

// The decode path uses one thread per this many bytes of active weights (and at most
// torch.get_num_threads()): about 25 us of reading on one core. Was 1 MiB; SmolLM2's FFN
// (576 x 1536, E=96) on a 2-core Xeon, medians of 200 (BENCHMARKS.md, measured 2026-12-04): bf16 at
// 70% 0.27 -> 0.17 ms (1.6 MB of experts had one thread), fp32 at 90% 0.15 -> 0.11 ms, 50%
// unchanged.
constexpr int64_t kMinBytesPerThread = int64_t{1} << 18;

at::Tensor activate(Act act, const at::Tensor& h) {
  switch (act) {
    case Act::Silu: return at::silu(h);
    case Act::Gelu: return at::gelu(h);
    case Act::GeluTanh: return at::gelu(h, "tanh");
    case Act::Relu: return at::relu(h);
    case Act::None: return h;
  }
  return h;
}

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                  c10::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "prunepath::routed_ffn: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "prunepath::routed_ffn: ", name, " must have dtype ", dtype,
              " (like x), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "prunepath::routed_ffn: ", name, " must have shape ", shape,
              ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "prunepath::routed_ffn: ", name, " must be contiguous");
}

struct Ffn {
  const at::Tensor& x;
  const std::optional<at::Tensor>& w_gate;
  const at::Tensor& w_up;
  const at::Tensor& w_down;
  const at::Tensor& mask;
  Act act;
  const std::optional<at::Tensor>& b_up;
  const std::optional<at::Tensor>& b_down;
  int64_t T, d, F, E, B;
  // W_down came as a contiguous W_down^T [F, d]: w_down is that tensor on the decode path
  // (which reads the storage), its [d, F] view on the gather path
  bool packed;
};

// ------------------------------------------------------------------------------ decode path

// What the decode path reads: the active experts and, per active expert, its tokens.
struct DecodePlan {
  std::vector<int64_t> active;   // expert ids chosen by at least one token, ascending
  std::vector<int64_t> tok_ptr;  // tokens of active expert k: tok_id[tok_ptr[k] .. tok_ptr[k+1])
  std::vector<int64_t> tok_id;
};

DecodePlan plan_decode(const at::Tensor& mask) {
  const int64_t T = mask.size(0), E = mask.size(1);
  const bool* m = mask.const_data_ptr<bool>();
  DecodePlan p;
  p.tok_ptr.push_back(0);
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t t = 0; t < T; ++t)
      if (m[t * E + e]) p.tok_id.push_back(t);
    if (static_cast<int64_t>(p.tok_id.size()) > p.tok_ptr.back()) {
      p.active.push_back(e);
      p.tok_ptr.push_back(static_cast<int64_t>(p.tok_id.size()));
    }
  }
  return p;
}

struct Segments {
  std::vector<int64_t> col, len, off;
  int64_t size() const { return static_cast<int64_t>(col.size()); }
};

// Runs of consecutive experts among active[k0, k1): the column segments of w_down to read,
// with their offsets in a compact h whose column 0 is expert active[k0]'s first neuron.
Segments runs_of(const std::vector<int64_t>& active, int64_t k0, int64_t k1, int64_t B) {
  Segments s;
  for (int64_t k = k0; k < k1; ++k) {
    if (k > k0 && active[k] == active[k - 1] + 1) {
      s.len.back() += B;
    } else {
      s.col.push_back(active[k] * B);
      s.len.push_back(B);
      s.off.push_back((k - k0) * B);
    }
  }
  return s;
}

at::Tensor routed_ffn_decode(const Ffn& f) {
  const int64_t T = f.T, d = f.d, F = f.F, B = f.B;
  const WType wt = wtype_of(f.x.scalar_type(), "prunepath::routed_ffn");
  const int64_t esz = wtype_size(wt);
  const auto segs_dot = segs_dot_kernel();
  const auto segs_axpy = segs_axpy_kernel();
  const auto pair_blocks = pair_blocks_kernel();
  const DecodePlan plan = plan_decode(f.mask);
  const int64_t n_active = static_cast<int64_t>(plan.active.size());

  std::vector<float> xbuf;
  const float* x_ptr = float_values(f.x, xbuf);
  const std::vector<float> b_up = to_float_vector(f.b_up);
  const std::vector<float> b_down = to_float_vector(f.b_down);
  const bool gated = f.w_gate.has_value();
  const char* wu = static_cast<const char*>(f.w_up.const_data_ptr());
  const char* wg = gated ? static_cast<const char*>(f.w_gate->const_data_ptr()) : nullptr;
  const char* wd = static_cast<const char*>(f.w_down.const_data_ptr());
  const int64_t zero = 0;  // the single segment of a w_up/w_gate row: columns [0, d)

  // neuron n's h from its up and gate products: act(g) * (u + b_up[n]), or act(u + b_up[n])
  auto hidden = [&](float u, float g, int64_t n) {
    if (!b_up.empty()) u += b_up[n];
    return gated ? activate(f.act, g) * u : activate(f.act, u);
  };

  // h[t, c] for the B neurons of active expert k (c = col0 + j): the tokens that chose k
  // get act(Wg x) * (Wu x + b_up), the others keep the 0 already there.
  auto expert_hidden = [&](int64_t k, float* h, int64_t ldh, int64_t col0,
                           std::vector<float>& ubuf, std::vector<float>& gbuf,
                           std::vector<const float*>& xs) {
    const int64_t r0 = plan.active[k] * B;
    const int64_t* toks = plan.tok_id.data() + plan.tok_ptr[k];
    const int64_t nt = plan.tok_ptr[k + 1] - plan.tok_ptr[k];
    xs.resize(nt);
    for (int64_t i = 0; i < nt; ++i) xs[i] = x_ptr + toks[i] * d;
    ubuf.resize(nt * B);
    SegsDot up{wt, wu + r0 * d * esz, d, B, &zero, &d, &zero, 1, xs.data(), nt, ubuf.data(), B};
    if (gated) {  // W_gate's rows go with W_up's (one token: row by row together, kernels.h)
      gbuf.resize(nt * B);
      up.w2 = wg + r0 * d * esz;
      up.out2 = gbuf.data();
    }
    segs_dot(up);
    for (int64_t i = 0; i < nt; ++i) {
      float* h_row = h + toks[i] * ldh + col0;
      for (int64_t j = 0; j < B; ++j)
        h_row[j] = hidden(ubuf[i * B + j], gated ? gbuf[i * B + j] : 0.0f, r0 + j);
    }
  };

  // One token, gated: h for the active experts [k0, k1) at once (pair_blocks reads two
  // experts' W_up and W_gate rows together).
  auto chunk_hidden = [&](int64_t k0, int64_t k1, float* h, std::vector<float>& ubuf,
                          std::vector<float>& gbuf, std::vector<const void*>& wptrs) {
    const int64_t nb = k1 - k0;
    ubuf.resize(nb * B);
    gbuf.resize(nb * B);
    wptrs.resize(2 * nb);
    for (int64_t i = 0; i < nb; ++i) {
      const int64_t off = plan.active[k0 + i] * B * d * esz;
      wptrs[i] = wu + off;
      wptrs[nb + i] = wg + off;
    }
    pair_blocks(PairBlocks{wt, wptrs.data(), wptrs.data() + nb, d, B, nb, x_ptr, ubuf.data(),
                           gbuf.data()});
    for (int64_t i = 0; i < nb; ++i) {
      const int64_t r0 = plan.active[k0 + i] * B;
      for (int64_t j = 0; j < B; ++j)
        h[i * B + j] = hidden(ubuf[i * B + j], gbuf[i * B + j], r0 + j);
    }
  };

  // The active experts are split into one contiguous chunk per thread. Each chunk computes
  // its experts' h and their share of the down projection, y_c = Wd[:, chunk] h_chunk, over
  // all d rows; the partial outputs are summed at the end. One parallel region per call, and
  // h never leaves the core that computed it. Each thread gets at least kMinBytesPerThread
  // of weights: waking a thread costs microseconds on an idle machine, and a whole
  // scheduler time slice on a busy one.
  const int64_t expert_bytes = (gated ? 3 : 2) * B * d * esz;
  const int64_t n_chunks = std::max<int64_t>(
      1, std::min({static_cast<int64_t>(at::get_num_threads()), n_active,
                   n_active * expert_bytes / kMinBytesPerThread}));
  std::vector<float> y_part(static_cast<size_t>(n_chunks * T * d), 0.0f);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> h, ubuf, gbuf;
    std::vector<const float*> xs, hs(T);
    std::vector<const void*> wptrs;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t k0 = n_active * c / n_chunks, k1 = n_active * (c + 1) / n_chunks;
      if (k0 == k1) continue;
      const int64_t ldh = (k1 - k0) * B;
      h.assign(static_cast<size_t>(T * ldh), 0.0f);
      if (T == 1 && gated) {
        chunk_hidden(k0, k1, h.data(), ubuf, gbuf, wptrs);
      } else {
        for (int64_t k = k0; k < k1; ++k)
          expert_hidden(k, h.data(), ldh, (k - k0) * B, ubuf, gbuf, xs);
      }
      const Segments seg = runs_of(plan.active, k0, k1, B);
      for (int64_t t = 0; t < T; ++t) hs[t] = h.data() + t * ldh;
      if (f.packed) {  // the run's rows of W_down^T; y_part starts at 0
        SegsAxpy down{wt, wd, d, d, seg.col.data(), seg.len.data(), seg.off.data(), seg.size(),
                      hs.data(), T, y_part.data() + c * T * d, d};
        segs_axpy(down);
      } else {
        SegsDot down{wt, wd, F, d, seg.col.data(), seg.len.data(), seg.off.data(), seg.size(),
                     hs.data(), T, y_part.data() + c * T * d, d};
        segs_dot(down);
      }
    }
  });

  // y = sum of the chunks' partial outputs + b_down, in x's dtype.
  at::Tensor out = at::empty({T, d}, f.x.options());
  at::parallel_for(0, T * d, 8192, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float v = b_down.empty() ? 0.0f : b_down[i % d];
      for (int64_t c = 0; c < n_chunks; ++c) v += y_part[c * T * d + i];
      y_part[i] = v;
    }
  });
  store_floats(y_part.data(), out);
  return out;
}

// ------------------------------------------------------------------------------ gather path

// One at:: op costs about as much as this many multiply-adds (a few microseconds): the gather
// path weighs it against the multiply-adds that skipping inactive experts saves.
constexpr double kOpOverheadMacs = 2e5;

// h = act(x Wg[cols]^T) * (x Wu[cols]^T + b_up[cols]) and its contribution h Wd[:, cols]^T,
// for the neuron columns [c0, c0 + nc) and the tokens `xe` (compute dtype).
at::Tensor block_ffn(const Ffn& f, const at::Tensor& xe, int64_t c0, int64_t nc,
                     at::ScalarType cdt, const at::Tensor& neuron_mask) {
  at::Tensor u = at::mm(xe, f.w_up.narrow(0, c0, nc).to(cdt).t());
  if (f.b_up.has_value()) u.add_(f.b_up->narrow(0, c0, nc).to(cdt));
  at::Tensor h = f.w_gate.has_value()
      ? activate(f.act, at::mm(xe, f.w_gate->narrow(0, c0, nc).to(cdt).t())).mul_(u)
      : activate(f.act, u);
  if (neuron_mask.defined()) h.mul_(neuron_mask);
  return at::mm(h, f.w_down.narrow(1, c0, nc).to(cdt).t());
}

// For each run of consecutive experts that some token chose, either
//  * per group: split the run into groups of consecutive experts chosen by the same tokens,
//    gather those tokens and multiply by the group's weight slices (only chosen work), or
//  * masked: multiply every token by the whole run and zero the inactive neurons
//    (fewer, larger matrix products),
// whichever costs fewer multiply-adds, counting kOpOverheadMacs per at:: op.
at::Tensor routed_ffn_gather(const Ffn& f) {
  const int64_t T = f.T, E = f.E, B = f.B, d = f.d;
  const at::ScalarType cdt = f.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xc = f.x.to(cdt);
  at::Tensor y = at::zeros({T, d}, f.x.options().dtype(cdt));
  const bool* m = f.mask.const_data_ptr<bool>();
  const double macs_per_token_expert = (f.w_gate.has_value() ? 3.0 : 2.0) * d * B;
  const double ops_per_block = f.w_gate.has_value() ? 8.0 : 6.0;

  auto chosen_by_any = [&](int64_t e) {
    for (int64_t t = 0; t < T; ++t)
      if (m[t * E + e]) return true;
    return false;
  };
  auto same_tokens = [&](int64_t e1, int64_t e2) {
    for (int64_t t = 0; t < T; ++t)
      if (m[t * E + e1] != m[t * E + e2]) return false;
    return true;
  };
  auto tokens_of = [&](int64_t e) {
    std::vector<int64_t> toks;
    for (int64_t t = 0; t < T; ++t)
      if (m[t * E + e]) toks.push_back(t);
    return toks;
  };

  for (int64_t r0 = 0; r0 < E;) {
    if (!chosen_by_any(r0)) {
      ++r0;
      continue;
    }
    int64_t r1 = r0 + 1;
    while (r1 < E && chosen_by_any(r1)) ++r1;
    // groups of the run [r0, r1) with identical token sets
    std::vector<std::pair<int64_t, int64_t>> groups;
    double cost_groups = 0.0;
    for (int64_t g0 = r0; g0 < r1;) {
      int64_t g1 = g0 + 1;
      while (g1 < r1 && same_tokens(g0, g1)) ++g1;
      const auto n = static_cast<double>(tokens_of(g0).size());
      cost_groups += n * (g1 - g0) * macs_per_token_expert + (ops_per_block + 2) * kOpOverheadMacs;
      groups.emplace_back(g0, g1);
      g0 = g1;
    }
    const double cost_masked = static_cast<double>(T) * (r1 - r0) * macs_per_token_expert +
                               (ops_per_block + 2) * kOpOverheadMacs;
    if (groups.size() > 1 && cost_masked <= cost_groups) {
      const at::Tensor neuron_mask =
          f.mask.narrow(1, r0, r1 - r0).repeat_interleave(B, 1).to(cdt);
      y.add_(block_ffn(f, xc, r0 * B, (r1 - r0) * B, cdt, neuron_mask));
    } else {
      for (const auto& [g0, g1] : groups) {
        std::vector<int64_t> toks = tokens_of(g0);
        const auto n = static_cast<int64_t>(toks.size());
        if (n == T) {
          y.add_(block_ffn(f, xc, g0 * B, (g1 - g0) * B, cdt, at::Tensor()));
        } else {
          const at::Tensor idx = at::from_blob(toks.data(), {n}, at::kLong).clone();
          y.index_add_(0, idx, block_ffn(f, xc.index_select(0, idx), g0 * B, (g1 - g0) * B, cdt,
                                         at::Tensor()));
        }
      }
    }
    r0 = r1;
  }
  if (f.b_down.has_value()) y.add_(f.b_down->to(cdt));
  return y.to(f.x.scalar_type());
}

}  // namespace

// ------------------------------------------------------------------------------ entry point

// w_down: [d, F] contiguous, or packed: W_down^T [F, d] contiguous (declared in ops_cpu.h).
at::Tensor routed_ffn_any(const at::Tensor& x, const std::optional<at::Tensor>& w_gate,
                          const at::Tensor& w_up, const at::Tensor& w_down, const at::Tensor& mask,
                          c10::string_view activation, const std::optional<at::Tensor>& b_up,
                          const std::optional<at::Tensor>& b_down, bool packed) {
  const Act act = parse_activation(activation, "prunepath::routed_ffn", /*allow_none=*/false);
  TORCH_CHECK(x.dim() == 2, "prunepath::routed_ffn: x must be 2-D [T, d], got shape ", x.sizes());
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
              "prunepath::routed_ffn: x must be float32, bfloat16, float16 or float64, got ", dt);
  const int64_t T = x.size(0), d = x.size(1);
  check_tensor(x, "x", dt, {T, d});
  TORCH_CHECK(w_up.dim() == 2, "prunepath::routed_ffn: w_up must be 2-D [F, d], got shape ",
              w_up.sizes());
  const int64_t F = w_up.size(0);
  check_tensor(w_up, "w_up", dt, {F, d});
  if (w_gate.has_value()) check_tensor(*w_gate, "w_gate", dt, {F, d});
  if (packed) {
    check_tensor(w_down, "w_down_t", dt, {F, d});
  } else {
    check_tensor(w_down, "w_down", dt, {d, F});
  }
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == T,
              "prunepath::routed_ffn: mask must be 2-D [T=", T, ", E], got shape ", mask.sizes());
  const int64_t E = mask.size(1);
  check_tensor(mask, "mask", at::kBool, {T, E});
  TORCH_CHECK(E >= 1 && F % E == 0, "prunepath::routed_ffn: F=", F,
              " must be divisible by the number of experts E=", E, " (mask.size(1))");
  if (b_up.has_value()) check_tensor(*b_up, "b_up", dt, {F});
  if (b_down.has_value()) check_tensor(*b_down, "b_down", dt, {d});

  if (T == 0) return at::empty({0, d}, x.options());
  if (dt == at::kDouble || T >= gather_min_tokens(dt)) {
    const at::Tensor w_down_dF = packed ? w_down.t() : w_down;  // [d, F] (a view when packed)
    return routed_ffn_gather(
        Ffn{x, w_gate, w_up, w_down_dF, mask, act, b_up, b_down, T, d, F, E, F / E, packed});
  }
  // the decode path reads w_down's storage as it is ([d, F], or packed W_down^T [F, d])
  return routed_ffn_decode(
      Ffn{x, w_gate, w_up, w_down, mask, act, b_up, b_down, T, d, F, E, F / E, packed});
}

namespace {

at::Tensor routed_ffn_cpu(const at::Tensor& x, const std::optional<at::Tensor>& w_gate,
                          const at::Tensor& w_up, const at::Tensor& w_down, const at::Tensor& mask,
                          c10::string_view activation, const std::optional<at::Tensor>& b_up,
                          const std::optional<at::Tensor>& b_down) {
  return routed_ffn_any(x, w_gate, w_up, w_down, mask, activation, b_up, b_down, false);
}

at::Tensor routed_ffn_packed_cpu(const at::Tensor& x, const std::optional<at::Tensor>& w_gate,
                                 const at::Tensor& w_up, const at::Tensor& w_down_t,
                                 const at::Tensor& mask, c10::string_view activation,
                                 const std::optional<at::Tensor>& b_up,
                                 const std::optional<at::Tensor>& b_down) {
  return routed_ffn_any(x, w_gate, w_up, w_down_t, mask, activation, b_up, b_down, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(prunepath, CPU, m) {
  m.impl("routed_ffn", &routed_ffn_cpu);
  m.impl("routed_ffn_packed", &routed_ffn_packed_cpu);
}

}  // namespace cpu
}  // namespace prunepath
