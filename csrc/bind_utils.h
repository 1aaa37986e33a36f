// Torch-side code that the CPU kernels (csrc/cpu/<op>.cpp) and the CUDA bindings
// (csrc/cuda_bind/<op>.cpp) share: input checks, the ATen tails of an op, the operator lists they
// register. Torch side only: never include this from csrc/common or csrc/cuda, which stay free of
// torch headers. CUDA-only binding helpers are in csrc/cuda_bind/bind.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common/nll_epe_loss.h"
#include "common/pyramid.h"

namespace slsdeep {

// ---------------------------------------------------------------- CPU parallel loops

// Items per at::parallel_for task, so that a task touches about at::internal::GRAIN_SIZE elements
// and small maps stay serial.
inline int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(elements_per_item, 1));
}

// ---------------------------------------------------------------- pyramid

// Whether a tensor's channels are its innermost axis (channels_last, or a view of one such as a
// channel slice): the pool kernels' channel walk, CPU and CUDA alike.
inline bool channels_innermost(const at::Tensor& t) { return t.dim() == 4 && t.size(1) > 1 && t.stride(1) == 1; }

// The pyramid pool's bins, checked before anything is allocated (CPU and CUDA bindings alike): 1 to
// pyramid::kMaxBins positive sizes summing to at most pyramid::kMaxAxisCells (the segment tables of
// csrc/common/pyramid.h). Returns the cell count, Σ b².
inline int64_t checked_pool_cells(at::IntArrayRef bins) {
  TORCH_CHECK(!bins.empty() && static_cast<int64_t>(bins.size()) <= pyramid::kMaxBins, "pyramid_pool: between 1 and ",
              pyramid::kMaxBins, " bins, got ", bins.size());
  int64_t sum = 0, cells = 0;
  for (const int64_t bin : bins) {
    TORCH_CHECK(bin > 0, "pyramid_pool: bins must be positive, got ", bin);
    sum += bin;
    TORCH_CHECK(sum <= pyramid::kMaxAxisCells, "pyramid_pool: the bins must sum to at most ", pyramid::kMaxAxisCells,
                ", got ", bins);
    cells += bin * bin;
  }
  return cells;
}

// ---------------------------------------------------------------- conv_bn_relu

namespace conv_bn_relu {

// The convolution of the op (ATen: oneDNN on CPU, cuDNN on CUDA), its output in `format`.
inline at::Tensor convolution(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              at::MemoryFormat format) {
  return at::convolution(x, weight, bias, stride, padding, dilation, false, {0, 0}, groups).contiguous(format);
}

// Backward's conv output: the one forward saved, else (memory_efficient: it was not kept) recomputed.
inline at::Tensor saved_or_recomputed(const c10::optional<at::Tensor>& conv_out, const at::Tensor& x,
                                      const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups, at::MemoryFormat format) {
  return (conv_out.has_value() && conv_out->defined())
             ? conv_out->contiguous(format)
             : convolution(x, weight, bias, stride, padding, dilation, groups, format);
}

// The end of the train backward once BN's gradients are known: the conv's grads (input, weight,
// bias), each only where output_mask asks for it (undefined otherwise), from grad_y, the gradient
// reaching the conv output (C channels); grad_gamma/grad_beta (accumulation type) cast to the dtypes
// of bn_weight/bn_bias where those are given.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_tail(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, int64_t C, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias, at::Tensor grad_gamma,
    at::Tensor grad_beta) {
  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0] || output_mask[1] || output_mask[2]) {
    std::vector<int64_t> bias_shape{C};
    c10::optional<at::IntArrayRef> bias_sizes;
    if (output_mask[2]) bias_sizes = at::IntArrayRef(bias_shape);
    std::tie(grad_input, grad_weight, grad_bias) = at::convolution_backward(
        grad_y, x, weight, bias_sizes, stride, padding, dilation, false, {0, 0}, groups, output_mask);
  }
  if (bn_weight.has_value() && bn_weight->defined()) grad_gamma = grad_gamma.to(bn_weight->scalar_type());
  if (bn_bias.has_value() && bn_bias->defined()) grad_beta = grad_beta.to(bn_bias->scalar_type());
  return {grad_input, grad_weight, grad_bias, grad_gamma, grad_beta};
}

}  // namespace conv_bn_relu

// ---------------------------------------------------------------- nll_epe_loss

namespace nll_epe {

inline void check_inputs(const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.dim() == 4 && (logits.size(1) == 1 || logits.size(1) == 2),
              "nll_epe_loss: logits must be (N, C, H, W) with C = 1 or 2; got ", logits.sizes());
  TORCH_CHECK(target.dim() == 3 && target.size(0) == logits.size(0) && target.size(1) == logits.size(2) &&
                  target.size(2) == logits.size(3),
              "nll_epe_loss: target must be (N, H, W) matching logits ", logits.sizes(), "; got ", target.sizes());
  TORCH_CHECK(logits.numel() > 0, "nll_epe_loss: logits must not be empty");
  TORCH_CHECK(target.device() == logits.device(), "nll_epe_loss: target must be on ", logits.device(), "; got ",
              target.device());
}

// The forward's inputs and reduction code (csrc/common/nll_epe_loss.h).
inline void check_forward(const at::Tensor& logits, const at::Tensor& target, int64_t reduction) {
  check_inputs(logits, target);
  TORCH_CHECK(reduction == kNone || reduction == kMean || reduction == kSum, "nll_epe_loss: bad reduction code ",
              reduction);
}

// The backward's inputs: grad_loss is the upstream gradient of the per-pixel map, (N, H, W).
inline void check_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target) {
  check_inputs(logits, target);
  TORCH_CHECK(grad_loss.sizes() == target.sizes(), "nll_epe_loss: grad_loss must be (N, H, W) = ", target.sizes(),
              "; got ", grad_loss.sizes());
}

}  // namespace nll_epe

// ---------------------------------------------------------------- pyramid

// The pyramid family's kernels, X(name) for each: registered under these names by csrc/cpu/pyramid.cpp
// and csrc/cuda_bind/pyramid.cpp, each with functions of these names in scope.
#define SLSDEEP_PYRAMID_KERNELS(X) \
  X(pyramid_pool_kernel)           \
  X(pyramid_pool_backward_kernel)  \
  X(upsample_concat_kernel)        \
  X(upsample_concat_backward_kernel) \
  X(pyramid_taps_add_kernel)       \
  X(pyramid_taps_backward_kernel)

}  // namespace slsdeep
