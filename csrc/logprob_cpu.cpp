// CPU path: per chunk of token rows, one ATen GEMM for the logits (fp32 accumulation, fp64
// for fp64 inputs), a fused row epilogue over torch's intra-op threads, and in backward the
// dZ written over the logits buffer followed by the two ATen GEMMs for dH and dW.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers: a much faster build
#include "logprob.h"
#include "grad_epilogue.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

// The epilogue is bound by exp; per-ISA clones (picked at load time by CPU feature, so AMD
// and Intel alike) let GCC vectorise it with AVX-512 / AVX2 while the extension itself stays
// built for the baseline ISA. ~10x faster than the baseline build of the same loops.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MIO_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MIO_ISA_CLONES
#endif

namespace mio {

WorkspaceStats& last_stats() {
  static WorkspaceStats stats;
  return stats;
}

int64_t chunk_rows_for(int64_t budget_bytes, int64_t vocab, int64_t elem_size, int64_t n_rows) {
  const int64_t row_bytes = std::max<int64_t>(1, vocab * elem_size);
  const int64_t rows = std::max<int64_t>(1, budget_bytes / row_bytes);
  return std::max<int64_t>(1, std::min(rows, n_rows));
}

// Z = Hc @ W^T (+ b), in blocks of kLogitsColumns vocabulary columns: with a chunk's few rows the
// BLAS packs all of W per call and streams it from memory; a block of W stays in cache while
// its columns of Z are written (measured 1.2x at 242 rows, H = 256, V = 32000 and 1.8x at 64
// rows, H = 1024, on 2 AVX2 cores). Each block's GEMM writes its strided view of Z in place.
constexpr int64_t kLogitsColumns = 512;
void chunk_logits(at::Tensor& Z, const at::Tensor& Hc, const at::Tensor& Wa, const at::Tensor& ba) {
  const int64_t V = Wa.size(0);
  for (int64_t v0 = 0; v0 < V; v0 += kLogitsColumns) {
    const int64_t cols = std::min(kLogitsColumns, V - v0);
    at::Tensor Zb = Z.narrow(1, v0, cols);
    const at::Tensor Wb = Wa.narrow(0, v0, cols).t();
    if (ba.defined())
      at::addmm_out(Zb, ba.narrow(0, v0, cols), Hc, Wb);
    else
      at::mm_out(Zb, Hc, Wb);
  }
}

namespace {

constexpr int kLanes = 16;

// expf, denormal results included: on [-104, -87) as exp(x + 20) * exp(-20), 0 below -104 (not a
// floor of exp(-87): the entropy's moment sums exp(d) * d, and at d ~ -1e3 a floor of 1.6e-38
// would dominate a near-certain row's entropy), clamped above 88 (the epilogue only sees
// z - max <= 0). Cephes polynomial, ~1 ulp. Branch-free (selects) and libm-free so that the loops
// calling it vectorise; NaN propagates.
inline float exp_f32(float x) {
  const bool low = x < -87.0f;
  const float underflow = x < -104.0f ? 0.0f : (low ? 2.061153622e-9f : 1.0f);   // exp(-20)
  x = low ? x + 20.0f : x;
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // n = round(x * log2(e)) by the 1.5 * 2^23 trick: t's low mantissa bits hold n itself,
  // which then becomes the exponent of 2^n with unsigned (always defined) bit arithmetic.
  const float shift = 12582912.0f;
  const float t = x * 1.44269504088896341f + shift;
  const float n = t - shift;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits = (bits - 0x4B400000u + 127u) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale * underflow;
}

MIO_ISA_CLONES float row_max_f32(const float* z, int64_t V) {
  float lane[kLanes];
  for (int k = 0; k < kLanes; ++k) lane[k] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= V; j += kLanes)
    for (int k = 0; k < kLanes; ++k) lane[k] = z[j + k] > lane[k] ? z[j + k] : lane[k];
  float m = -std::numeric_limits<float>::infinity();
  for (; j < V; ++j) m = z[j] > m ? z[j] : m;
  for (int k = 0; k < kLanes; ++k) m = lane[k] > m ? lane[k] : m;
  return m;
}

// sum_j exp(z[j] - m): float lanes over blocks of kBlock elements, each block folded into a
// double in a fixed order (accurate to ~1e-7 relative, and vectorisable).
constexpr int64_t kBlock = 512;
MIO_ISA_CLONES double row_sumexp_f32(const float* z, int64_t V, float m) {
  double s = 0.0;
  int64_t b = 0;
  for (; b + kBlock <= V; b += kBlock) {
    float lane[kLanes] = {};
    for (int64_t j = b; j < b + kBlock; j += kLanes)
      for (int k = 0; k < kLanes; ++k) lane[k] += exp_f32(z[j + k] - m);
    for (int k = 0; k < kLanes; ++k) s += lane[k];
  }
  for (; b < V; ++b) s += exp_f32(z[b] - m);
  return s;
}

// z <- exp(z - m) in place; returns the sum (blocked like row_sumexp_f32).
MIO_ISA_CLONES double row_exp_inplace_f32(float* z, int64_t V, float m) {
  double s = 0.0;
  int64_t b = 0;
  for (; b + kBlock <= V; b += kBlock) {
    float lane[kLanes] = {};
    for (int64_t j = b; j < b + kBlock; j += kLanes)
      for (int k = 0; k < kLanes; ++k) {
        z[j + k] = exp_f32(z[j + k] - m);
        lane[k] += z[j + k];
      }
    for (int k = 0; k < kLanes; ++k) s += lane[k];
  }
  for (; b < V; ++b) {
    z[b] = exp_f32(z[b] - m);
    s += z[b];
  }
  return s;
}

MIO_ISA_CLONES void row_scale_f32(float* z, int64_t V, float c) {
  for (int64_t j = 0; j < V; ++j) z[j] *= c;
}

inline float exp_any(float x) { return exp_f32(x); }
inline double exp_any(double x) { return std::exp(x); }

// With e = exp(-2|y|): tanh(y) = sign(y) (1 - e) / (1 + e) and 1 - tanh(y)^2 = 4e / (1 + e)^2, the
// latter accurate where tanh saturates (1 - t * t from a rounded t is not).
template <typename T>
inline T tanh_from(T y, T e) { return std::copysign((T(1) - e) / (T(1) + e), y); }

// A row's sums over exp(z_j - m): s = sum_j exp(z_j - m), log_s = log(s), w = sum_j exp(z_j - m) (z_j - m).
// log_s is formed as log(n) + log1p(rest / n) from the n maxima and the rest of the sum kept apart:
// in a near-certain row the rest (1e-9 .. 1e-300) is all of its entropy, and 1 + rest rounds it away.
struct RowSums {
  double s, log_s, w;
};

inline RowSums row_sums(double maxima, double rest, double w) {
  // no z_j equal to m (a softcapped row's m is recomputed in double): the plain log of the sum
  const double log_s = maxima > 0.0 ? std::log(maxima) + std::log1p(rest / maxima) : std::log(maxima + rest);
  return {maxima + rest, log_s, w};
}

// RowSums with z_j = zf(j), one sweep: float lanes over blocks of kBlock (like row_sumexp_f32), each
// block folded into doubles; the maxima (z_j == m) are counted, not added to the lanes.
template <typename T, typename ZF>
inline RowSums sums_impl(int64_t V, T m, ZF zf) {
  double rest = 0.0, w = 0.0, maxima = 0.0;
  int64_t b = 0;
  for (; b + kBlock <= V; b += kBlock) {
    T ls[kLanes] = {}, lw[kLanes] = {}, ln[kLanes] = {};
    for (int64_t j = b; j < b + kBlock; j += kLanes)
      for (int k = 0; k < kLanes; ++k) {
        const T d = zf(j + k) - m, e = exp_any(d), at_max = d == T(0) ? T(1) : T(0);
        ls[k] += e - at_max;
        ln[k] += at_max;
        lw[k] += e * d;
      }
    for (int k = 0; k < kLanes; ++k) {
      rest += ls[k];
      maxima += ln[k];
      w += lw[k];
    }
  }
  for (; b < V; ++b) {
    const T d = zf(b) - m, e = exp_any(d);
    if (d == T(0)) maxima += 1.0; else rest += e;
    w += static_cast<double>(e) * d;
  }
  return row_sums(maxima, rest, w);
}

// z = cap * tanh(u), u = scale * x.
template <typename T>
inline T softcap_of(T u, T cap) { return cap * tanh_from(u, exp_any(T(-2) * std::fabs(u))); }

// Softcapped row held as u = scale * x: z_j = cap * tanh(u_j) on the fly.
template <typename T>
inline RowSums softcap_sums_impl(const T* u, int64_t V, T m, T cap) {
  return sums_impl<T>(V, m, [=](int64_t j) { return softcap_of(u[j], cap); });
}

// u_j <- dZ_j * dz/dx_j, dZ_j = -p_j * (g + ge * ((z_j - m) - mu)), p_j = exp(z_j - m) * inv_s; the
// label's onehot term is the caller's. u = scale * x when cap > 0 (z = cap * tanh(u)), else u = z.
template <typename T>
inline void grad_impl(T* u, int64_t V, T m, T inv_s, T g, T ge, T mu, T scale, T cap) {
  if (cap > T(0)) {
    for (int64_t j = 0; j < V; ++j) {
      const T e = exp_any(T(-2) * std::fabs(u[j])), d = cap * tanh_from(u[j], e) - m;
      const T p = exp_any(d) * inv_s;
      u[j] = -p * (g + ge * (d - mu)) * (T(4) * scale * cap * e / ((T(1) + e) * (T(1) + e)));
    }
  } else {
    for (int64_t j = 0; j < V; ++j) {
      const T d = u[j] - m, p = exp_any(d) * inv_s;
      u[j] = -p * (g + ge * (d - mu)) * scale;
    }
  }
}

// z <- cap * tanh(scale * z) (cap > 0) or scale * z, in place.
template <typename T>
inline void transform_impl(T* z, int64_t V, T scale, T cap) {
  if (cap > T(0)) {
    for (int64_t j = 0; j < V; ++j) z[j] = softcap_of(scale * z[j], cap);
  } else {
    for (int64_t j = 0; j < V; ++j) z[j] *= scale;
  }
}

MIO_ISA_CLONES void row_transform_f32(float* z, int64_t V, float scale, float cap) {
  transform_impl<float>(z, V, scale, cap);
}
MIO_ISA_CLONES RowSums row_sumexp_moment_f32(const float* z, int64_t V, float m) {
  return sums_impl<float>(V, m, [=](int64_t j) { return z[j]; });
}
MIO_ISA_CLONES RowSums row_softcap_sums_f32(const float* u, int64_t V, float m, float cap) {
  return softcap_sums_impl<float>(u, V, m, cap);
}
MIO_ISA_CLONES void row_grad_general_f32(float* u, int64_t V, float m, float inv_s, float g, float ge, float mu,
                                         float scale, float cap) {
  grad_impl<float>(u, V, m, inv_s, g, ge, mu, scale, cap);
}

// fp64 (used by tests to compare in float64): plain libm, speed is not the point.
double row_max(const double* z, int64_t V) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < V; ++j) m = z[j] > m ? z[j] : m;
  return m;
}
double row_sumexp(const double* z, int64_t V, double m) {
  double s = 0.0;
  for (int64_t j = 0; j < V; ++j) s += std::exp(z[j] - m);
  return s;
}
double row_exp_inplace(double* z, int64_t V, double m) {
  double s = 0.0;
  for (int64_t j = 0; j < V; ++j) s += (z[j] = std::exp(z[j] - m));
  return s;
}
void row_scale(double* z, int64_t V, double c) {
  for (int64_t j = 0; j < V; ++j) z[j] *= c;
}
void row_transform(double* z, int64_t V, double scale, double cap) { transform_impl<double>(z, V, scale, cap); }
RowSums row_sumexp_moment(const double* z, int64_t V, double m) {
  return sums_impl<double>(V, m, [=](int64_t j) { return z[j]; });
}
RowSums row_softcap_sums(const double* u, int64_t V, double m, double cap) {
  return softcap_sums_impl<double>(u, V, m, cap);
}
void row_grad_general(double* u, int64_t V, double m, double inv_s, double g, double ge, double mu, double scale,
                      double cap) {
  grad_impl<double>(u, V, m, inv_s, g, ge, mu, scale, cap);
}
float row_max(const float* z, int64_t V) { return row_max_f32(z, V); }
double row_sumexp(const float* z, int64_t V, float m) { return row_sumexp_f32(z, V, m); }
double row_exp_inplace(float* z, int64_t V, float m) { return row_exp_inplace_f32(z, V, m); }
void row_scale(float* z, int64_t V, float c) { row_scale_f32(z, V, c); }
void row_transform(float* z, int64_t V, double scale, double cap) {
  row_transform_f32(z, V, static_cast<float>(scale), static_cast<float>(cap));
}
RowSums row_sumexp_moment(const float* z, int64_t V, float m) {
  return row_sumexp_moment_f32(z, V, m);
}
RowSums row_softcap_sums(const float* u, int64_t V, float m, double cap) {
  return row_softcap_sums_f32(u, V, m, static_cast<float>(cap));
}
void row_grad_general(float* u, int64_t V, float m, float inv_s, float g, float ge, float mu, double scale,
                      double cap) {
  row_grad_general_f32(u, V, m, inv_s, g, ge, mu, static_cast<float>(scale), static_cast<float>(cap));
}

// dz/dx of the transform at the label, from u = scale * x (cap > 0) or z (else).
template <typename acc_t>
acc_t transform_slope(acc_t u, const Transform& tf) {
  if (tf.cap <= 0) return static_cast<acc_t>(tf.scale);
  const double e = std::exp(-2.0 * std::fabs(static_cast<double>(u)));
  return static_cast<acc_t>(4.0 * tf.scale * tf.cap * e / ((1.0 + e) * (1.0 + e)));
}

// Rows per parallel task: small rows are batched so that a thread gets >= 32k logits (no
// fork/join for a chunk smaller than that).
constexpr int64_t kLogitsPerTask = int64_t{1} << 15;
int64_t row_grain(int64_t V) { return std::max<int64_t>(1, kLogitsPerTask / std::max<int64_t>(1, V)); }

// Per row r = rows[i] of the chunk: the transform applied in place, logp[r] and stats[r] =
// (max, log sum exp(z - max)[, entropy]); `cols` = 3 with the entropy, else 2.
template <typename acc_t>
void forward_epilogue(acc_t* Z, int64_t n, int64_t V, const int64_t* rows, const int64_t* labels,
                      const Transform& tf, int64_t cols, acc_t* logp, acc_t* stats) {
  at::parallel_for(0, n, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = rows[i];
      acc_t* z = Z + i * V;
      if (!tf.identity()) row_transform(z, V, tf.scale, tf.cap);
      const acc_t m = row_max(z, V);
      // An all -inf row has no finite max; its lse is -inf like torch's.
      const bool empty = std::isinf(m) && m < 0;
      if (cols == 3) {
        const RowSums sw = empty ? RowSums{1.0, 0.0, 0.0} : row_sumexp_moment(z, V, m);
        stats[3 * r + 1] = static_cast<acc_t>(sw.log_s);
        stats[3 * r + 2] = static_cast<acc_t>(sw.log_s - sw.w / sw.s);  // lse - E_p[z]
      } else {
        stats[2 * r + 1] = empty ? acc_t(0) : static_cast<acc_t>(std::log(row_sumexp(z, V, m)));
      }
      const acc_t log_s = stats[cols * r + 1];
      stats[cols * r] = m;
      // (z - m) - log_s keeps the digits that m + log_s would lose for large logits
      logp[r] = (z[labels[r]] - m) - log_s;
    }
  });
}

// dZ = g * (onehot - softmax(z)) over the logits. The row's max and normaliser are
// recomputed from these very logits rather than read from forward's statistics: a backward
// chunk (rows with zero gradient left out) may round its GEMM differently from forward's, and
// at logits of ~1e4 one fp32 rounding of z moves softmax by ~1e-3.
template <typename acc_t>
void backward_epilogue(acc_t* Z, int64_t n, int64_t V, const int64_t* rows,
                       const int64_t* labels, const acc_t* grad) {
  at::parallel_for(0, n, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = rows[i];
      acc_t* z = Z + i * V;
      const acc_t m = row_max(z, V);
      const double s = row_exp_inplace(z, V, m);
      row_scale(z, V, static_cast<acc_t>(-static_cast<double>(grad[r]) / s));
      z[labels[r]] += grad[r];
    }
  });
}

// One row of backward_epilogue_general: z (the raw logits x) <- g * dlogp/dx + ge * dentropy/dx;
// returns logp = log softmax(transform(x))[y]. A softcapped row is held as u = scale * x, z = cap *
// tanh(u) recomputed per sweep, so that dz/dx comes from u (exact where tanh saturates); its max is
// cap * tanh(max u) (tanh increases).
template <typename acc_t>
acc_t transformed_grad_row(acc_t* z, int64_t V, int64_t y, acc_t g, acc_t g_h, const Transform& tf) {
  const bool softcap = tf.cap > 0;
  if (tf.scale != 1.0) row_scale(z, V, static_cast<acc_t>(tf.scale));
  acc_t m = row_max(z, V);
  if (softcap) m = static_cast<acc_t>(tf.cap * std::tanh(static_cast<double>(m)));
  RowSums sw;
  if (softcap) {
    sw = row_softcap_sums(z, V, m, tf.cap);
  } else if (g_h != acc_t(0)) {
    sw = row_sumexp_moment(z, V, m);
  } else {
    const double s = row_sumexp(z, V, m);
    sw = {s, std::log(s), 0.0};
  }
  const acc_t u_label = z[y];
  const acc_t z_label = softcap ? softcap_of(u_label, static_cast<acc_t>(tf.cap)) : u_label;
  row_grad_general(z, V, m, static_cast<acc_t>(1.0 / sw.s), g, g_h, static_cast<acc_t>(sw.w / sw.s),
                   tf.scale, tf.cap);
  z[y] += g * transform_slope(u_label, tf);
  return (z_label - m) - static_cast<acc_t>(sw.log_s);  // as in forward_epilogue
}

// backward_epilogue with a transform and/or an entropy gradient `ge` (nullptr: none):
// dX = dz/dx * (g * (onehot - p) - ge * p * (z - E_p[z])), z the transformed logits.
template <typename acc_t>
void backward_epilogue_general(acc_t* Z, int64_t n, int64_t V, const int64_t* rows, const int64_t* labels,
                               const acc_t* grad, const acc_t* ge, const Transform& tf) {
  at::parallel_for(0, n, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = rows[i];
      transformed_grad_row(Z + i * V, V, labels[r], grad[r], ge == nullptr ? acc_t(0) : ge[r], tf);
    }
  });
}

at::ScalarType acc_type_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// t in `dtype`, adding the bytes of the copy (if one is made) to *bytes.
at::Tensor converted(const at::Tensor& t, at::ScalarType dtype, int64_t* bytes) {
  if (t.scalar_type() == dtype) return t;
  *bytes += t.numel() * static_cast<int64_t>(c10::elementSize(dtype));
  return t.to(dtype);
}


// The token rows a pass computes (the others cost nothing), addressed by chunk: selected
// rows [k0, k0 + n).
class RowChunks {
 public:
  explicit RowChunks(std::vector<int64_t> rows) : rows_(std::move(rows)) {
    index_ = rows_.empty() ? at::empty({0}, at::kLong) : at::from_blob(rows_.data(), {count()}, at::kLong);
  }
  RowChunks(const RowChunks&) = delete;  // index_ views rows_'s storage
  RowChunks& operator=(const RowChunks&) = delete;
  int64_t count() const { return static_cast<int64_t>(rows_.size()); }
  const int64_t* rows(int64_t k0) const { return rows_.data() + k0; }

  // Whether selected rows [k0, k0 + n) are consecutive tokens (first_row(k0) onwards).
  bool is_run(int64_t k0, int64_t n) const { return rows_[k0 + n - 1] - rows_[k0] == n - 1; }
  int64_t first_row(int64_t k0) const { return rows_[k0]; }
  at::Tensor index(int64_t k0, int64_t n) const { return index_.narrow(0, k0, n); }

  // hidden's rows of the chunk in the accumulation dtype: a view for a run, else a gather.
  at::Tensor hidden_rows(const at::Tensor& hidden, int64_t k0, int64_t n, at::ScalarType acc,
                         int64_t* tmp_bytes) const {
    at::Tensor h;
    if (is_run(k0, n)) {
      h = hidden.narrow(0, first_row(k0), n);
    } else {
      h = hidden.index_select(0, index(k0, n));
      *tmp_bytes += h.numel() * static_cast<int64_t>(h.element_size());
    }
    return converted(h, acc, tmp_bytes);
  }

 private:
  std::vector<int64_t> rows_;
  at::Tensor index_;
};

// dH rows of the chunk = dZ @ W: straight into dH for a run of rows in the accumulation dtype,
// else through a temporary (cast and/or scattered), whose bytes are added to *tmp_bytes.
void write_hidden_grad(at::Tensor& dH, const at::Tensor& Z, const at::Tensor& Wa, const RowChunks& chunks,
                       int64_t k0, int64_t n, int64_t* tmp_bytes) {
  const bool run = chunks.is_run(k0, n);
  if (run && dH.scalar_type() == Z.scalar_type()) {
    at::Tensor out = dH.narrow(0, chunks.first_row(k0), n);
    at::mm_out(out, Z, Wa);
    return;
  }
  const at::Tensor dHc = at::mm(Z, Wa);
  *tmp_bytes += dHc.numel() * static_cast<int64_t>(dHc.element_size());
  if (run)
    dH.narrow(0, chunks.first_row(k0), n).copy_(dHc);
  else
    dH.index_copy_(0, chunks.index(k0, n), converted(dHc, dH.scalar_type(), tmp_bytes));
}

template <typename acc_t>
void forward_impl(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                  const OptTensor& bias, int64_t ignore_index, const Transform& tf, int64_t budget_bytes,
                  at::Tensor& logp, at::Tensor& stats_out) {
  const int64_t N = hidden.size(0), V = weight.size(0);
  const at::ScalarType acc = logp.scalar_type();
  const int64_t* lab = labels.data_ptr<int64_t>();
  WorkspaceStats info;
  // Ignored tokens (prompts, padding) have logp 0 and need no logits; their softmax
  // statistics are left 0 (backward never reads them).
  std::vector<int64_t> active;
  active.reserve(N);
  for (int64_t i = 0; i < N; ++i)
    if (lab[i] != ignore_index) active.push_back(i);
  const RowChunks chunks(std::move(active));
  info.rows_skipped = N - chunks.count();
  if (chunks.count() == 0) {
    last_stats() = info;
    return;
  }
  int64_t ws = 0;
  const at::Tensor Wa = converted(weight, acc, &ws);  // once, O(V * H)
  const at::Tensor ba = bias && bias->defined() ? converted(*bias, acc, &ws) : at::Tensor();
  info.chunk_rows = chunk_rows_for(budget_bytes, V, sizeof(acc_t), chunks.count());
  at::Tensor buf = at::empty({info.chunk_rows, V}, hidden.options().dtype(acc));
  info.logits_bytes = buf.numel() * static_cast<int64_t>(sizeof(acc_t));
  int64_t chunk_tmp = 0;
  for (int64_t k0 = 0; k0 < chunks.count(); k0 += info.chunk_rows) {
    const int64_t n = std::min(info.chunk_rows, chunks.count() - k0);
    int64_t tmp = 0;
    const at::Tensor Hc = chunks.hidden_rows(hidden, k0, n, acc, &tmp);
    chunk_tmp = std::max(chunk_tmp, tmp);
    at::Tensor Z = buf.narrow(0, 0, n);
    chunk_logits(Z, Hc, Wa, ba);
    forward_epilogue<acc_t>(Z.data_ptr<acc_t>(), n, V, chunks.rows(k0), lab, tf, stats_out.size(1),
                            logp.data_ptr<acc_t>(), stats_out.data_ptr<acc_t>());
    ++info.num_chunks;
  }
  info.workspace_bytes = ws + info.logits_bytes + chunk_tmp;
  last_stats() = info;
}

template <typename acc_t>
void backward_impl(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                   const OptTensor& bias, const at::Tensor& grad_in, const OptTensor& grad_entropy,
                   int64_t ignore_index, const Transform& tf, int64_t budget_bytes, at::Tensor& dH,
                   at::Tensor& dW_acc, at::Tensor& db_acc) {
  const int64_t N = hidden.size(0), V = weight.size(0);
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  WorkspaceStats info;
  int64_t ws = 0;
  const at::Tensor grad = converted(grad_in, acc, &ws).contiguous();
  const acc_t* g = grad.data_ptr<acc_t>();
  const at::Tensor grad_h = grad_entropy ? converted(*grad_entropy, acc, &ws).contiguous() : at::Tensor();
  const acc_t* ge = grad_h.defined() ? grad_h.data_ptr<acc_t>() : nullptr;
  const int64_t* lab = labels.data_ptr<int64_t>();

  // Only rows with a nonzero gradient are recomputed (ignored tokens, frozen sequences and
  // whole zero chunks cost nothing).
  std::vector<int64_t> active;
  active.reserve(N);
  for (int64_t i = 0; i < N; ++i)
    if (lab[i] != ignore_index && (g[i] != acc_t(0) || (ge != nullptr && ge[i] != acc_t(0)))) active.push_back(i);
  const RowChunks chunks(std::move(active));
  info.rows_skipped = N - chunks.count();
  if (chunks.count() == 0) {
    last_stats() = info;
    return;
  }

  const at::Tensor Wa = converted(weight, acc, &ws);
  const at::Tensor ba = bias && bias->defined() ? converted(*bias, acc, &ws) : at::Tensor();
  info.chunk_rows = chunk_rows_for(budget_bytes, V, sizeof(acc_t), chunks.count());
  at::Tensor buf = at::empty({info.chunk_rows, V}, hidden.options().dtype(acc));
  info.logits_bytes = buf.numel() * static_cast<int64_t>(sizeof(acc_t));
  const int64_t elem = static_cast<int64_t>(sizeof(acc_t));
  int64_t chunk_tmp = 0;

  for (int64_t k0 = 0; k0 < chunks.count(); k0 += info.chunk_rows) {
    const int64_t n = std::min(info.chunk_rows, chunks.count() - k0);
    int64_t tmp = 0;
    const at::Tensor Hc = chunks.hidden_rows(hidden, k0, n, acc, &tmp);
    at::Tensor Z = buf.narrow(0, 0, n);
    chunk_logits(Z, Hc, Wa, ba);
    if (tf.identity() && ge == nullptr)
      backward_epilogue<acc_t>(Z.data_ptr<acc_t>(), n, V, chunks.rows(k0), lab, g);
    else
      backward_epilogue_general<acc_t>(Z.data_ptr<acc_t>(), n, V, chunks.rows(k0), lab, g, ge, tf);

    if (dH.defined()) write_hidden_grad(dH, Z, Wa, chunks, k0, n, &tmp);
    if (dW_acc.defined()) dW_acc.addmm_(Z.t(), Hc);
    if (db_acc.defined()) {
      const at::Tensor col = Z.sum(0);
      tmp += col.numel() * elem;
      db_acc.add_(col);
    }
    chunk_tmp = std::max(chunk_tmp, tmp);
    ++info.num_chunks;
  }
  info.workspace_bytes = ws + info.logits_bytes + chunk_tmp;
  last_stats() = info;
}

}  // namespace

std::vector<at::Tensor> forward_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                    const at::Tensor& labels, const OptTensor& bias,
                                    int64_t ignore_index, const Transform& tf, bool with_entropy,
                                    int64_t budget_bytes) {
  const at::ScalarType acc = acc_type_of(hidden);
  const int64_t N = hidden.size(0);
  at::Tensor logp = at::zeros({N}, hidden.options().dtype(acc));  // 0 at ignored tokens
  at::Tensor stats = at::zeros({N, with_entropy ? 3 : 2}, hidden.options().dtype(acc));
  if (acc == at::kDouble)
    forward_impl<double>(hidden, weight, labels, bias, ignore_index, tf, budget_bytes, logp, stats);
  else
    forward_impl<float>(hidden, weight, labels, bias, ignore_index, tf, budget_bytes, logp, stats);
  return {logp, stats};
}

std::vector<at::Tensor> backward_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                     const at::Tensor& labels, const OptTensor& bias,
                                     const at::Tensor& /*stats: recomputed from the logits*/,
                                     const at::Tensor& grad_logp, const OptTensor& grad_entropy,
                                     int64_t ignore_index, const Transform& tf, bool need_dh, bool need_dw,
                                     int64_t budget_bytes) {
  const at::ScalarType acc = acc_type_of(hidden);
  const bool has_bias = bias && bias->defined();
  at::Tensor dH, dW, db, dW_acc, db_acc;
  if (need_dh) dH = at::zeros_like(hidden);  // rows with zero gradient stay 0
  if (need_dw) {
    // fp32 accumulators for bf16/fp16 parameters, cast once at the end.
    dW_acc = at::zeros(weight.sizes(), weight.options().dtype(acc));
    if (has_bias) db_acc = at::zeros(bias->sizes(), bias->options().dtype(acc));
  }
  if (!need_dh && !need_dw) {
    last_stats() = WorkspaceStats();
    return {dH, dW, db};
  }
  if (acc == at::kDouble)
    backward_impl<double>(hidden, weight, labels, bias, grad_logp, grad_entropy, ignore_index, tf,
                          budget_bytes, dH, dW_acc, db_acc);
  else
    backward_impl<float>(hidden, weight, labels, bias, grad_logp, grad_entropy, ignore_index, tf,
                         budget_bytes, dH, dW_acc, db_acc);
  if (need_dw) {
    const bool cast = weight.scalar_type() != acc;
    if (cast) last_stats().workspace_bytes += dW_acc.numel() * dW_acc.element_size();
    dW = cast ? dW_acc.to(weight.scalar_type()) : dW_acc;
    if (has_bias) db = db_acc.scalar_type() == bias->scalar_type() ? db_acc : db_acc.to(bias->scalar_type());
  }
  return {dH, dW, db};
}

}  // namespace mio

// ---------------------------------------------------------------- single-pass epilogue row

namespace mio {

template <typename acc_t>
acc_t softmax_grad_row_impl(acc_t* z, int64_t V, int64_t y, const Transform& tf) {
  if (!tf.identity()) return transformed_grad_row(z, V, y, acc_t(1), acc_t(0), tf);
  const acc_t m = row_max(z, V);
  const acc_t zy = z[y];
  const double s = row_exp_inplace(z, V, m);
  const acc_t log_s = static_cast<acc_t>(std::log(s));
  row_scale(z, V, static_cast<acc_t>(-1.0 / s));
  z[y] += acc_t(1);
  return (zy - m) - log_s;  // as in forward_epilogue: keeps the digits m + log_s would lose
}

float softmax_grad_row(float* z, int64_t vocab, int64_t y, const Transform& tf) {
  return softmax_grad_row_impl(z, vocab, y, tf);
}
double softmax_grad_row(double* z, int64_t vocab, int64_t y, const Transform& tf) {
  return softmax_grad_row_impl(z, vocab, y, tf);
}

}  // namespace mio
