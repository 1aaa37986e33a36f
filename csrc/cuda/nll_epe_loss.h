// CUDA kernels of the NLL + EPE loss (docs/design.md §4.3; maths in csrc/common/nll_epe_loss.h). Torch-free:
// raw pointers, sizes and strides (in elements) as int64_t, a stream; every launcher returns the
// launch's cudaError_t. The binding is csrc/cuda_bind/nll_epe_loss.cpp.
//
// One block per tile of 16 rows x 128 columns, a thread per run of 16 columns of a tile row, in
// three stages through shared memory: d = p - v on the tile plus a 2-pixel halo (72 threads load the
// halo's runs too), the EPE and its direction on the tile plus 1, the gradient on the tile. Where
// strides, W % 16 and alignment allow it (channel planes, or channels_last with C = 2), every access
// is a 16-byte pack; otherwise the same kernel reads and writes elements at any strides. The loss
// is reduced per tile into one float; finish_loss sums the partials in a fixed order: deterministic.
//
// Floor (fused forward with the gradient, C = 2, uint8 mask): 17 B per pixel for fp32 logits, 9 B for
// bf16: at (16, 2, 384, 384) 40 / 21 MB, 8.4 / 4.4 us at 4.8 TB/s (H200), 12 / 6.3 us at 3.35 TB/s
// (H100 SXM). The halo is read again from L2, not HBM. Arithmetic: ~6 MUFU operations per pixel
// (exp, 1/(1 + e), log, the EPE's square root and reciprocal, plus the halo's exp and reciprocal):
// 3.4 us on an H200 at that shape, three quarters of the bf16 memory time. Design estimate: 70-80%
// of the HBM roof for fp32 logits, 60-75% for bf16, at 5 (16-bit) or 4 (fp32) blocks per SM.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace slsdeep {
namespace nll_epe_loss_cuda {


// One call: which outputs are present decides what it computes.
struct Problem {
  int64_t N, C, H, W;  // C = 1 (sigmoid) or 2 (softmax)
  DType dtype;  // logits, and the loss, gradient and upstream gradient: kFloat, kHalf or kBFloat16
  const void* logits;
  int64_t logits_stride[4];
  DType target_type;  // kUInt8 (also bool), kInt64 or floating
  const void* target;
  int64_t target_stride[3];
  float alpha;
  void* loss_map = nullptr;  // forward of reduction none: (N, H, W) contiguous
  float* partials = nullptr;  // mean/sum: one sum of NLL + alpha EPE per tile (partial_count of them)
  const void* grad_map = nullptr;  // backward of reduction none: the upstream gradient (N, H, W)
  int64_t grad_map_stride[3] = {0, 0, 0};
  void* gradient = nullptr;  // gradient_scale * d(loss)/d(logits), shaped like the logits
  int64_t gradient_stride[4] = {0, 0, 0, 0};
  float gradient_scale = 1.0f;
};

// Whether the grid of an (N, *, H, W) problem can launch: H and W in 32 bits, N * ceil(H / 16) blocks
// in 2^31 - 1, ceil(W / 128) in 65,535 (run returns cudaErrorInvalidValue otherwise).
bool launchable(int64_t N, int64_t H, int64_t W);

int64_t partial_count(int64_t N, int64_t H, int64_t W);

cudaError_t run(const Problem& problem, cudaStream_t stream);

// loss (one element of dtype) = scale * the sum of the partials, in a fixed order.
cudaError_t finish_loss(DType dtype, const float* partials, int64_t count, double scale, void* loss,
                        cudaStream_t stream);

// gradient *= *factor (fp32 on the device) in place, over numel dense elements; no memory traffic
// where *factor == 1 (decided on the device, no sync).
cudaError_t scale(DType dtype, void* gradient, int64_t numel, const float* factor, cudaStream_t stream);

}  // namespace nll_epe_loss_cuda
}  // namespace slsdeep
