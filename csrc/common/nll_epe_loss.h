// Per-pixel maths of the NLL + EPE loss (docs/design.md §4.3), shared by the CPU and CUDA kernels.
// Torch-free; T is the accumulation type (float, or double for fp64 inputs).
//
// z is the foreground logit margin (C = 1: the logit; C = 2: l1 - l0), p = sigmoid(z), v the mask value,
// d = p - v. The Sobel stencils are separable: Kx = smoothing [1, 2, 1] down the rows times difference
// [-1, 0, 1] along the row, / 8 (Ky the other way round), with replicate padding, so Sobel(p) - Sobel(v) =
// Sobel(d). Along one axis, with c() clamping an index into the image:
//   smooth(x)[i] = x[c(i-1)] + 2 x[i] + x[c(i+1)]     difference(x)[i] = x[c(i+1)] - x[c(i-1)]
// and their adjoints (the gradient gathers through the stencil; a border pixel also receives the weight
// of the padded tap that clamps onto it):
//   smooth_adjoint = smooth                          difference_adjoint(y)[i] = y'[i-1] - y'[i+1]
// where y' outside the image is -y at the border pixel (the clamped tap's weight has the opposite sign).
#pragma once

#include <math.h>

#include <cstdint>

#include "common/macros.h"

namespace slsdeep {
namespace nll_epe {

// Reduction codes of the compiled ops (the Python side passes REDUCTIONS.index(reduction)).
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// The factor the forward applies to the gradient it saves for mean/sum: the mean's 1/(N·H·W), except
// for fp16 logits, where that product lands in subnormals (below 2^-14 once N·H·W > 16384) before the
// upstream gradient (a loss scale) multiplies it; there the gradient of the sum is saved and backward's
// factor carries the 1/(N·H·W). The same rule is _saved_gradient_scale in slsdeep_kernels/ops/nll_epe_loss.py.
inline double saved_gradient_scale(bool half, int64_t reduction, int64_t pixels) {
  return reduction == kMean && !half ? 1.0 / static_cast<double>(pixels) : 1.0;
}

SLSDEEP_HD float exp_(float x) { return expf(x); }
SLSDEEP_HD double exp_(double x) { return exp(x); }
SLSDEEP_HD float log_(float x) { return logf(x); }
SLSDEEP_HD double log_(double x) { return log(x); }
SLSDEEP_HD float sqrt_(float x) { return sqrtf(x); }
SLSDEEP_HD double sqrt_(double x) { return sqrt(x); }

// exp(-|z|): the one exponential from which both p and the NLL follow without overflow.
template <typename T>
SLSDEEP_HD T exp_neg_abs(T z) {
  return exp_(z < T(0) ? z : -z);
}

// p = sigmoid(z) from e = exp(-|z|) and inverse = 1 / (1 + e).
template <typename T>
SLSDEEP_HD T foreground_probability(T z, T e, T inverse) {
  return z >= T(0) ? inverse : e * inverse;
}

// log1p(e) = log(u) - ((u - 1) - e) / u with u = 1 + e rounded: the second term undoes the rounding of u
// (exact to rounding, also where u == 1) and reuses inverse = 1 / u; a plain log is cheaper than log1p.
template <typename T>
SLSDEEP_HD T log1p_of(T e, T inverse) {
  const T u = T(1) + e;
  return log_(u) - ((u - T(1)) - e) * inverse;
}

// -[v log p + (1 - v) log(1 - p)] = v softplus(-z) + (1 - v) softplus(z), softplus(+-z) = max(+-z, 0) + log1p(e),
// = log1p(e) + z ((1 - v) - negative) with negative = 1 where z < 0, else 0: a sum of non-negative terms (no
// cancellation where p is close to v), and no select (which would keep a CPU loop from vectorising).
template <typename T>
SLSDEEP_HD T negative_log_likelihood(T z, T v, T negative, T log1p_e) {
  return log1p_e + z * ((T(1) - v) - negative);
}

// EPE = |(ex, ey)| and its gradient direction (ex, ey) / EPE, defined as 0 where EPE = 0.
template <typename T>
SLSDEEP_HD T end_point_error(T ex, T ey, T& ux, T& uy) {
  const T epe = sqrt_(ex * ex + ey * ey);
  const T inverse = epe > T(0) ? T(1) / epe : T(0);
  ux = ex * inverse;
  uy = ey * inverse;
  return epe;
}

// The adjoints along one axis at pixel i, from the values before/at/after it; first/last: i is the
// first/last pixel of the axis (then `before`/`after` are never read and may be anything).
template <typename T>
SLSDEEP_HD T smooth_adjoint(T before, T at, T after, bool first, bool last) {
  return (first ? at : before) + T(2) * at + (last ? at : after);
}

template <typename T>
SLSDEEP_HD T difference_adjoint(T before, T at, T after, bool first, bool last) {
  return (first ? -at : before) - (last ? -at : after);
}

}  // namespace nll_epe
}  // namespace slsdeep
