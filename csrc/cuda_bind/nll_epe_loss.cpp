// CUDA binding of nll_epe_loss (slsdeep_kernels/ops/nll_epe_loss.py): checks, allocation and the
// current stream around the torch-free kernels of csrc/cuda/nll_epe_loss.cu. Schemas: csrc/ops.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "alloc.h"
#include "bind_utils.h"
#include "common/nll_epe_loss.h"
#include "cuda/nll_epe_loss.h"
#include "cuda_bind/bind.h"

namespace {

using at::Tensor;
namespace kernels = slsdeep::nll_epe_loss_cuda;
using slsdeep::nll_epe::kMean;
using slsdeep::nll_epe::kNone;
using slsdeep::nll_epe::kSum;
using slsdeep::nll_epe::saved_gradient_scale;

using slsdeep::dtype_of;

constexpr const char* kLogits = "nll_epe_loss (cuda): logits";

slsdeep::DType target_type_of(const Tensor& t) {
  slsdeep::DType type = slsdeep::DType::kFloat;
  TORCH_CHECK(slsdeep::to_dtype(t.scalar_type(), &type),
              "nll_epe_loss (cuda): target must be bool, uint8, int64 or floating point; got ", t.scalar_type());
  return type;
}

kernels::Problem make_problem(const Tensor& logits, const Tensor& target, double alpha) {
  TORCH_CHECK(kernels::launchable(logits.size(0), logits.size(2), logits.size(3)),
              "nll_epe_loss (cuda): logits ", logits.sizes(), " exceed the kernel's grid (H and W below 2^31, at most ",
              "65,535 tiles of 128 columns, N * H / 16 below 2^31)");
  kernels::Problem pb;
  pb.N = logits.size(0);
  pb.C = logits.size(1);
  pb.H = logits.size(2);
  pb.W = logits.size(3);
  pb.dtype = dtype_of(logits, kLogits);
  pb.logits = logits.data_ptr();
  for (int k = 0; k < 4; ++k) pb.logits_stride[k] = logits.stride(k);
  pb.target_type = target_type_of(target);
  pb.target = target.data_ptr();
  for (int k = 0; k < 3; ++k) pb.target_stride[k] = target.stride(k);
  pb.alpha = static_cast<float>(alpha);
  return pb;
}

void set_gradient(kernels::Problem& pb, const Tensor& gradient) {
  pb.gradient = gradient.data_ptr();
  for (int k = 0; k < 4; ++k) pb.gradient_stride[k] = gradient.stride(k);
}

std::tuple<Tensor, Tensor> nll_epe_loss_cuda(const Tensor& logits, const Tensor& target, double alpha, int64_t reduction,
                                             bool compute_grad) {
  slsdeep::nll_epe::check_forward(logits, target, reduction);
  const slsdeep::CudaCall cuda(logits);
  const int64_t N = logits.size(0), H = logits.size(2), W = logits.size(3);
  const bool with_gradient = compute_grad && reduction != kNone;
  Tensor loss = reduction == kNone ? slsdeep::new_output({N, H, W}, logits.options())
                                   : slsdeep::new_output({}, logits.options());
  Tensor gradient = with_gradient ? slsdeep::new_output(logits.sizes(), logits.options(), slsdeep::preserved_format(logits))
                                  : at::empty({0}, logits.options());
  const double scale = reduction == kMean ? 1.0 / static_cast<double>(N * H * W) : 1.0;
  kernels::Problem pb = make_problem(logits, target, alpha);
  Tensor partials;
  if (reduction == kNone) {
    pb.loss_map = loss.data_ptr();
  } else {
    partials = at::empty({kernels::partial_count(N, H, W)}, logits.options().dtype(at::kFloat));
    pb.partials = partials.data_ptr<float>();
  }
  if (with_gradient) {
    set_gradient(pb, gradient);
    pb.gradient_scale = static_cast<float>(
        saved_gradient_scale(logits.scalar_type() == at::kHalf, reduction, N * H * W));
  }
  C10_CUDA_CHECK(kernels::run(pb, cuda.stream));
  if (reduction != kNone) {
    C10_CUDA_CHECK(kernels::finish_loss(pb.dtype, partials.data_ptr<float>(), partials.numel(), scale, loss.data_ptr(),
                                        cuda.stream));
  }
  return {loss, gradient};
}

Tensor nll_epe_loss_backward_cuda(const Tensor& grad_loss, const Tensor& logits, const Tensor& target, double alpha) {
  slsdeep::nll_epe::check_backward(grad_loss, logits, target);
  const slsdeep::CudaCall cuda(logits);
  // contiguous: the 16-byte path needs rows of it (an expanded upstream gradient, (0, 0, 0) strides after
  // loss_map.sum().backward(), would send every operand through the element path)
  const Tensor grad_map = grad_loss.to(logits.scalar_type()).contiguous();
  Tensor gradient = slsdeep::new_output(logits.sizes(), logits.options(), slsdeep::preserved_format(logits));
  kernels::Problem pb = make_problem(logits, target, alpha);
  pb.grad_map = grad_map.data_ptr();
  for (int k = 0; k < 3; ++k) pb.grad_map_stride[k] = grad_map.stride(k);
  set_gradient(pb, gradient);
  C10_CUDA_CHECK(kernels::run(pb, cuda.stream));
  return gradient;
}

void nll_epe_loss_scale_cuda(Tensor& gradient, const Tensor& grad_loss) {
  TORCH_CHECK(grad_loss.numel() == 1, "nll_epe_loss: grad_loss must be a scalar; got ", grad_loss.sizes());
  TORCH_CHECK(gradient.is_non_overlapping_and_dense(), "nll_epe_loss: the saved gradient must be dense");
  const slsdeep::CudaCall cuda(gradient);
  const Tensor factor = grad_loss.to(gradient.device(), at::kFloat);
  C10_CUDA_CHECK(kernels::scale(dtype_of(gradient, kLogits), gradient.data_ptr(), gradient.numel(),
                                factor.data_ptr<float>(), cuda.stream));
}

}  // namespace

TORCH_LIBRARY_IMPL(slsdeep_kernels, CUDA, m) {
  m.impl("nll_epe_loss_kernel", &nll_epe_loss_cuda);
  m.impl("nll_epe_loss_backward_kernel", &nll_epe_loss_backward_cuda);
  m.impl("nll_epe_loss_scale_kernel", &nll_epe_loss_scale_cuda);
}
