// CUDA launchers of pyramid pooling (slsdeep_kernels/ops/pyramid.py, docs/design.md §4.2). Torch-free:
// raw pointers, sizes and strides in elements (int64), the caller's stream; every launcher returns the
// launch's cudaError_t. The torch binding is csrc/cuda_bind/pyramid.cpp. The index maths is
// csrc/common/pyramid.h, shared with (and tested through) the CPU kernels. Every backward is a
// gather: deterministic.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"
#include "common/pyramid.h"

namespace slsdeep {
namespace pyramid_cuda {

// Element strides of a 4-D (N, C, H, W) tensor.
struct Strides {
  int64_t n, c, h, w;
};

// Bins and branches are passed to the kernels by value, up to these counts.
constexpr int kMaxBins = pyramid::kMaxBins;
constexpr int kMaxBranches = 16;

// fp32 workspace of pool_forward and pool_backward (the segment values of csrc/common/pyramid.h);
// -1 when the bins are more than kMaxBins or sum to more than pyramid::kMaxAxisCells.
int64_t pool_workspace_floats(int64_t N, int64_t C, int64_t H, int64_t W, const int64_t* bins, int num_bins);

// out (N, C, sum b^2) contiguous = the adaptive average cells of every bin of x (any strides;
// channels_last: x is NHWC in memory, threads walk it channel-fastest).
cudaError_t pool_forward(DType dtype, const void* x, Strides x_strides, bool channels_last, int64_t N, int64_t C,
                         int64_t H, int64_t W, const int64_t* bins, int num_bins, float* workspace, void* out,
                         cudaStream_t stream);

// grad_x (N, C, H, W) with strides out_strides (channels_last: NHWC in memory) from grad
// (N, C, sum b^2) contiguous.
cudaError_t pool_backward(DType dtype, const void* grad, const int64_t* bins, int num_bins, float* workspace,
                          void* grad_x, Strides out_strides, bool channels_last, int64_t N, int64_t C, int64_t H,
                          int64_t W, cudaStream_t stream);

// Channels [channel_offset, channel_offset + Cb) of out (N, *, H, W) = bilinear resize of z (N, Cb, h, w)
// with strides z_strides (channels_last: out, and for 16-byte packs z too, NHWC in memory).
cudaError_t upsample_branch(DType dtype, const void* z, Strides z_strides, int64_t N, int64_t Cb, int64_t h, int64_t w,
                            void* out, Strides out_strides, bool channels_last, int64_t channel_offset, int64_t H,
                            int64_t W, bool align_corners, cudaStream_t stream);

// Element strides of a tap tensor z (N, C_out, k, k, h, w).
struct TapStrides {
  int64_t n, c, ky, kx, i, j;
};

// One branch's tap tensor; k: its kernel size (odd; branches may differ). Read (TapTensor) by
// taps_add, written (TapGradient) by taps_backward.
template <typename Data>
struct TapTensorOf {
  Data* data;
  int64_t k, h, w;
  TapStrides strides;
};
using TapTensor = TapTensorOf<const void>;
using TapGradient = TapTensorOf<void>;

// out (N, C_out, H, W) += sum over branches and taps (ky, kx) of up(z[:, :, ky, kx])(p + (ky, kx) - k/2),
// k/2 rounded down, zero outside the image.
cudaError_t taps_add(DType dtype, void* out, Strides out_strides, bool channels_last, int64_t N, int64_t C_out, int64_t H,
                     int64_t W, const TapTensor* taps, int num_taps, bool align_corners, cudaStream_t stream);

// The adjoint of taps_add: every grad_taps[b] (N, C, k_b, k_b, h_b, w_b), through its strides (its data
// is written), from channels [channel_offset, channel_offset + C) of grad (N, *, H, W) (channels_last:
// NHWC in memory). The upsample_branch adjoint is its k = 1 case. `workspace`: the fp32 floats
// taps_backward_workspace_floats gives for the same arguments (0: pass nullptr; -1: no tile of the
// kernel fits this device's shared memory, and taps_backward fails with cudaErrorInvalidValue).
int64_t taps_backward_workspace_floats(DType dtype, const void* grad, Strides grad_strides, bool channels_last,
                                       int64_t channel_offset, int64_t N, int64_t C, int64_t H, int64_t W,
                                       const TapGradient* grad_taps, int count, bool align_corners);
cudaError_t taps_backward(DType dtype, const void* grad, Strides grad_strides, bool channels_last, int64_t channel_offset,
                          int64_t N, int64_t C, int64_t H, int64_t W, const TapGradient* grad_taps, int count,
                          bool align_corners, float* workspace, cudaStream_t stream);

}  // namespace pyramid_cuda
}  // namespace slsdeep
