// CPU kernels of conv_bn_relu (slsdeep_kernels/ops/conv_bn_relu.py, docs/design.md §4.1).
//
// The convolution runs through ATen (oneDNN); BatchNorm and ReLU around it are fused passes:
//   eval:  BN folded into the weights and bias (fp32), the ReLU a oneDNN post-op of the convolution
//          (fp32, and bf16 where the CPU has it); fp64/fp16: ATen conv + one C++ bias+ReLU pass;
//   train: conv, ONE pass for the per-channel statistics (exact moments of cache-sized NCHW spans,
//          two-pass, or sums shifted by a value of each NHWC part, merged by Chan's formula: never
//          Σx² − (Σx)²), ONE pass for normalise + affine + ReLU;
//   backward: one reduction pass (ReLU mask fused) and one elementwise pass, then
//          at::convolution_backward.
// Each BN pass is a profiler scope (bn_statistics, bn_apply, bn_backward_sums, bn_backward_apply),
// so a profile (bench/test_bench_cpu_variants.py) times the passes apart from the convolution.
// Activations are dense NCHW (planes of S = H·W values of one channel) or NHWC (rows of C values);
// reductions use a fixed split that does not depend on the thread count, so results are deterministic.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "alloc.h"
#include "bind_utils.h"
#include "common/conv_bn_relu.h"
#include "cpu/dispatch.h"

SLSDEEP_CPU_VARIANT_BEGIN
namespace {

#include "cpu/lanes.h"

using at::Tensor;
namespace cbr = slsdeep::conv_bn_relu;
using slsdeep::grain_for;

constexpr int64_t kSpan = 1024;        // contiguous values summed in cache before a merge
constexpr int64_t kRowsPerBlock = 64;  // NHWC rows per reduction part, at most
constexpr int64_t kRowGroup = 4;       // NHWC rows the backward sums take together before their accumulators
constexpr int64_t kChannelBlock = 64;  // NHWC channels the statistics take over a part's rows at once


// A dense (N, C, S) activation: NCHW planes of S values, or NHWC rows of C values.
struct Layout {
  int64_t N, C, S;
  bool channels_last;
  int64_t rows() const { return N * S; }
  // NHWC reductions' parts: the split the CUDA kernels use too (csrc/common/conv_bn_relu.h).
  cbr::Split row_split() const { return cbr::split_units(rows(), (rows() + kRowsPerBlock - 1) / kRowsPerBlock); }
};

Layout layout_of(const Tensor& y, at::MemoryFormat format) {
  return {y.size(0), y.size(1), y.size(2) * y.size(3), format == at::MemoryFormat::ChannelsLast};
}

// Runs plane(offset, channel) over every NCHW plane, or row(offset) over every NHWC row, in parallel.
template <typename Plane, typename Row>
void parallel_over(const Layout& l, const Plane& plane, const Row& row) {
  if (l.channels_last) {
    at::parallel_for(0, l.rows(), grain_for(l.C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) row(r * l.C);
    });
  } else {
    at::parallel_for(0, l.N * l.C, grain_for(l.S), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) plane(p * l.S, p % l.C);
    });
  }
}

template <typename acc_t, typename scalar_t>
acc_t squared_deviation_span(const scalar_t* p, int64_t n, acc_t mean) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t d = static_cast<acc_t>(p[i + j]) - mean;
      lanes[j] += d * d;
    }
  }
  acc_t total = 0;
  for (; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(p[i]) - mean;
    total += d * d;
  }
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

// Moments of n contiguous values: exact two-pass on each cache-resident span, spans merged.
template <typename acc_t, typename scalar_t>
cbr::Moments<acc_t> span_moments(const scalar_t* p, int64_t n) {
  cbr::Moments<acc_t> total{0, 0, 0};
  for (int64_t start = 0; start < n; start += kSpan) {
    const int64_t len = std::min(kSpan, n - start);
    const acc_t mean = sum_span<acc_t>(p + start, len) / static_cast<acc_t>(len);
    total = cbr::merge(total, {static_cast<acc_t>(len), mean, squared_deviation_span(p + start, len, mean)});
  }
  return total;
}

// Asks for the `count` values from p into L2 (a part's rows, read in channel blocks: the cores'
// prefetchers alone left the statistics below a plain read, docs/performance.md §4.3).
template <typename scalar_t>
void prefetch_to_l2(const scalar_t* p, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < count * static_cast<int64_t>(sizeof(scalar_t)); i += 64) __builtin_prefetch(bytes + i, 0, 2);
}

// part_moments of one block: `width` channels (kWidth, when known at compile time) from `first`, the
// part's first row there, over its `rows` rows (the block's sums stay in registers on AVX512).
template <int64_t kWidth, typename acc_t, typename scalar_t>
void block_moments(const scalar_t* __restrict__ first, int64_t rows, int64_t C, int64_t width,
                   acc_t* __restrict__ mean, acc_t* __restrict__ m2) {
  const int64_t w = kWidth > 0 ? kWidth : width;
  acc_t shift[kChannelBlock], sum[kChannelBlock] = {}, squares[kChannelBlock] = {};
  for (int64_t j = 0; j < w; ++j) shift[j] = static_cast<acc_t>(first[j]);
  for (int64_t r = 1; r < rows; ++r) {  // the first row's terms are 0
    const scalar_t* __restrict__ row = first + r * C;
    for (int64_t j = 0; j < w; ++j) {
      const acc_t d = static_cast<acc_t>(row[j]) - shift[j];
      sum[j] += d;
      squares[j] += d * d;
    }
  }
  const acc_t n = static_cast<acc_t>(rows);
  for (int64_t j = 0; j < w; ++j) {
    const acc_t offset = sum[j] / n;
    mean[j] = shift[j] + offset;
    m2[j] = std::max(squares[j] - sum[j] * offset, acc_t(0));
  }
}

// Moments of the NHWC rows [r0, r1) per channel by shifted sums, a block of kChannelBlock channels
// at a time over all the rows: with k the first row, s = Σ(x − k) and q = Σ(x − k)² per channel, then
// mean = k + s/n and m2 = q − s²/n. The shift is one of the part's own values, so the subtraction
// multiplies m2's relative rounding error by about 1 + (mean − k)²/variance, of order 2 (the mean of
// (x − mean)² over the part's values is their variance), where Σx² − (Σx)²/n multiplies it by
// 1 + mean²/variance. Measured faster than row by row, and than exact 4-row group moments merged by
// Chan's formula (docs/performance.md §4.3).
template <typename acc_t, typename scalar_t>
void part_moments(const scalar_t* data, int64_t r0, int64_t r1, int64_t C, acc_t* mean, acc_t* m2) {
  if (r1 == r0) return;  // the one part of an empty batch: no first row (its moments stay 0)
  for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
    const scalar_t* first = data + r0 * C + c0;
    if (C - c0 >= kChannelBlock) {
      block_moments<kChannelBlock>(first, r1 - r0, C, kChannelBlock, mean + c0, m2 + c0);
    } else {
      block_moments<0>(first, r1 - r0, C, C - c0, mean + c0, m2 + c0);
    }
  }
}

// Merges one NHWC part's moments (part_count rows; part_mean, part_m2 per channel) into the running
// totals: cbr::merge on each channel, with the part's count shared by every channel.
template <typename acc_t>
void merge_part(acc_t& count, acc_t* __restrict__ mean, acc_t* __restrict__ m2, acc_t part_count,
                const acc_t* __restrict__ part_mean, const acc_t* __restrict__ part_m2, int64_t C) {
  const acc_t total = count + part_count;
  if (total == acc_t(0)) return;
  const acc_t share = part_count / total, prior = count;
  for (int64_t c = 0; c < C; ++c) cbr::merge_into(mean[c], m2[c], part_mean[c], part_m2[c], share, prior);
  count = total;
}

// Per-channel batch mean and biased variance of y (one read of y).
template <typename scalar_t, typename acc_t>
void channel_moments(const Tensor& y, const Layout& l, acc_t* mean, acc_t* var) {
  const scalar_t* data = y.const_data_ptr<scalar_t>();
  if (l.channels_last) {
    const cbr::Split split = l.row_split();
    const int64_t blocks = split.parts;
    std::vector<acc_t> part_mean(blocks * l.C), part_m2(blocks * l.C);
    at::parallel_for(0, blocks, grain_for(split.per_part * l.C), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t r0 = cbr::part_begin(split, b), r1 = cbr::part_end(split, b);
        if (b + 1 < blocks) prefetch_to_l2(data + r1 * l.C, (cbr::part_end(split, b + 1) - r1) * l.C);
        part_moments(data, r0, r1, l.C, part_mean.data() + b * l.C, part_m2.data() + b * l.C);
      }
    });
    acc_t count = 0;
    std::fill(mean, mean + l.C, acc_t(0));
    std::fill(var, var + l.C, acc_t(0));  // the sum of squared deviations until the end
    for (int64_t b = 0; b < blocks; ++b) {
      const acc_t rows = static_cast<acc_t>(cbr::part_end(split, b) - cbr::part_begin(split, b));
      merge_part(count, mean, var, rows, part_mean.data() + b * l.C, part_m2.data() + b * l.C, l.C);
    }
    for (int64_t c = 0; c < l.C; ++c) var[c] /= count;
  } else {
    std::vector<cbr::Moments<acc_t>> total(l.C, cbr::Moments<acc_t>{0, 0, 0});
    std::vector<cbr::Moments<acc_t>> planes(l.N * l.C);
    at::parallel_for(0, l.N * l.C, grain_for(l.S), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) planes[p] = span_moments<acc_t>(data + p * l.S, l.S);
    });
    for (int64_t n = 0; n < l.N; ++n) {
      for (int64_t c = 0; c < l.C; ++c) total[c] = cbr::merge(total[c], planes[n * l.C + c]);
    }
    for (int64_t c = 0; c < l.C; ++c) {
      mean[c] = total[c].mean;
      var[c] = total[c].m2 / total[c].count;
    }
  }
}

// Calls f(std::integral_constant<bool, relu>{}): loops specialised on the ReLU vectorise cleanly.
template <typename F>
void with_relu(bool relu, const F& f) {
  if (relu) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// out = act(y * scale[c] + shift[c]); out may be y (in place).
template <typename scalar_t, typename acc_t, bool kRelu>
void apply_bn_act(const Tensor& y, const Tensor& out, const Layout& l, const acc_t* __restrict__ scale,
                  const acc_t* __restrict__ shift) {
  const scalar_t* in = y.const_data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  parallel_over(
      l,
      [&](int64_t offset, int64_t c) {
        const acc_t s = scale[c], b = shift[c];
        for (int64_t i = offset; i < offset + l.S; ++i) o[i] = static_cast<scalar_t>(cbr::bn_act(static_cast<acc_t>(in[i]), s, b, kRelu));
      },
      [&](int64_t offset) {
        for (int64_t c = 0; c < l.C; ++c) {
          o[offset + c] = static_cast<scalar_t>(cbr::bn_act(static_cast<acc_t>(in[offset + c]), scale[c], shift[c], kRelu));
        }
      });
}

// Per-channel vectors of the training backward, as a structure of arrays (the NHWC loops run over c).
template <typename acc_t>
struct BackwardChannels {
  explicit BackwardChannels(int64_t C) : scale(C), shift(C), g_coef(C), centered_coef(C), constant(C) {}
  std::vector<acc_t> scale, shift, g_coef, centered_coef, constant;
};

// The NHWC backward sums' accumulation of `rows` (at most kRowGroup) rows of masked gradients mg and
// centred values yc: sum_g[c] += Σ mg, sum_gc[c] += Σ mg·yc, a full group's terms summed pairwise first.
template <typename acc_t>
void add_gradient_rows(acc_t* __restrict__ sum_g, acc_t* __restrict__ sum_gc, const acc_t* __restrict__ mg,
                       const acc_t* __restrict__ yc, int64_t rows, int64_t C) {
  if (rows == kRowGroup) {
    for (int64_t c = 0; c < C; ++c) {
      sum_g[c] += (mg[c] + mg[C + c]) + (mg[2 * C + c] + mg[3 * C + c]);
      sum_gc[c] += (mg[c] * yc[c] + mg[C + c] * yc[C + c]) + (mg[2 * C + c] * yc[2 * C + c] + mg[3 * C + c] * yc[3 * C + c]);
    }
    return;
  }
  for (int64_t k = 0; k < rows; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      sum_g[c] += mg[k * C + c];
      sum_gc[c] += mg[k * C + c] * yc[k * C + c];
    }
  }
}

// Per channel: sum_g = Σ g and sum_gc = Σ g (y - mean), g the ReLU-masked gradient (one read of each).
template <typename scalar_t, typename acc_t, bool kRelu>
void backward_sums(const Tensor& grad, const Tensor& y, const Layout& l, const acc_t* __restrict__ mean,
                   const BackwardChannels<acc_t>& ch, acc_t* sum_g, acc_t* sum_gc) {
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const scalar_t* yd = y.const_data_ptr<scalar_t>();
  const acc_t* __restrict__ scale = ch.scale.data();
  const acc_t* __restrict__ shift = ch.shift.data();
  std::fill(sum_g, sum_g + l.C, acc_t(0));
  std::fill(sum_gc, sum_gc + l.C, acc_t(0));
  if (l.channels_last) {
    const cbr::Split split = l.row_split();
    const int64_t blocks = split.parts;
    std::vector<acc_t> part_g(blocks * l.C, acc_t(0)), part_gc(blocks * l.C, acc_t(0));
    at::parallel_for(0, blocks, grain_for(split.per_part * l.C), [&](int64_t begin, int64_t end) {
      // A group of rows' masked gradients and centred values, computed in their own loop: next to
      // the accumulations GCC keeps the ReLU select as a branch. The group's terms are summed
      // pairwise before the accumulators.
      std::vector<acc_t> masked_rows(kRowGroup * l.C), centered_rows(kRowGroup * l.C);
      acc_t* __restrict__ mg = masked_rows.data();
      acc_t* __restrict__ yc = centered_rows.data();
      for (int64_t b = begin; b < end; ++b) {
        const int64_t r0 = cbr::part_begin(split, b), r1 = cbr::part_end(split, b);
        acc_t* __restrict__ pg = part_g.data() + b * l.C;
        acc_t* __restrict__ pgc = part_gc.data() + b * l.C;
        for (int64_t r = r0; r < r1; r += kRowGroup) {
          const int64_t rows = std::min(kRowGroup, r1 - r);
          for (int64_t k = 0; k < rows; ++k) {
            const scalar_t* __restrict__ gr = g + (r + k) * l.C;
            const scalar_t* __restrict__ yr = yd + (r + k) * l.C;
            acc_t* __restrict__ mk = mg + k * l.C;
            acc_t* __restrict__ ck = yc + k * l.C;
#pragma omp simd
            for (int64_t c = 0; c < l.C; ++c) {
              const acc_t yv = static_cast<acc_t>(yr[c]);
              mk[c] = cbr::relu_masked(static_cast<acc_t>(gr[c]), yv, scale[c], shift[c], kRelu);
              ck[c] = yv - mean[c];
            }
          }
          add_gradient_rows(pg, pgc, mg, yc, rows, l.C);
        }
      }
    });
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t c = 0; c < l.C; ++c) {
        sum_g[c] += part_g[b * l.C + c];
        sum_gc[c] += part_gc[b * l.C + c];
      }
    }
  } else {
    std::vector<acc_t> plane_g(l.N * l.C), plane_gc(l.N * l.C);
    at::parallel_for(0, l.N * l.C, grain_for(l.S), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % l.C;
        const acc_t m = mean[c], s = scale[c], b = shift[c];
        acc_t lanes_g[kLanes] = {}, lanes_gc[kLanes] = {};
        const scalar_t* __restrict__ gp = g + p * l.S;
        const scalar_t* __restrict__ yp = yd + p * l.S;
        int64_t i = 0;
        for (; i + kLanes <= l.S; i += kLanes) {
          acc_t masked[kLanes], centered[kLanes];  // the select apart from the sums, as above
#pragma omp simd
          for (int j = 0; j < kLanes; ++j) {
            const acc_t yv = static_cast<acc_t>(yp[i + j]);
            masked[j] = cbr::relu_masked(static_cast<acc_t>(gp[i + j]), yv, s, b, kRelu);
            centered[j] = yv - m;
          }
          for (int j = 0; j < kLanes; ++j) {
            lanes_g[j] += masked[j];
            lanes_gc[j] += masked[j] * centered[j];
          }
        }
        acc_t total_g = 0, total_gc = 0;
        for (; i < l.S; ++i) {
          const acc_t yv = static_cast<acc_t>(yp[i]);
          const acc_t gv = cbr::relu_masked(static_cast<acc_t>(gp[i]), yv, s, b, kRelu);
          total_g += gv;
          total_gc += gv * (yv - m);
        }
        for (int j = 0; j < kLanes; ++j) {
          total_g += lanes_g[j];
          total_gc += lanes_gc[j];
        }
        plane_g[p] = total_g;
        plane_gc[p] = total_gc;
      }
    });
    for (int64_t n = 0; n < l.N; ++n) {
      for (int64_t c = 0; c < l.C; ++c) {
        sum_g[c] += plane_g[n * l.C + c];
        sum_gc[c] += plane_gc[n * l.C + c];
      }
    }
  }
}

// grad_y = g_coef·g + centered_coef·(y − mean) + constant, g the ReLU-masked gradient.
template <typename scalar_t, typename acc_t, bool kRelu>
void apply_bn_backward(const Tensor& grad, const Tensor& y, const Tensor& grad_y, const Layout& l,
                       const acc_t* __restrict__ mean, const BackwardChannels<acc_t>& ch) {
  const scalar_t* __restrict__ g = grad.const_data_ptr<scalar_t>();
  const scalar_t* __restrict__ yd = y.const_data_ptr<scalar_t>();
  scalar_t* __restrict__ o = grad_y.data_ptr<scalar_t>();
  const acc_t *__restrict__ scale = ch.scale.data(), *__restrict__ shift = ch.shift.data();
  const acc_t *__restrict__ g_coef = ch.g_coef.data(), *__restrict__ centered_coef = ch.centered_coef.data();
  const acc_t* __restrict__ constant = ch.constant.data();
  parallel_over(
      l,
      [&](int64_t offset, int64_t c) {
        const acc_t m = mean[c], s = scale[c], b = shift[c];
        const cbr::BackwardCoefficients<acc_t> k{g_coef[c], centered_coef[c], constant[c]};
#pragma omp simd
        for (int64_t i = offset; i < offset + l.S; ++i) {
          const acc_t yv = static_cast<acc_t>(yd[i]);
          const acc_t gv = cbr::relu_masked(static_cast<acc_t>(g[i]), yv, s, b, kRelu);
          o[i] = static_cast<scalar_t>(cbr::bn_backward(gv, yv - m, k));
        }
      },
      [&](int64_t offset) {
#pragma omp simd
        for (int64_t c = 0; c < l.C; ++c) {
          const acc_t yv = static_cast<acc_t>(yd[offset + c]);
          const acc_t gv = cbr::relu_masked(static_cast<acc_t>(g[offset + c]), yv, scale[c], shift[c], kRelu);
          const cbr::BackwardCoefficients<acc_t> k{g_coef[c], centered_coef[c], constant[c]};
          o[offset + c] = static_cast<scalar_t>(cbr::bn_backward(gv, yv - mean[c], k));
        }
      });
}

// A per-channel parameter as an accumulation-type vector (value `fill` where the tensor is absent).
Tensor channel_vector(const c10::optional<Tensor>& t, int64_t C, at::ScalarType acc, double fill) {
  if (t.has_value() && t->defined()) return t->to(acc).contiguous();
  return at::full({C}, fill, at::TensorOptions().dtype(acc));
}

bool onednn_post_op_supported(const Tensor& x) {
  if (!at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn()) return false;
  if (x.scalar_type() == at::kFloat) return true;
  if (x.scalar_type() != at::kBFloat16) return false;
  static const bool bf16 = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("mkldnn::_is_mkldnn_bf16_supported", "")
                               .typed<bool()>()
                               .call();
  return bf16;
}

Tensor onednn_conv_act(const Tensor& x, const Tensor& weight, const Tensor& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "");
  torch::jit::Stack stack;
  stack.reserve(10);
  stack.emplace_back(x);
  stack.emplace_back(weight);
  stack.emplace_back(bias);
  stack.emplace_back(padding.vec());
  stack.emplace_back(stride.vec());
  stack.emplace_back(dilation.vec());
  stack.emplace_back(groups);
  stack.emplace_back(std::string(relu ? "relu" : "none"));
  stack.emplace_back(c10::List<c10::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// ATen's conv of x, then out = act(scale·out + shift) per channel in one pass (dtypes oneDNN's post-ops
// do not take).
Tensor conv_scale_shift_act(const Tensor& x, const Tensor& weight, const Tensor& scale, const Tensor& shift,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            bool relu, at::MemoryFormat format) {
  Tensor out = cbr::convolution(x, weight, c10::nullopt, stride, padding, dilation, groups, format);
  const Layout l = layout_of(out, format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_bn_relu_eval", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_relu(relu, [&](auto relu_tag) {
      apply_bn_act<scalar_t, acc_t, decltype(relu_tag)::value>(out, out, l, scale.const_data_ptr<acc_t>(),
                                                               shift.const_data_ptr<acc_t>());
    });
  });
  return out;
}

}  // namespace

Tensor conv_bn_relu_eval_kernel(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                                const c10::optional<Tensor>& bn_weight, const c10::optional<Tensor>& bn_bias,
                                const Tensor& running_mean, const Tensor& running_var, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double eps, bool relu) {
  const int64_t C = weight.size(0);
  const auto format = slsdeep::preserved_format(input);
  const Tensor x = input.contiguous(format);
  const auto acc = at::toOpMathType(x.scalar_type());
  Tensor scale = at::empty({C}, at::TensorOptions().dtype(acc));
  Tensor shift = at::empty({C}, at::TensorOptions().dtype(acc));
  const Tensor gamma = channel_vector(bn_weight, C, acc, 1.0), beta = channel_vector(bn_bias, C, acc, 0.0);
  const Tensor mu = running_mean.to(acc).contiguous(), var = running_var.to(acc).contiguous();
  const Tensor b = channel_vector(bias, C, acc, 0.0);
  AT_DISPATCH_FLOATING_TYPES(acc, "conv_bn_relu_eval_fold", [&] {
    const scalar_t *g = gamma.const_data_ptr<scalar_t>(), *be = beta.const_data_ptr<scalar_t>(),
                   *m = mu.const_data_ptr<scalar_t>(), *v = var.const_data_ptr<scalar_t>(), *bb = b.const_data_ptr<scalar_t>();
    scalar_t *sc = scale.data_ptr<scalar_t>(), *sh = shift.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) cbr::fold_eval<scalar_t>(g[c], be[c], m[c], v[c], bb[c], static_cast<scalar_t>(eps), sc[c], sh[c]);
  });
  if (onednn_post_op_supported(x)) {
    // oneDNN runs conv + bias + ReLU in one pass over the output.
    const Tensor folded = weight.to(acc).mul(scale.view({C, 1, 1, 1})).to(x.scalar_type());
    return onednn_conv_act(x, folded, shift, stride, padding, dilation, groups, relu).contiguous(format);
  }
  return conv_scale_shift_act(x, weight, scale, shift, stride, padding, dilation, groups, relu, format);
}

// The eval conv with BatchNorm already folded into weight and bias (the fold cached by the caller,
// slsdeep_kernels.backend.derived): oneDNN's conv + bias + ReLU, or ATen's conv and one bias+ReLU pass.
Tensor conv_bias_act_kernel(const Tensor& input, const Tensor& weight, const Tensor& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  const auto format = slsdeep::preserved_format(input);
  const Tensor x = input.contiguous(format);
  const auto acc = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && bias.scalar_type() == acc && bias.dim() == 1 &&
                  bias.size(0) == weight.size(0),
              "conv_bias_act_kernel: weight of the input's dtype and a (C_out,) bias in its accumulation type");
  if (onednn_post_op_supported(x)) {
    return onednn_conv_act(x, weight, bias, stride, padding, dilation, groups, relu).contiguous(format);
  }
  const Tensor ones = at::ones({weight.size(0)}, at::TensorOptions().dtype(acc));
  return conv_scale_shift_act(x, weight, ones, bias.contiguous(), stride, padding, dilation, groups, relu, format);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv_bn_relu_train_kernel(
    const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias, const c10::optional<Tensor>& bn_weight,
    const c10::optional<Tensor>& bn_bias, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, double eps, bool relu) {
  const auto format = slsdeep::preserved_format(input);
  const Tensor y = cbr::convolution(input.contiguous(format), weight, bias, stride, padding, dilation, groups, format);
  const Layout l = layout_of(y, format);
  const auto acc = at::toOpMathType(y.scalar_type());
  const auto acc_options = at::TensorOptions().dtype(acc);
  Tensor mean = slsdeep::new_output({l.C}, acc_options), var = slsdeep::new_output({l.C}, acc_options);
  Tensor out = slsdeep::new_output(y.sizes(), y.options(), format);
  const Tensor gamma = channel_vector(bn_weight, l.C, acc, 1.0), beta = channel_vector(bn_bias, l.C, acc, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "conv_bn_relu_train", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* m = mean.data_ptr<acc_t>();
    acc_t* v = var.data_ptr<acc_t>();
    {
      RECORD_FUNCTION("bn_statistics", std::vector<c10::IValue>());
      channel_moments<scalar_t, acc_t>(y, l, m, v);
    }
    std::vector<acc_t> scale(l.C), shift(l.C);
    const acc_t *g = gamma.const_data_ptr<acc_t>(), *b = beta.const_data_ptr<acc_t>();
    for (int64_t c = 0; c < l.C; ++c) cbr::fold_train<acc_t>(g[c], b[c], m[c], v[c], static_cast<acc_t>(eps), scale[c], shift[c]);
    RECORD_FUNCTION("bn_apply", std::vector<c10::IValue>());
    with_relu(relu, [&](auto relu_tag) {
      apply_bn_act<scalar_t, acc_t, decltype(relu_tag)::value>(y, out, l, scale.data(), shift.data());
    });
  });
  return {out, y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn_relu_train_backward_kernel(
    const Tensor& grad_out, const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& conv_out, const Tensor& mean, const Tensor& var, const c10::optional<Tensor>& bn_weight,
    const c10::optional<Tensor>& bn_bias, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, double eps, bool relu, std::array<bool, 3> output_mask) {
  const auto format = slsdeep::preserved_format(input);
  const Tensor x = input.contiguous(format);
  const Tensor y = cbr::saved_or_recomputed(conv_out, x, weight, bias, stride, padding, dilation, groups, format);
  const Tensor grad = grad_out.contiguous(format);
  const Layout l = layout_of(y, format);
  const auto acc = at::toOpMathType(y.scalar_type());
  const Tensor gamma = channel_vector(bn_weight, l.C, acc, 1.0), beta = channel_vector(bn_bias, l.C, acc, 0.0);
  const Tensor mu = mean.to(acc).contiguous(), v = var.to(acc).contiguous();
  Tensor grad_gamma = slsdeep::new_output({l.C}, at::TensorOptions().dtype(acc));
  Tensor grad_beta = slsdeep::new_output({l.C}, at::TensorOptions().dtype(acc));
  Tensor grad_y = slsdeep::new_output(y.sizes(), y.options(), format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "conv_bn_relu_train_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t *g = gamma.const_data_ptr<acc_t>(), *b = beta.const_data_ptr<acc_t>();
    const acc_t *m = mu.const_data_ptr<acc_t>(), *vv = v.const_data_ptr<acc_t>();
    BackwardChannels<acc_t> ch(l.C);
    std::vector<acc_t> sum_g(l.C), sum_gc(l.C);
    for (int64_t c = 0; c < l.C; ++c) cbr::fold_train<acc_t>(g[c], b[c], m[c], vv[c], static_cast<acc_t>(eps), ch.scale[c], ch.shift[c]);
    {
      RECORD_FUNCTION("bn_backward_sums", std::vector<c10::IValue>());
      with_relu(relu, [&](auto relu_tag) {
        backward_sums<scalar_t, acc_t, decltype(relu_tag)::value>(grad, y, l, m, ch, sum_g.data(), sum_gc.data());
      });
    }
    acc_t* gg = grad_gamma.data_ptr<acc_t>();
    acc_t* gb = grad_beta.data_ptr<acc_t>();
    const acc_t count = static_cast<acc_t>(l.N * l.S);
    for (int64_t c = 0; c < l.C; ++c) {
      const acc_t invstd = cbr::inverse_std(vv[c], static_cast<acc_t>(eps));
      gg[c] = sum_gc[c] * invstd;
      gb[c] = sum_g[c];
      const auto k = cbr::backward_coefficients<acc_t>(g[c], invstd, sum_g[c], sum_gc[c], count);
      ch.g_coef[c] = k.g_coef;
      ch.centered_coef[c] = k.centered_coef;
      ch.constant[c] = k.constant;
    }
    RECORD_FUNCTION("bn_backward_apply", std::vector<c10::IValue>());
    with_relu(relu, [&](auto relu_tag) {
      apply_bn_backward<scalar_t, acc_t, decltype(relu_tag)::value>(grad, y, grad_y, l, m, ch);
    });
  });
  return cbr::backward_tail(grad_y, x, weight, l.C, stride, padding, dilation, groups, output_mask, bn_weight, bn_bias,
                            grad_gamma, grad_beta);
}

SLSDEEP_CPU_VARIANT_END

#ifdef SLSDEEP_CPU_VARIANT_DEFAULT
#define SLSDEEP_CONV_BN_RELU_KERNELS(X) \
  X(conv_bn_relu_eval_kernel)           \
  X(conv_bias_act_kernel)               \
  X(conv_bn_relu_train_kernel)          \
  X(conv_bn_relu_train_backward_kernel)
SLSDEEP_CONV_BN_RELU_KERNELS(SLSDEEP_CPU_DECLARE_VARIANTS)
TORCH_LIBRARY_IMPL(slsdeep_kernels, CPU, m) { SLSDEEP_CONV_BN_RELU_KERNELS(SLSDEEP_CPU_IMPL) }
#endif
