// CPU kernels of the NLL + EPE loss (slsdeep_kernels/ops/nll_epe_loss.py; maths in common/nll_epe_loss.h).
//
// Parallel over bands of kBandRows rows of one image. A band reads its rows plus a halo of one row
// (loss only) or two rows (gradient) on each side, and works row by row on per-thread buffers of a few
// band-sized rows, so the only full-size allocations are the outputs. Per band:
//   1. d = p - v on the band and its halo; p(1 - p) and the NLL on the band;
//   2. the Sobel derivatives of d, the EPE and its direction on the band plus one row each side;
//   3. the gradient on the band: the adjoint of the stencils applied to the direction field.
// The loss is summed per band then over bands in a fixed order: deterministic for any thread count.
// Inner loops run along a row without branches (the column borders come from one padding element on
// each side of a row buffer) and, for float, without libm calls, so that they vectorise for every
// instruction-set variant (csrc/cpu/variant.h).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "alloc.h"
#include "bind_utils.h"
#include "common/nll_epe_loss.h"
#include "cpu/dispatch.h"

SLSDEEP_CPU_VARIANT_BEGIN
namespace {

#include "cpu/lanes.h"

using namespace nll_epe;

constexpr int64_t kBandRows = 32;

// Exact selects in integer arithmetic: GCC keeps a loop with floating-point selects scalar (-ftrapping-math).
inline float sign_bit(float x) {
  return static_cast<float>(c10::bit_cast<uint32_t>(x) >> 31);
}

inline double sign_bit(double x) {
  return static_cast<double>(c10::bit_cast<uint64_t>(x) >> 63);
}

// if_negative where x's sign bit is set, else otherwise.
inline float select_negative(float x, float if_negative, float otherwise) {
  const int32_t mask = c10::bit_cast<int32_t>(x) >> 31;
  return c10::bit_cast<float>((c10::bit_cast<int32_t>(if_negative) & mask) | (c10::bit_cast<int32_t>(otherwise) & ~mask));
}

inline double select_negative(double x, double if_negative, double otherwise) {
  const int64_t mask = c10::bit_cast<int64_t>(x) >> 63;
  return c10::bit_cast<double>((c10::bit_cast<int64_t>(if_negative) & mask) | (c10::bit_cast<int64_t>(otherwise) & ~mask));
}

// exp(x) for x <= 0 without a libm call: x = n ln2 + r (Cody-Waite), a degree-6 polynomial in r (Cephes
// expf, ~2 ulp), 2^n from the exponent bits. Below -87 the result stays at ~1.6e-38 instead of reaching
// denormals; there p and log1p(e) are ~e either way.
inline float exp_nonpositive(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  x = select_negative(x + 87.0f, -87.0f, x);
  const float shifted = x * 1.44269504088896341f + kRound;
  const float n = shifted - kRound;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r * r + r + 1.0f;
  const int32_t exponent = c10::bit_cast<int32_t>(shifted) - c10::bit_cast<int32_t>(kRound);
  return poly * c10::bit_cast<float>((exponent + 127) << 23);
}

inline double exp_nonpositive(double x) {
  return std::exp(x);
}

// log1p(e) for e in [0, 1] without a libm call: 2 atanh(s) with s = e / (2 + e) <= 1/3, the series to s^15
// (the next term is below 2e-9 relative).
inline float log1p_unit(float e) {
  const float s = e / (2.0f + e);
  const float s2 = s * s;
  float series = 1.0f / 15.0f;
  series = series * s2 + 1.0f / 13.0f;
  series = series * s2 + 1.0f / 11.0f;
  series = series * s2 + 1.0f / 9.0f;
  series = series * s2 + 1.0f / 7.0f;
  series = series * s2 + 1.0f / 5.0f;
  series = series * s2 + 1.0f / 3.0f;
  return 2.0f * s * (series * s2 + 1.0f);
}

inline double log1p_unit(double e) {
  return std::log1p(e);
}

// 1/sqrt(x) for x >= 0 without sqrtf (whose errno path keeps a loop scalar): the bit-level first guess
// and three Newton steps (relative error ~1e-7). At x = 0 it stays finite, so x * rsqrt(x) = 0.
inline float reciprocal_sqrt(float x) {
  float r = c10::bit_cast<float>(0x5f3759df - (c10::bit_cast<int32_t>(x) >> 1));
  const float half_x = 0.5f * x;
  r = r * (1.5f - half_x * r * r);
  r = r * (1.5f - half_x * r * r);
  return r * (1.5f - half_x * r * r);
}

// EPE = |(ex, ey)| and its direction (ex, ey) / EPE (0 where EPE = 0), as end_point_error in
// common/nll_epe_loss.h but vectorisable for float.
inline float epe_and_direction(float ex, float ey, float& ux, float& uy) {
  const float squared = ex * ex + ey * ey;
  const float inverse = reciprocal_sqrt(squared);
  ux = ex * inverse;  // ex = ey = 0 where squared = 0, and inverse is finite
  uy = ey * inverse;
  return squared * inverse;
}

inline double epe_and_direction(double ex, double ey, double& ux, double& uy) {
  return end_point_error(ex, ey, ux, uy);
}

// p = sigmoid(z) from e = exp(-|z|) (also returned): 1 / (1 + e) for z >= 0, e / (1 + e) below.
template <typename T>
inline T probability_of(T z, T* exp_neg_abs_z = nullptr) {
  const T e = exp_nonpositive(-std::abs(z));
  const T inverse = T(1) / (T(1) + e);
  if (exp_neg_abs_z != nullptr) *exp_neg_abs_z = e;
  return select_negative(z, e * inverse, inverse);
}

// Reads one row of the target (any supported dtype) as T.
template <typename T>
using TargetRowReader = void (*)(const char* row, int64_t stride, int64_t width, T* out);

template <typename target_t, typename T>
void read_target_row(const char* row, int64_t stride, int64_t width, T* out) {
  const auto* values = reinterpret_cast<const target_t*>(row);
  if (stride == 1) {
    for (int64_t j = 0; j < width; ++j) out[j] = static_cast<T>(values[j]);
  } else {
    for (int64_t j = 0; j < width; ++j) out[j] = static_cast<T>(values[j * stride]);
  }
}

template <typename T>
TargetRowReader<T> target_row_reader(at::ScalarType type) {
  switch (type) {
    case at::kBool:  // stored as one byte 0/1
    case at::kByte:
      return read_target_row<uint8_t, T>;
    case at::kLong:
      return read_target_row<int64_t, T>;
    case at::kFloat:
      return read_target_row<float, T>;
    case at::kDouble:
      return read_target_row<double, T>;
    case at::kHalf:
      return read_target_row<at::Half, T>;
    case at::kBFloat16:
      return read_target_row<at::BFloat16, T>;
    default:
      TORCH_CHECK(false, "nll_epe_loss: target must be bool, uint8, int64 or floating point; got ", type);
  }
}

// One call of the kernel: which inputs and outputs are present decides what it computes.
template <typename scalar_t>
struct Problem {
  using T = at::opmath_type<scalar_t>;
  int64_t N, C, H, W;
  const scalar_t* logits;
  int64_t logits_stride[4];
  const char* target;
  int64_t target_stride[3];  // image and row strides in bytes, column stride in elements
  TargetRowReader<T> read_target;
  T alpha;
  // Forward: the per-pixel map (reduction none; (N, H, W) contiguous) or per-band sums (mean/sum).
  scalar_t* loss_map = nullptr;
  double* loss_sums = nullptr;
  // Backward of reduction none: the upstream per-pixel gradient.
  const scalar_t* grad_map = nullptr;
  int64_t grad_map_stride[3] = {0, 0, 0};
  // The logits' gradient (nullptr when not wanted), = gradient_scale * d(loss)/d(logits).
  scalar_t* gradient = nullptr;
  int64_t gradient_stride[4] = {0, 0, 0, 0};
  T gradient_scale = T(1);
};

// Per-thread rows. The `padded` rows have one extra element on each side for the column borders.
template <typename T>
struct Buffers {
  int64_t width;
  std::vector<T> margin, mask, weight, pixel_loss, difference, spread, nll, smooth, vertical, dir_x, dir_y, adj_x, adj_y;
  explicit Buffers(int64_t W)
      : width(W), margin(W), mask(W), weight(W), pixel_loss(W), difference((kBandRows + 4) * W), spread(kBandRows * W),
        nll(kBandRows * W), smooth(W + 2), vertical(W + 2), dir_x((kBandRows + 2) * W), dir_y((kBandRows + 2) * W),
        adj_x(W + 2), adj_y(W + 2) {}
};

template <typename scalar_t, typename T>
void read_row(const scalar_t* row, int64_t stride, int64_t width, T* out) {
  if (stride == 1) {
    for (int64_t j = 0; j < width; ++j) out[j] = static_cast<T>(row[j]);
  } else {
    for (int64_t j = 0; j < width; ++j) out[j] = static_cast<T>(row[j * stride]);
  }
}

// z = the foreground logit margin of row i of image n.
template <typename scalar_t, typename T>
void read_margin_row(const Problem<scalar_t>& pb, int64_t n, int64_t i, T* z, T* scratch) {
  const scalar_t* row = pb.logits + n * pb.logits_stride[0] + i * pb.logits_stride[2];
  read_row(row + (pb.C - 1) * pb.logits_stride[1], pb.logits_stride[3], pb.W, z);
  if (pb.C == 2) {
    read_row(row, pb.logits_stride[3], pb.W, scratch);
    for (int64_t j = 0; j < pb.W; ++j) z[j] -= scratch[j];
  }
}

// Processes rows [r0, r1) of image n; the loss sums of the band go to index `band`.
template <typename scalar_t>
void process_band(const Problem<scalar_t>& pb, Buffers<at::opmath_type<scalar_t>>& buf, int64_t n,
                                       int64_t r0, int64_t r1, int64_t band) {
  using T = at::opmath_type<scalar_t>;
  const int64_t H = pb.H, W = pb.W;
  const bool with_gradient = pb.gradient != nullptr;
  const int64_t halo = with_gradient ? 2 : 1;
  const int64_t a0 = std::max<int64_t>(r0 - halo, 0), a1 = std::min(r1 + halo, H);
  T* z = buf.margin.data();
  T* v = buf.mask.data();

  // 1. d = p - v on rows [a0, a1); p(1 - p) and the NLL on the band's rows.
  for (int64_t i = a0; i < a1; ++i) {
    read_margin_row(pb, n, i, z, buf.weight.data());
    pb.read_target(pb.target + n * pb.target_stride[0] + i * pb.target_stride[1], pb.target_stride[2], W, v);
    T* d = buf.difference.data() + (i - a0) * W;
    if (i < r0 || i >= r1) {
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) d[j] = probability_of(z[j]) - v[j];
      continue;
    }
    T* spread = buf.spread.data() + (i - r0) * W;
    T* nll = buf.nll.data() + (i - r0) * W;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) {
      T e;
      const T p = probability_of(z[j], &e);
      d[j] = p - v[j];
      spread[j] = p * (T(1) - p);
      nll[j] = negative_log_likelihood(z[j], v[j], sign_bit(z[j]), log1p_unit(e));
    }
  }

  // 2. Sobel derivatives of d, EPE and direction on rows [b0, b1).
  const int64_t b0 = with_gradient ? std::max<int64_t>(r0 - 1, 0) : r0;
  const int64_t b1 = with_gradient ? std::min(r1 + 1, H) : r1;
  double loss_sum = 0;
  T* S = buf.smooth.data() + 1;  // S[-1], S[W]: the replicate padding
  T* V = buf.vertical.data() + 1;
  for (int64_t q = b0; q < b1; ++q) {
    const T* up = buf.difference.data() + (std::max<int64_t>(q - 1, 0) - a0) * W;
    const T* mid = buf.difference.data() + (q - a0) * W;
    const T* down = buf.difference.data() + (std::min(q + 1, H - 1) - a0) * W;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) {
      S[j] = up[j] + T(2) * mid[j] + down[j];
      V[j] = down[j] - up[j];
    }
    S[-1] = S[0], S[W] = S[W - 1];
    V[-1] = V[0], V[W] = V[W - 1];
    const bool in_band = q >= r0 && q < r1;
    const T* nll = buf.nll.data() + (in_band ? q - r0 : 0) * W;  // (read but unused outside the band)
    T* pixel_loss = buf.pixel_loss.data();
    if (!with_gradient) {
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) {
        T dx, dy;
        const T epe = epe_and_direction((S[j + 1] - S[j - 1]) * T(0.125), (V[j - 1] + T(2) * V[j] + V[j + 1]) * T(0.125), dx, dy);
        pixel_loss[j] = nll[j] + pb.alpha * epe;
      }
    } else {
      T* weight = buf.weight.data();
      if (pb.grad_map != nullptr) {
        read_row(pb.grad_map + n * pb.grad_map_stride[0] + q * pb.grad_map_stride[1], pb.grad_map_stride[2], W, weight);
      } else {
        std::fill(weight, weight + W, T(1));
      }
      T* ux = buf.dir_x.data() + (q - b0) * W;
      T* uy = buf.dir_y.data() + (q - b0) * W;
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) {
        T dx, dy;
        const T epe = epe_and_direction((S[j + 1] - S[j - 1]) * T(0.125), (V[j - 1] + T(2) * V[j] + V[j + 1]) * T(0.125), dx, dy);
        pixel_loss[j] = nll[j] + pb.alpha * epe;
        ux[j] = dx * weight[j];
        uy[j] = dy * weight[j];
      }
    }
    if (in_band && pb.loss_map != nullptr) {
      scalar_t* map = pb.loss_map + (n * H + q) * W;
      for (int64_t j = 0; j < W; ++j) map[j] = static_cast<scalar_t>(pixel_loss[j]);
    } else if (in_band && pb.loss_sums != nullptr) {
      loss_sum += static_cast<double>(sum_span<T>(pixel_loss, W));
    }
  }
  if (pb.loss_sums != nullptr) pb.loss_sums[band] = loss_sum;
  if (!with_gradient) return;

  // 3. The gradient on rows [r0, r1): the vertical, then the horizontal adjoint of the stencils. At a
  // border the padded value is the border pixel's own (smoothing) or its negation (difference).
  T* A = buf.adj_x.data() + 1;
  T* B = buf.adj_y.data() + 1;
  T* weight = buf.weight.data();
  for (int64_t r = r0; r < r1; ++r) {
    const bool top = r == 0, bottom = r == H - 1;
    const T* ux_mid = buf.dir_x.data() + (r - b0) * W;
    const T* uy_mid = buf.dir_y.data() + (r - b0) * W;
    const T* ux_up = top ? ux_mid : ux_mid - W;
    const T* uy_up = top ? uy_mid : uy_mid - W;
    const T* ux_down = bottom ? ux_mid : ux_mid + W;
    const T* uy_down = bottom ? uy_mid : uy_mid + W;
    const T sign_up = top ? T(-1) : T(1), sign_down = bottom ? T(-1) : T(1);
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) {
      A[j] = ux_up[j] + T(2) * ux_mid[j] + ux_down[j];
      B[j] = sign_up * uy_up[j] - sign_down * uy_down[j];
    }
    A[-1] = -A[0], A[W] = -A[W - 1];
    B[-1] = B[0], B[W] = B[W - 1];
    if (pb.grad_map != nullptr) {
      read_row(pb.grad_map + n * pb.grad_map_stride[0] + r * pb.grad_map_stride[1], pb.grad_map_stride[2], W, weight);
    } else {
      std::fill(weight, weight + W, T(1));
    }
    const T* d = buf.difference.data() + (r - a0) * W;
    const T* spread = buf.spread.data() + (r - r0) * W;
    T* grad = z;  // the row's gradient w.r.t. the margin, then written out
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) {
      const T through_epe = ((A[j - 1] - A[j + 1]) + (B[j - 1] + T(2) * B[j] + B[j + 1])) * T(0.125);
      grad[j] = pb.gradient_scale * (weight[j] * d[j] + pb.alpha * spread[j] * through_epe);
    }
    scalar_t* out = pb.gradient + n * pb.gradient_stride[0] + r * pb.gradient_stride[2];
    const int64_t sc = pb.gradient_stride[1], sw = pb.gradient_stride[3];
    if (pb.C == 1) {
      for (int64_t j = 0; j < W; ++j) out[j * sw] = static_cast<scalar_t>(grad[j]);
    } else if (sw == 1) {
      for (int64_t j = 0; j < W; ++j) out[sc + j] = static_cast<scalar_t>(grad[j]);
      for (int64_t j = 0; j < W; ++j) out[j] = static_cast<scalar_t>(-grad[j]);
    } else {
      for (int64_t j = 0; j < W; ++j) {
        out[sc + j * sw] = static_cast<scalar_t>(grad[j]);
        out[j * sw] = static_cast<scalar_t>(-grad[j]);
      }
    }
  }
}

template <typename scalar_t>
void run(const Problem<scalar_t>& pb) {
  using T = at::opmath_type<scalar_t>;
  const int64_t bands_per_image = (pb.H + kBandRows - 1) / kBandRows;
  at::parallel_for(0, pb.N * bands_per_image, 1, [&](int64_t begin, int64_t end) {
    Buffers<T> buffers(pb.W);
    for (int64_t band = begin; band < end; ++band) {
      const int64_t n = band / bands_per_image, r0 = (band % bands_per_image) * kBandRows;
      process_band(pb, buffers, n, r0, std::min(r0 + kBandRows, pb.H), band);
    }
  });
}

int64_t band_count(const at::Tensor& logits) {
  return logits.size(0) * ((logits.size(2) + kBandRows - 1) / kBandRows);
}


template <typename scalar_t>
Problem<scalar_t> make_problem(const at::Tensor& logits, const at::Tensor& target, double alpha) {
  using T = at::opmath_type<scalar_t>;
  Problem<scalar_t> pb;
  pb.N = logits.size(0);
  pb.C = logits.size(1);
  pb.H = logits.size(2);
  pb.W = logits.size(3);
  pb.logits = logits.data_ptr<scalar_t>();
  for (int k = 0; k < 4; ++k) pb.logits_stride[k] = logits.stride(k);
  pb.target = static_cast<const char*>(target.data_ptr());
  const int64_t item = static_cast<int64_t>(target.element_size());
  pb.target_stride[0] = target.stride(0) * item;
  pb.target_stride[1] = target.stride(1) * item;
  pb.target_stride[2] = target.stride(2);
  pb.read_target = target_row_reader<T>(target.scalar_type());
  pb.alpha = static_cast<T>(alpha);
  return pb;
}

template <typename scalar_t>
void set_gradient(Problem<scalar_t>& pb, const at::Tensor& gradient) {
  pb.gradient = gradient.data_ptr<scalar_t>();
  for (int k = 0; k < 4; ++k) pb.gradient_stride[k] = gradient.stride(k);
}

}  // namespace

// (loss, gradient): loss (N, H, W) for reduction none, else a scalar; gradient of the loss w.r.t. the
// logits for mean/sum when compute_grad (else empty).
std::tuple<at::Tensor, at::Tensor> nll_epe_loss_kernel(const at::Tensor& logits, const at::Tensor& target, double alpha,
                                                    int64_t reduction, bool compute_grad) {
  check_forward(logits, target, reduction);
  const int64_t N = logits.size(0), H = logits.size(2), W = logits.size(3);
  const bool with_gradient = compute_grad && reduction != kNone;
  at::Tensor loss = reduction == kNone ? new_output({N, H, W}, logits.options()) : new_output({}, logits.options());
  at::Tensor gradient = with_gradient ? new_output(logits.sizes(), logits.options(), slsdeep::preserved_format(logits))
                                      : at::empty({0}, logits.options());
  const double scale = reduction == kMean ? 1.0 / static_cast<double>(N * H * W) : 1.0;
  std::vector<double> loss_sums(reduction == kNone ? 0 : band_count(logits));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "nll_epe_loss_kernel", [&] {
    auto pb = make_problem<scalar_t>(logits, target, alpha);
    if (reduction == kNone) {
      pb.loss_map = loss.data_ptr<scalar_t>();
    } else {
      pb.loss_sums = loss_sums.data();
    }
    if (with_gradient) {
      set_gradient(pb, gradient);
      pb.gradient_scale = static_cast<at::opmath_type<scalar_t>>(
        saved_gradient_scale(logits.scalar_type() == at::kHalf, reduction, N * H * W));
    }
    run(pb);
  });
  if (reduction != kNone) {
    double total = 0;
    for (const double band_sum : loss_sums) total += band_sum;
    loss.fill_(total * scale);
  }
  return {loss, gradient};
}

// Gradient of the per-pixel loss map (reduction none) for the upstream gradient grad_loss (N, H, W).
at::Tensor nll_epe_loss_backward_kernel(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                     double alpha) {
  check_backward(grad_loss, logits, target);
  const at::Tensor grad_map = grad_loss.to(logits.scalar_type());
  at::Tensor gradient = new_output(logits.sizes(), logits.options(), slsdeep::preserved_format(logits));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "nll_epe_loss_backward_kernel", [&] {
    auto pb = make_problem<scalar_t>(logits, target, alpha);
    pb.grad_map = grad_map.data_ptr<scalar_t>();
    for (int k = 0; k < 3; ++k) pb.grad_map_stride[k] = grad_map.stride(k);
    set_gradient(pb, gradient);
    run(pb);
  });
  return gradient;
}

// gradient *= grad_loss (a scalar), in place; nothing to do where grad_loss == 1.
void nll_epe_loss_scale_kernel(at::Tensor& gradient, const at::Tensor& grad_loss) {
  TORCH_CHECK(grad_loss.numel() == 1, "nll_epe_loss: grad_loss must be a scalar; got ", grad_loss.sizes());
  const double factor = grad_loss.item<double>();
  if (factor == 1.0) return;
  TORCH_CHECK(gradient.is_non_overlapping_and_dense(), "nll_epe_loss: the saved gradient must be dense");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gradient.scalar_type(), "nll_epe_loss_scale_kernel", [&] {
    using T = at::opmath_type<scalar_t>;
    scalar_t* data = gradient.data_ptr<scalar_t>();
    const T f = static_cast<T>(factor);
    at::parallel_for(0, gradient.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) data[i] = static_cast<scalar_t>(static_cast<T>(data[i]) * f);
    });
  });
}

SLSDEEP_CPU_VARIANT_END

#ifdef SLSDEEP_CPU_VARIANT_DEFAULT
#define SLSDEEP_NLL_EPE_LOSS_KERNELS(X) \
  X(nll_epe_loss_kernel)                \
  X(nll_epe_loss_backward_kernel)       \
  X(nll_epe_loss_scale_kernel)
SLSDEEP_NLL_EPE_LOSS_KERNELS(SLSDEEP_CPU_DECLARE_VARIANTS)
TORCH_LIBRARY_IMPL(slsdeep_kernels, CPU, m) { SLSDEEP_NLL_EPE_LOSS_KERNELS(SLSDEEP_CPU_IMPL) }
#endif
