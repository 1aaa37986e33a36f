// CUDA kernels of conv_bn_relu (docs/design.md §4.1): everything around the convolution, which the
// binding (csrc/cuda_bind/conv_bn_relu.cpp) runs through ATen/cuDNN. Torch-free: raw pointers,
// sizes as int64_t, a stream; every launcher returns the launch's cudaError_t.
//
// Activations are dense (N, C, S = H·W), NCHW or NHWC (channels_last), of fp32/fp16/bf16; the
// per-channel vectors (BN parameters, statistics, scale/shift) are fp32, a null γ/β/bias meaning
// 1/0/0. Reductions split the rows (n, s) in a fixed way and merge the parts in order: deterministic.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace slsdeep {
namespace conv_bn_relu_cuda {

struct Activation {
  int64_t N, C, S;
  bool channels_last;
};

// eval: scale = γ/√(running_var+ε), shift = β + (bias − running_mean)·scale (C values each).
cudaError_t fold_eval(const float* gamma, const float* beta, const float* running_mean, const float* running_var,
                      const float* conv_bias, float eps, int64_t C, float* scale, float* shift, cudaStream_t stream);

// out = relu(y·scale[c] + shift[c]) (without the ReLU when !relu); out may be y.
cudaError_t bn_act(DType dtype, const void* y, void* out, const Activation& a, const float* scale, const float* shift,
                   bool relu, cudaStream_t stream);

// fp32 workspace that channel_stats and bn_backward need.
int64_t workspace_floats(const Activation& a);

// training statistics of y in one pass: batch mean, biased variance, and BN's affine map
// (scale = γ/√(var+ε), shift = β − mean·scale) for bn_act.
cudaError_t channel_stats(DType dtype, const void* y, const Activation& a, const float* gamma, const float* beta,
                          float eps, float* workspace, float* mean, float* var, float* scale, float* shift,
                          cudaStream_t stream);

// BN backward in training with the ReLU mask fused: one reduction pass over (grad, y), one
// elementwise pass writing grad_y; also grad_gamma, grad_beta.
cudaError_t bn_backward(DType dtype, const void* grad, const void* y, void* grad_y, const Activation& a,
                        const float* mean, const float* var, const float* gamma, const float* beta, float eps, bool relu,
                        float* workspace, float* grad_gamma, float* grad_beta, cudaStream_t stream);

}  // namespace conv_bn_relu_cuda
}  // namespace slsdeep
