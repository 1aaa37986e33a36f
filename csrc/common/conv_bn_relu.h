// Per-channel and per-element maths of conv_bn_relu (docs/design.md §4.1), shared by the CPU kernels
// (csrc/cpu/conv_bn_relu.cpp) and the CUDA kernels (csrc/cuda/conv_bn_relu.cu). Torch-free.
//
// BatchNorm after a convolution is an affine map per output channel, y -> y * scale + shift:
//   eval:  scale = gamma / sqrt(running_var + eps),  shift = beta + (conv_bias - running_mean) * scale
//          (the fold of BN into the convolution's weights and bias);
//   train: scale = gamma / sqrt(batch_var + eps),    shift = beta - batch_mean * scale.
// `acc_t` is the accumulation type: float for fp32/fp16/bf16 data, double for fp64.
#pragma once

#include <math.h>

#include <cstdint>

#include "common/macros.h"

namespace slsdeep {
namespace conv_bn_relu {

SLSDEEP_HD float inverse_std(float var, float eps) { return 1.0f / sqrtf(var + eps); }
SLSDEEP_HD double inverse_std(double var, double eps) { return 1.0 / sqrt(var + eps); }

template <typename acc_t>
SLSDEEP_HD void fold_eval(acc_t gamma, acc_t beta, acc_t running_mean, acc_t running_var, acc_t conv_bias, acc_t eps,
                          acc_t& scale, acc_t& shift) {
  scale = gamma * inverse_std(running_var, eps);
  shift = beta + (conv_bias - running_mean) * scale;
}

template <typename acc_t>
SLSDEEP_HD void fold_train(acc_t gamma, acc_t beta, acc_t mean, acc_t var, acc_t eps, acc_t& scale, acc_t& shift) {
  scale = gamma * inverse_std(var, eps);
  shift = beta - mean * scale;
}

// The forward epilogue: BN as an affine map, then ReLU (NaN propagates, as torch.relu).
template <typename acc_t>
SLSDEEP_HD acc_t bn_act(acc_t y, acc_t scale, acc_t shift, bool relu) {
  const acc_t v = y * scale + shift;
  return (relu && v < acc_t(0)) ? acc_t(0) : v;
}

// The gradient reaching BN's output: ReLU passes it where its input was > 0 (threshold_backward).
template <typename acc_t>
SLSDEEP_HD acc_t relu_masked(acc_t grad, acc_t y, acc_t scale, acc_t shift, bool relu) {
  return (!relu || y * scale + shift > acc_t(0)) ? grad : acc_t(0);
}

// Count, mean and sum of squared deviations of a set of values; merge() combines two disjoint
// sets (Chan et al.), which is how the statistics stay exact without the sum of squares.
template <typename acc_t>
struct Moments {
  acc_t count;
  acc_t mean;
  acc_t m2;
};

// Chan's update of one set's (mean, m2) by a disjoint set's (b_mean, b_m2), where share = n_b / (n_a + n_b)
// and prior = n_a: the one formula of every merge. The CPU kernels merge many channels of equal counts,
// so they compute share and prior once and call this per channel, in a loop that vectorises.
template <typename acc_t>
SLSDEEP_HD void merge_into(acc_t& mean, acc_t& m2, acc_t b_mean, acc_t b_m2, acc_t share, acc_t prior) {
  const acc_t delta = b_mean - mean;
  m2 = m2 + b_m2 + delta * delta * prior * share;
  mean = mean + delta * share;
}

template <typename acc_t>
SLSDEEP_HD Moments<acc_t> merge(const Moments<acc_t>& a, const Moments<acc_t>& b) {
  const acc_t count = a.count + b.count;
  if (count == acc_t(0)) return a;
  Moments<acc_t> total{count, a.mean, a.m2};
  merge_into(total.mean, total.m2, b.mean, b.m2, b.count / count, a.count);
  return total;
}

// The fixed split of a reduction's `units` (rows, packs) into `parts` runs of `per_part` consecutive
// units, the last one shorter: every deterministic reduction, CPU and CUDA, partitions with it, so
// its result does not depend on the thread count. At most `max_parts` parts, at least one.
struct Split {
  int64_t units, parts, per_part;
};

SLSDEEP_HD Split split_units(int64_t units, int64_t max_parts) {
  if (units <= 0) return {units, 1, 1};
  const int64_t parts = max_parts < 1 ? 1 : (max_parts < units ? max_parts : units);
  const int64_t per_part = (units + parts - 1) / parts;
  return {units, (units + per_part - 1) / per_part, per_part};
}

SLSDEEP_HD int64_t part_begin(const Split& s, int64_t part) { return part * s.per_part; }

SLSDEEP_HD int64_t part_end(const Split& s, int64_t part) {
  const int64_t end = (part + 1) * s.per_part;
  return end < s.units ? end : s.units;
}

// BN backward in training, per channel. With g = the ReLU-masked gradient, x̂ = (y - mean) * invstd and
// sums over the channel's M values sum_g = Σg, sum_gc = Σ g (y - mean):
//   grad_gamma = sum_gc * invstd,  grad_beta = sum_g,
//   grad_y = gamma * invstd * (g - sum_g / M - x̂ * sum_gc * invstd / M)
//          = g_coef * g + centered_coef * (y - mean) + constant.
template <typename acc_t>
struct BackwardCoefficients {
  acc_t g_coef;
  acc_t centered_coef;
  acc_t constant;
};

template <typename acc_t>
SLSDEEP_HD BackwardCoefficients<acc_t> backward_coefficients(acc_t gamma, acc_t invstd, acc_t sum_g, acc_t sum_gc,
                                                             acc_t count) {
  const acc_t g_coef = gamma * invstd;
  return {g_coef, -g_coef * invstd * invstd * sum_gc / count, -g_coef * sum_g / count};
}

template <typename acc_t>
SLSDEEP_HD acc_t bn_backward(acc_t masked_grad, acc_t centered, const BackwardCoefficients<acc_t>& k) {
  return k.g_coef * masked_grad + k.centered_coef * centered + k.constant;
}

}  // namespace conv_bn_relu
}  // namespace slsdeep
