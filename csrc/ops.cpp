// Operator schemas of the compiled kernels, namespace slsdeep_kernels.
//
// This file is the contract between Python and the kernels: every compiled op is declared here
// once. Implementations register per device next to their kernels:
//   CPU  -> TORCH_LIBRARY_IMPL(slsdeep_kernels, CPU, m)  in csrc/cpu/<op>.cpp
//   CUDA -> TORCH_LIBRARY_IMPL(slsdeep_kernels, CUDA, m) in csrc/cuda_bind/<op>.cpp
// Fake (meta) kernels and autograd are registered from Python (slsdeep_kernels/ops/<op>.py),
// where each public op is a torch.library custom op that calls these.
#include <torch/library.h>

TORCH_LIBRARY(slsdeep_kernels, m) {
  // --- nll_epe_loss (slsdeep_kernels/ops/nll_epe_loss.py) ---
  // --- pyramid (slsdeep_kernels/ops/pyramid.py) ---
  // --- conv_bn_relu (slsdeep_kernels/ops/conv_bn_relu.py) ---
}
