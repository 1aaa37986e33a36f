// CUDA binding of conv_bn_relu (slsdeep_kernels/ops/conv_bn_relu.py): the convolution (and its
// backward) through ATen/cuDNN, everything around it through the torch-free kernels of
// csrc/cuda/conv_bn_relu.cu. Schemas: csrc/ops.cpp.
//   eval:  with a ReLU, BN folded into the weights and cuDNN's fused conv + bias + ReLU
//          (aten::cudnn_convolution_relu) where cuDNN takes the configuration (decided at run time);
//          else cuDNN conv with the raw weights, then ONE epilogue pass applying the folded BN (fp32
//          scale/shift per channel) and the ReLU in place;
//   train: conv, ONE statistics pass, ONE normalise + affine + ReLU pass;
//   backward: one reduction and one elementwise pass (ReLU mask fused), then the conv backward.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cudnn_convolution_relu.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <torch/library.h>

#include <exception>
#include <mutex>
#include <set>
#include <tuple>
#include <vector>

#include "alloc.h"
#include "bind_utils.h"
#include "cuda/conv_bn_relu.h"
#include "cuda_bind/bind.h"

namespace {

using at::Tensor;
namespace kernels = slsdeep::conv_bn_relu_cuda;
namespace cbr = slsdeep::conv_bn_relu;
using slsdeep::dtype_of;

constexpr const char* kWhat = "conv_bn_relu (cuda): input";

kernels::Activation activation_of(const Tensor& y, at::MemoryFormat format) {
  return {y.size(0), y.size(1), y.size(2) * y.size(3), format == at::MemoryFormat::ChannelsLast};
}

// A per-channel vector as contiguous fp32 on the device (undefined when absent).
Tensor channel_f32(const c10::optional<Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->to(at::kFloat).contiguous() : Tensor();
}

const float* pointer(const Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

// out = act(out·scale + shift) in place: the epilogue pass after a conv cuDNN could not fuse.
void epilogue(Tensor& out, at::MemoryFormat format, const float* scale, const float* shift, bool relu,
              cudaStream_t stream) {
  C10_CUDA_CHECK(kernels::bn_act(dtype_of(out, kWhat), out.data_ptr(), out.data_ptr(), activation_of(out, format), scale,
                                 shift, relu, stream));
}

// The configurations (dtype, layout, conv geometry) cuDNN refused to fuse: decided at run time, the
// first refusal remembered, so each configuration tries once.
struct FusedKey {
  at::ScalarType dtype;
  bool channels_last;
  std::vector<int64_t> geometry;  // weight sizes, stride, padding, dilation, groups
  bool operator<(const FusedKey& o) const {
    return std::tie(dtype, channels_last, geometry) < std::tie(o.dtype, o.channels_last, o.geometry);
  }
};

class FusedRefusals {
 public:
  bool refused(const FusedKey& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    return keys_.count(key) != 0;
  }
  void refuse(const FusedKey& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    keys_.insert(key);
  }

 private:
  std::mutex mutex_;
  std::set<FusedKey> keys_;
};

FusedRefusals& refusals() {
  static FusedRefusals instance;
  return instance;
}

FusedKey fused_key(const Tensor& x, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t groups, at::MemoryFormat format) {
  std::vector<int64_t> geometry(weight.sizes().begin(), weight.sizes().end());
  for (at::IntArrayRef part : {stride, padding, dilation}) geometry.insert(geometry.end(), part.begin(), part.end());
  geometry.push_back(groups);
  return {x.scalar_type(), format == at::MemoryFormat::ChannelsLast, geometry};
}

// Whether to try cuDNN's fused conv + bias + ReLU for this call: cuDNN on, non-deterministic algorithms
// allowed (the fused call picks its own), a dtype the CUDA kernels take, and no refusal of the
// configuration yet.
bool may_fuse(const FusedKey& key) {
  const auto& context = at::globalContext();
  const auto dtype = key.dtype;
  return context.userEnabledCuDNN() && !context.deterministicCuDNN() && !context.deterministicAlgorithms() &&
         (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) && !refusals().refused(key);
}

// relu(conv(x, W) + bias) in ONE cuDNN call (aten::cudnn_convolution_relu, bias in x's dtype), or an
// undefined tensor where cuDNN refuses this configuration (remembered: it is not tried again). Out of
// memory is not a refusal and propagates; a refusal's CUDA error state is cleared for the fallback.
Tensor fused_conv_bias_relu(const Tensor& x, const Tensor& weight, const Tensor& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const FusedKey& key,
                            at::MemoryFormat format) {
  try {
    return at::cudnn_convolution_relu(x, weight.contiguous(format), bias.to(x.scalar_type()), stride, padding, dilation,
                                      groups)
        .contiguous(format);
  } catch (const c10::OutOfMemoryError&) {
    throw;
  } catch (const std::exception&) {  // c10::Error, and cudnn_frontend's std::runtime_error from its graph builders
    (void)cudaGetLastError();
    refusals().refuse(key);
    return Tensor();
  }
}

// eval: with a ReLU, BN folded into the weights and cuDNN's fused conv + bias + ReLU (no pass over
// the output after the conv); else (no ReLU, or cuDNN refused the configuration) cuDNN's conv with
// the raw weights and ONE epilogue pass applying the folded BN (fp32 scale/shift) and the ReLU.
Tensor conv_bn_relu_eval_cuda(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                              const c10::optional<Tensor>& bn_weight, const c10::optional<Tensor>& bn_bias,
                              const Tensor& running_mean, const Tensor& running_var, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double eps, bool relu) {
  const slsdeep::CudaCall cuda(input);
  const auto format = slsdeep::preserved_format(input);
  const Tensor x = input.contiguous(format);
  const int64_t C = weight.size(0);
  const Tensor gamma = channel_f32(bn_weight), beta = channel_f32(bn_bias), b = channel_f32(bias);
  const Tensor mean = running_mean.to(at::kFloat).contiguous(), var = running_var.to(at::kFloat).contiguous();
  Tensor affine = at::empty({2, C}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(kernels::fold_eval(pointer(gamma), pointer(beta), pointer(mean), pointer(var), pointer(b),
                                    static_cast<float>(eps), C, affine.data_ptr<float>(), affine.data_ptr<float>() + C,
                                    cuda.stream));
  const FusedKey key = fused_key(x, weight, stride, padding, dilation, groups, format);
  if (relu && may_fuse(key)) {
    const Tensor folded = weight.to(at::kFloat).mul(affine[0].view({C, 1, 1, 1})).to(weight.scalar_type());
    Tensor fused = fused_conv_bias_relu(x, folded, affine[1], stride, padding, dilation, groups, key, format);
    if (fused.defined()) return fused;
  }
  Tensor out = cbr::convolution(x, weight, c10::nullopt, stride, padding, dilation, groups, format);
  epilogue(out, format, affine.data_ptr<float>(), affine.data_ptr<float>() + C, relu, cuda.stream);
  return out;
}

// The eval conv with BN already folded into weight and (fp32) bias, the fold cached by the caller
// (slsdeep_kernels.backend.derived): cuDNN's fused conv + bias + ReLU, else conv and one epilogue pass.
Tensor conv_bias_act_cuda(const Tensor& input, const Tensor& weight, const Tensor& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  const slsdeep::CudaCall cuda(input);
  const auto format = slsdeep::preserved_format(input);
  const Tensor x = input.contiguous(format);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && bias.scalar_type() == at::kFloat && bias.dim() == 1 &&
                  bias.size(0) == weight.size(0),
              "conv_bias_act_kernel: weight of the input's dtype and a (C_out,) float32 bias");
  TORCH_CHECK(weight.device() == x.device() && bias.device() == x.device(),
              "conv_bias_act_kernel: input, weight and bias must be on one device; got ", x.device(), ", ",
              weight.device(), ", ", bias.device());
  (void)dtype_of(x, kWhat);  // float32, float16 or bfloat16, as every CUDA kernel here
  const FusedKey key = fused_key(x, weight, stride, padding, dilation, groups, format);
  if (relu && may_fuse(key)) {
    Tensor fused = fused_conv_bias_relu(x, weight, bias, stride, padding, dilation, groups, key, format);
    if (fused.defined()) return fused;
  }
  Tensor out = cbr::convolution(x, weight, c10::nullopt, stride, padding, dilation, groups, format);
  const Tensor ones = at::ones({weight.size(0)}, bias.options()), shift = bias.contiguous();
  epilogue(out, format, ones.const_data_ptr<float>(), shift.const_data_ptr<float>(), relu, cuda.stream);
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv_bn_relu_train_cuda(
    const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias, const c10::optional<Tensor>& bn_weight,
    const c10::optional<Tensor>& bn_bias, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, double eps, bool relu) {
  const slsdeep::CudaCall cuda(input);
  const auto format = slsdeep::preserved_format(input);
  const Tensor y = cbr::convolution(input.contiguous(format), weight, bias, stride, padding, dilation, groups, format);
  const auto a = activation_of(y, format);
  const auto f32 = y.options().dtype(at::kFloat);
  const Tensor gamma = channel_f32(bn_weight), beta = channel_f32(bn_bias);
  Tensor mean = slsdeep::new_output({a.C}, f32), var = slsdeep::new_output({a.C}, f32);
  Tensor workspace = at::empty({kernels::workspace_floats(a)}, f32);
  Tensor affine = at::empty({2, a.C}, f32);
  Tensor out = slsdeep::new_output(y.sizes(), y.options(), format);
  C10_CUDA_CHECK(kernels::channel_stats(dtype_of(y, kWhat), y.const_data_ptr(), a, pointer(gamma), pointer(beta),
                                        static_cast<float>(eps), workspace.data_ptr<float>(), mean.data_ptr<float>(),
                                        var.data_ptr<float>(), affine.data_ptr<float>(), affine.data_ptr<float>() + a.C,
                                        cuda.stream));
  C10_CUDA_CHECK(kernels::bn_act(dtype_of(y, kWhat), y.const_data_ptr(), out.data_ptr(), a, affine.data_ptr<float>(),
                                 affine.data_ptr<float>() + a.C, relu, cuda.stream));
  return {out, y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn_relu_train_backward_cuda(
    const Tensor& grad_out, const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& conv_out, const Tensor& mean, const Tensor& var, const c10::optional<Tensor>& bn_weight,
    const c10::optional<Tensor>& bn_bias, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, double eps, bool relu, std::array<bool, 3> output_mask) {
  const slsdeep::CudaCall cuda(input);
  const auto format = slsdeep::preserved_format(input);
  const Tensor x = input.contiguous(format);
  const Tensor y = cbr::saved_or_recomputed(conv_out, x, weight, bias, stride, padding, dilation, groups, format);
  const Tensor grad = grad_out.contiguous(format);
  const auto a = activation_of(y, format);
  const auto f32 = y.options().dtype(at::kFloat);
  const Tensor gamma = channel_f32(bn_weight), beta = channel_f32(bn_bias);
  const Tensor mu = mean.to(at::kFloat).contiguous(), v = var.to(at::kFloat).contiguous();
  Tensor workspace = at::empty({kernels::workspace_floats(a)}, f32);
  Tensor grad_gamma = slsdeep::new_output({a.C}, f32), grad_beta = slsdeep::new_output({a.C}, f32);
  Tensor grad_y = slsdeep::new_output(y.sizes(), y.options(), format);
  C10_CUDA_CHECK(kernels::bn_backward(dtype_of(y, kWhat), grad.const_data_ptr(), y.const_data_ptr(), grad_y.data_ptr(),
                                      a, pointer(mu), pointer(v), pointer(gamma), pointer(beta),
                                      static_cast<float>(eps), relu, workspace.data_ptr<float>(),
                                      grad_gamma.data_ptr<float>(), grad_beta.data_ptr<float>(), cuda.stream));
  return cbr::backward_tail(grad_y, x, weight, a.C, stride, padding, dilation, groups, output_mask, bn_weight, bn_bias,
                            grad_gamma, grad_beta);
}

}  // namespace

TORCH_LIBRARY_IMPL(slsdeep_kernels, CUDA, m) {
  m.impl("conv_bn_relu_eval_kernel", &conv_bn_relu_eval_cuda);
  m.impl("conv_bias_act_kernel", &conv_bias_act_cuda);
  m.impl("conv_bn_relu_train_kernel", &conv_bn_relu_train_cuda);
  m.impl("conv_bn_relu_train_backward_kernel", &conv_bn_relu_train_backward_cuda);
}
