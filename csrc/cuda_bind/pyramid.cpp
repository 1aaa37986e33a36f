// Torch binding of the CUDA pyramid pooling kernels (csrc/cuda/pyramid.cu): checks, allocation,
// the current stream. Same operators and output layouts as the CPU kernels (csrc/cpu/pyramid.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <vector>

#include "alloc.h"
#include "bind_utils.h"
#include "common/pyramid.h"
#include "cuda/pyramid.h"
#include "cuda_bind/bind.h"

namespace slsdeep {
namespace {

namespace kernels = pyramid_cuda;

constexpr const char* kTensors = "pyramid (CUDA): tensors";

kernels::Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

kernels::TapStrides tap_strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4), t.stride(5)};
}

bool is_channels_last(const at::Tensor& t) {
  return slsdeep::preserved_format(t) == at::MemoryFormat::ChannelsLast;
}

at::MemoryFormat memory_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The pool kernels' fp32 workspace (bins already checked), or a clear error past the kernels' 32-bit
// thread counts (one thread per segment pair of each plane, per cell of each plane).
at::Tensor pool_workspace(const at::Tensor& like, at::IntArrayRef bins, int64_t H, int64_t W) {
  TORCH_CHECK(H < INT32_MAX && W < INT32_MAX, "pyramid_pool (CUDA): height and width must be < 2^31, got ", H, "x", W);
  const int64_t floats =
      kernels::pool_workspace_floats(like.size(0), like.size(1), H, W, bins.data(), static_cast<int>(bins.size()));
  const int64_t cells = like.size(0) * like.size(1) * checked_pool_cells(bins);
  TORCH_CHECK(floats >= 0 && floats <= UINT32_MAX && cells <= UINT32_MAX,
              "pyramid_pool (CUDA): N·C times the segments or cells per plane must be < 2^32; got N·C = ",
              like.size(0) * like.size(1));
  return at::empty({floats}, like.options().dtype(at::kFloat));
}

at::Tensor pyramid_pool_kernel(const at::Tensor& x, at::IntArrayRef bins) {
  TORCH_CHECK(x.dim() == 4 && x.size(2) > 0 && x.size(3) > 0, "pyramid_pool_kernel: x must be (N, C, H, W), H, W > 0");
  const CudaCall cuda(x);
  at::Tensor out = new_output({x.size(0), x.size(1), checked_pool_cells(bins)}, x.options());
  at::Tensor workspace = pool_workspace(x, bins, x.size(2), x.size(3));
  C10_CUDA_CHECK(kernels::pool_forward(dtype_of(x, kTensors), x.const_data_ptr(), strides_of(x), channels_innermost(x),
                                       x.size(0), x.size(1), x.size(2), x.size(3), bins.data(),
                                       static_cast<int>(bins.size()), workspace.data_ptr<float>(),
                                       out.mutable_data_ptr(), cuda.stream));
  return out;
}

at::Tensor pyramid_pool_backward_kernel(const at::Tensor& grad, at::IntArrayRef bins, int64_t height, int64_t width,
                                        bool channels_last) {
  TORCH_CHECK(grad.dim() == 3 && grad.size(2) == checked_pool_cells(bins),
              "pyramid_pool_backward_kernel: grad must be (N, C, sum of bin^2)");
  TORCH_CHECK(height > 0 && width > 0, "pyramid_pool_backward_kernel: height and width must be positive");
  const CudaCall cuda(grad);
  const at::Tensor g = grad.contiguous();
  at::Tensor out = new_output({g.size(0), g.size(1), height, width}, g.options(), memory_format(channels_last));
  at::Tensor workspace = pool_workspace(g, bins, height, width);
  C10_CUDA_CHECK(kernels::pool_backward(dtype_of(g, kTensors), g.const_data_ptr(), bins.data(),
                                        static_cast<int>(bins.size()), workspace.data_ptr<float>(),
                                        out.mutable_data_ptr(), strides_of(out), channels_last, g.size(0), g.size(1),
                                        height, width, cuda.stream));
  return out;
}

// The upsample kernel's 32-bit thread count: one per output element of the branch at most.
bool z_fits(const at::Tensor& branch, const at::Tensor& x) {
  return branch.size(0) * branch.size(1) * x.size(2) * x.size(3) <= static_cast<int64_t>(UINT32_MAX);
}

at::Tensor upsample_concat_kernel(const at::Tensor& x, at::TensorList branches, bool align_corners,
                                  bool channels_last) {
  TORCH_CHECK(x.dim() == 4, "upsample_concat_kernel: x must be (N, C, H, W)");
  const CudaCall cuda(x);
  int64_t channels = x.size(1);
  for (const at::Tensor& z : branches) {
    TORCH_CHECK(z.dim() == 4 && z.size(0) == x.size(0) && z.size(2) > 0 && z.size(3) > 0 &&
                    z.scalar_type() == x.scalar_type() && z.device() == x.device(),
                "upsample_concat_kernel: every branch must be (N, C_b, h, w), h, w > 0, of x's batch, dtype and device");
    channels += z.size(1);
  }
  at::Tensor out = new_output({x.size(0), channels, x.size(2), x.size(3)}, x.options(), memory_format(channels_last));
  out.narrow(1, 0, x.size(1)).copy_(x);
  int64_t offset = x.size(1);
  for (const at::Tensor& branch : branches) {
    TORCH_CHECK(z_fits(branch, x), "upsample_concat_kernel (CUDA): N·C_b·H·W of a branch must be < 2^32");
    const at::Tensor z = branch.contiguous(memory_format(channels_last));  // the output's layout: 16-byte packs
    C10_CUDA_CHECK(kernels::upsample_branch(dtype_of(x, kTensors), z.const_data_ptr(), strides_of(z), z.size(0),
                                            z.size(1), z.size(2), z.size(3), out.mutable_data_ptr(), strides_of(out),
                                            channels_last, offset, x.size(2), x.size(3), align_corners, cuda.stream));
    offset += z.size(1);
  }
  return out;
}

// Every grad in `grads` ((N, C, k, k, h, w) views; written) = the adjoint of taps_add from channels
// [channel_offset, channel_offset + C) of grad: kernels::taps_backward with the workspace it asks for.
void taps_backward_into(const char* op, const at::Tensor& grad, int64_t channel_offset, int64_t C,
                        const std::vector<at::Tensor>& grads, bool align_corners, const CudaCall& cuda) {
  if (grad.numel() == 0) {  // an empty output reads nothing: the branches' gradients are zero
    for (const at::Tensor& g : grads) g.zero_();
    return;
  }
  std::vector<kernels::TapGradient> tensors;
  for (const at::Tensor& g : grads) tensors.push_back({g.mutable_data_ptr(), g.size(2), g.size(4), g.size(5), tap_strides_of(g)});
  const DType dtype = dtype_of(grad, kTensors);
  const bool channels_last = is_channels_last(grad);
  const int64_t N = grad.size(0), H = grad.size(2), W = grad.size(3);
  const int64_t floats = kernels::taps_backward_workspace_floats(dtype, grad.const_data_ptr(), strides_of(grad),
                                                                 channels_last, channel_offset, N, C, H, W,
                                                                 tensors.data(), static_cast<int>(tensors.size()), align_corners);
  TORCH_CHECK(floats >= 0, op, " (CUDA): the branches' source rows (sum of k·h = ", [&] {
    int64_t rows = 0;
    for (const at::Tensor& g : grads) rows += g.size(2) * g.size(4);
    return rows;
  }(), ") do not fit the kernel's shared memory on this device, or a size passes its 32-bit limits");
  at::Tensor workspace = at::empty({floats}, grad.options().dtype(at::kFloat));
  C10_CUDA_CHECK(kernels::taps_backward(dtype, grad.const_data_ptr(), strides_of(grad), channels_last, channel_offset,
                                        N, C, H, W, tensors.data(), static_cast<int>(tensors.size()), align_corners,
                                        floats > 0 ? workspace.data_ptr<float>() : nullptr, cuda.stream));
}

std::vector<at::Tensor> upsample_concat_backward_kernel(const at::Tensor& grad, int64_t channels,
                                                        at::IntArrayRef branch_sizes, bool align_corners) {
  TORCH_CHECK(grad.dim() == 4 && branch_sizes.size() % 3 == 0,
              "upsample_concat_backward_kernel: grad (N, C_total, H, W) and (C_b, h, w) per branch");
  int64_t total = channels;
  for (size_t b = 0; b < branch_sizes.size(); b += 3) {
    TORCH_CHECK(branch_sizes[b] >= 0 && branch_sizes[b + 1] > 0 && branch_sizes[b + 2] > 0,
                "upsample_concat_backward_kernel: branch sizes (C_b, h, w) must be >= 0, > 0, > 0; got (",
                branch_sizes[b], ", ", branch_sizes[b + 1], ", ", branch_sizes[b + 2], ")");
    total += branch_sizes[b];
  }
  TORCH_CHECK(channels >= 0 && total == grad.size(1), "upsample_concat_backward_kernel: channels (", channels,
              " + the branches') do not add up to grad's ", grad.size(1));
  const CudaCall cuda(grad);
  std::vector<at::Tensor> grads;
  int64_t offset = channels;
  for (size_t b = 0; b < branch_sizes.size(); b += 3) {
    const int64_t cb = branch_sizes[b], h = branch_sizes[b + 1], w = branch_sizes[b + 2];
    at::Tensor grad_z = new_output({grad.size(0), cb, h, w}, grad.options());
    if (cb > 0) {  // the k = 1 adjoint, (N, C_b, 1, 1, h, w)
      taps_backward_into("upsample_concat_backward_kernel", grad, offset, cb, {grad_z.view({grad.size(0), cb, 1, 1, h, w})},
                         align_corners, cuda);
    }
    offset += cb;
    grads.push_back(grad_z);
  }
  return grads;
}

// k is read from each tap tensor; branches may have different k.
void pyramid_taps_add_kernel(const at::Tensor& out, at::TensorList taps, bool align_corners) {
  TORCH_CHECK(out.dim() == 4, "pyramid_taps_add_kernel: out must be (N, C_out, H, W)");
  TORCH_CHECK(static_cast<int64_t>(taps.size()) <= kernels::kMaxBranches, "pyramid_taps_add_kernel: at most ",
              kernels::kMaxBranches, " branches on CUDA, got ", taps.size());
  const CudaCall cuda(out);
  std::vector<kernels::TapTensor> tensors;
  for (const at::Tensor& z : taps) {
    TORCH_CHECK(z.dim() == 6 && z.size(0) == out.size(0) && z.size(1) == out.size(1) && z.size(2) == z.size(3) &&
                    z.size(2) % 2 == 1 && z.scalar_type() == out.scalar_type() && z.device() == out.device(),
                "pyramid_taps_add_kernel: every tap tensor must be (N, C_out, k, k, h, w), k odd, of out's dtype and "
                "device; got ", z.sizes(), " ", z.scalar_type(), " on ", z.device(), " for out ", out.sizes(), " ",
                out.scalar_type(), " on ", out.device());
    tensors.push_back({z.const_data_ptr(), z.size(2), z.size(4), z.size(5), tap_strides_of(z)});
  }
  const cudaError_t status = kernels::taps_add(dtype_of(out, kTensors), out.mutable_data_ptr(), strides_of(out),
                                               is_channels_last(out), out.size(0), out.size(1), out.size(2), out.size(3),
                                               tensors.data(), static_cast<int>(tensors.size()), align_corners, cuda.stream);
  TORCH_CHECK(status != cudaErrorInvalidValue, "pyramid_taps_add_kernel (CUDA): no tile of the kernel fits 48 KB of ",
              "shared memory for these branches (one output row reading thousands of source rows?), or a size passes ",
              "its 32-bit limits; out ", out.sizes());
  C10_CUDA_CHECK(status);
}

// Each grad is returned as (N, C_out, k, k, h, w), k = kernel_size, over (N, h, w, k, k, C_out) storage: the
// layout the op gives the CUDA kernels z in (channels innermost, ops/pyramid.py), read by its matmuls as is.
std::vector<at::Tensor> pyramid_taps_backward_kernel(const at::Tensor& grad, at::IntArrayRef tap_sizes,
                                                     int64_t kernel_size, bool align_corners) {
  TORCH_CHECK(grad.dim() == 4 && tap_sizes.size() % 2 == 0,
              "pyramid_taps_backward_kernel: grad (N, C_out, H, W) and (h, w) per branch");
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1,
              "pyramid_taps_backward_kernel: kernel_size must be odd and >= 1, got ", kernel_size);
  TORCH_CHECK(static_cast<int64_t>(tap_sizes.size() / 2) <= kernels::kMaxBranches, "pyramid_taps_backward_kernel: at most ",
              kernels::kMaxBranches, " branches on CUDA, got ", tap_sizes.size() / 2);
  const int64_t k = kernel_size;
  const CudaCall cuda(grad);
  std::vector<at::Tensor> grads;
  for (size_t b = 0; b < tap_sizes.size(); b += 2) {
    const int64_t h = tap_sizes[b], w = tap_sizes[b + 1];
    TORCH_CHECK(h > 0 && w > 0, "pyramid_taps_backward_kernel: branch sizes must be positive, got ", h, "x", w);
    grads.push_back(new_output({grad.size(0), h, w, k, k, grad.size(1)}, grad.options()).permute({0, 5, 3, 4, 1, 2}));
  }
  if (!grads.empty()) taps_backward_into("pyramid_taps_backward_kernel", grad, 0, grad.size(1), grads, align_corners, cuda);
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(slsdeep_kernels, CUDA, m) {
#define SLSDEEP_IMPL(fn) m.impl(#fn, &fn);
  SLSDEEP_PYRAMID_KERNELS(SLSDEEP_IMPL)
#undef SLSDEEP_IMPL
}

}  // namespace slsdeep
