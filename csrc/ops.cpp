// Operator schemas of the compiled kernels, namespace slsdeep_kernels.
//
// This file is the contract between Python and the kernels: every compiled kernel op is declared
// here once (the ops that report the CPU variant are in csrc/cpu/dispatch.cpp). Implementations
// register per device next to their kernels:
//   CPU  -> TORCH_LIBRARY_IMPL(slsdeep_kernels, CPU, m)  in csrc/cpu/<op>.cpp, dispatching to the
//           instruction-set variant in use (csrc/cpu/dispatch.h)
//   CUDA -> TORCH_LIBRARY_IMPL(slsdeep_kernels, CUDA, m) in csrc/cuda_bind/<op>.cpp
// Fake (meta) kernels and autograd are registered from Python (slsdeep_kernels/ops/<op>.py),
// where each public op is a torch.library custom op that calls these.
#include <torch/library.h>

TORCH_LIBRARY(slsdeep_kernels, m) {
  // --- nll_epe_loss (slsdeep_kernels/ops/nll_epe_loss.py) ---
  // (loss, gradient); reduction 0 none (loss (N, H, W)), 1 mean, 2 sum (scalar loss; gradient of the loss
  // w.r.t. the logits when compute_grad, else empty; for fp16 logits with mean, the gradient of the sum:
  // see saved_gradient_scale in csrc/common/nll_epe_loss.h).
  m.def("nll_epe_loss_kernel(Tensor logits, Tensor target, float alpha, int reduction, bool compute_grad) -> (Tensor, Tensor)");
  // gradient w.r.t. the logits of the per-pixel map (reduction none) for the upstream grad_loss (N, H, W).
  m.def("nll_epe_loss_backward_kernel(Tensor grad_loss, Tensor logits, Tensor target, float alpha) -> Tensor");
  // gradient *= grad_loss (a scalar), in place; no work where grad_loss == 1.
  m.def("nll_epe_loss_scale_kernel(Tensor(a!) gradient, Tensor grad_loss) -> ()");
  // --- pyramid (slsdeep_kernels/ops/pyramid.py) ---
  // (N, C, sum b^2): every bin's adaptive average cells, bins in order, each b x b row-major.
  m.def("pyramid_pool_kernel(Tensor x, int[] bins) -> Tensor");
  m.def("pyramid_pool_backward_kernel(Tensor grad, int[] bins, int height, int width, bool channels_last) -> Tensor");
  // cat([x] + bilinear resizes of the branches to x's size), written once.
  m.def("upsample_concat_kernel(Tensor x, Tensor[] branches, bool align_corners, bool channels_last) -> Tensor");
  // grads of the branches only; branch_sizes = (C_b, h, w) per branch, channels = C of x.
  m.def(
      "upsample_concat_backward_kernel(Tensor grad, int channels, int[] branch_sizes, bool align_corners) -> Tensor[]");
  // out += sum over branches and k x k taps t of up(taps[b][:, :, t])(p + t - k/2); taps[b]: (N, C_out, k, k, h, w),
  // k odd (k/2 rounded down), read per branch.
  m.def("pyramid_taps_add_kernel(Tensor(a!) out, Tensor[] taps, bool align_corners) -> ()");
  // grads of the tap tensors, (N, C_out, kernel_size, kernel_size, h, w) each; tap_sizes = (h, w) per branch.
  m.def("pyramid_taps_backward_kernel(Tensor grad, int[] tap_sizes, int kernel_size, bool align_corners) -> Tensor[]");
  // --- conv_bn_relu (slsdeep_kernels/ops/conv_bn_relu.py) ---
  // eval: BN folded into the conv, fused bias + ReLU epilogue.
  m.def(
      "conv_bn_relu_eval_kernel(Tensor input, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor running_mean, Tensor running_var, int[2] stride, int[2] padding, int[2] dilation, int groups, float eps, "
      "bool relu) -> Tensor");
  // eval with BN folded by the caller (CPU): conv + bias (accumulation type) + ReLU.
  m.def(
      "conv_bias_act_kernel(Tensor input, Tensor weight, Tensor bias, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, bool relu) -> Tensor");
  // train: (out, conv_out, batch mean, biased batch var); mean/var in the accumulation type.
  m.def(
      "conv_bn_relu_train_kernel(Tensor input, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, float eps, bool relu) -> (Tensor, Tensor, Tensor, Tensor)");
  // grads of (input, weight, bias, bn_weight, bn_bias); conv_out None = recompute the conv; output_mask
  // selects the conv's grads (input, weight, bias), undefined where false.
  m.def(
      "conv_bn_relu_train_backward_kernel(Tensor grad_out, Tensor input, Tensor weight, Tensor? bias, Tensor? conv_out, "
      "Tensor mean, Tensor var, Tensor? bn_weight, Tensor? bn_bias, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, float eps, bool relu, bool[3] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
