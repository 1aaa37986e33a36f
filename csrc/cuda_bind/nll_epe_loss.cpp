// CUDA binding of nll_epe_loss (slsdeep_kernels/ops/nll_epe_loss.py): checks, allocation and the
// current stream around the torch-free kernels of csrc/cuda/nll_epe_loss.cu. Schemas: csrc/ops.cpp.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "alloc.h"
#include "common/nll_epe_loss.h"
#include "cuda/nll_epe_loss.h"

namespace {

using at::Tensor;
namespace kernels = slsdeep::nll_epe_loss_cuda;
using slsdeep::nll_epe::kMean;
using slsdeep::nll_epe::kNone;
using slsdeep::nll_epe::kSum;
using slsdeep::nll_epe::saved_gradient_scale;

kernels::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kernels::DType::kFloat;
    case at::kHalf:
      return kernels::DType::kHalf;
    case at::kBFloat16:
      return kernels::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "nll_epe_loss (cuda): logits must be float32, float16 or bfloat16; got ", t.scalar_type());
  }
}

kernels::TargetType target_type_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBool:
    case at::kByte:
      return kernels::TargetType::kUInt8;
    case at::kLong:
      return kernels::TargetType::kInt64;
    case at::kFloat:
      return kernels::TargetType::kFloat;
    case at::kDouble:
      return kernels::TargetType::kDouble;
    case at::kHalf:
      return kernels::TargetType::kHalf;
    case at::kBFloat16:
      return kernels::TargetType::kBFloat16;
    default:
      TORCH_CHECK(false, "nll_epe_loss (cuda): target must be bool, uint8, int64 or floating point; got ", t.scalar_type());
  }
}


void check_inputs(const Tensor& logits, const Tensor& target) {
  TORCH_CHECK(logits.dim() == 4 && (logits.size(1) == 1 || logits.size(1) == 2),
              "nll_epe_loss: logits must be (N, C, H, W) with C = 1 or 2; got ", logits.sizes());
  TORCH_CHECK(target.dim() == 3 && target.size(0) == logits.size(0) && target.size(1) == logits.size(2) &&
                  target.size(2) == logits.size(3),
              "nll_epe_loss: target must be (N, H, W) matching logits ", logits.sizes(), "; got ", target.sizes());
  TORCH_CHECK(logits.numel() > 0, "nll_epe_loss: logits must not be empty");
  TORCH_CHECK(target.device() == logits.device(), "nll_epe_loss: target must be on ", logits.device(), "; got ",
              target.device());
}

kernels::Problem make_problem(const Tensor& logits, const Tensor& target, double alpha) {
  kernels::Problem pb;
  pb.N = logits.size(0);
  pb.C = logits.size(1);
  pb.H = logits.size(2);
  pb.W = logits.size(3);
  pb.dtype = dtype_of(logits);
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
  check_inputs(logits, target);
  TORCH_CHECK(reduction == kNone || reduction == kMean || reduction == kSum, "nll_epe_loss: bad reduction code ", reduction);
  c10::cuda::CUDAGuard guard(logits.device());
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
  const auto stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(kernels::run(pb, stream));
  if (reduction != kNone) {
    C10_CUDA_CHECK(kernels::finish_loss(pb.dtype, partials.data_ptr<float>(), partials.numel(), scale, loss.data_ptr(), stream));
  }
  return {loss, gradient};
}

Tensor nll_epe_loss_backward_cuda(const Tensor& grad_loss, const Tensor& logits, const Tensor& target, double alpha) {
  check_inputs(logits, target);
  TORCH_CHECK(grad_loss.sizes() == target.sizes(), "nll_epe_loss: grad_loss must be (N, H, W) = ", target.sizes(),
              "; got ", grad_loss.sizes());
  c10::cuda::CUDAGuard guard(logits.device());
  const Tensor grad_map = grad_loss.to(logits.scalar_type());
  Tensor gradient = slsdeep::new_output(logits.sizes(), logits.options(), slsdeep::preserved_format(logits));
  kernels::Problem pb = make_problem(logits, target, alpha);
  pb.grad_map = grad_map.data_ptr();
  for (int k = 0; k < 3; ++k) pb.grad_map_stride[k] = grad_map.stride(k);
  set_gradient(pb, gradient);
  C10_CUDA_CHECK(kernels::run(pb, at::cuda::getCurrentCUDAStream()));
  return gradient;
}

void nll_epe_loss_scale_cuda(Tensor& gradient, const Tensor& grad_loss) {
  TORCH_CHECK(grad_loss.numel() == 1, "nll_epe_loss: grad_loss must be a scalar; got ", grad_loss.sizes());
  TORCH_CHECK(gradient.is_non_overlapping_and_dense(), "nll_epe_loss: the saved gradient must be dense");
  c10::cuda::CUDAGuard guard(gradient.device());
  const Tensor factor = grad_loss.to(gradient.device(), at::kFloat);
  C10_CUDA_CHECK(kernels::scale(dtype_of(gradient), gradient.data_ptr(), gradient.numel(), factor.data_ptr<float>(),
                                at::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(slsdeep_kernels, CUDA, m) {
  m.impl("nll_epe_loss_kernel", &nll_epe_loss_cuda);
  m.impl("nll_epe_loss_backward_kernel", &nll_epe_loss_backward_cuda);
  m.impl("nll_epe_loss_scale_kernel", &nll_epe_loss_scale_cuda);
}
