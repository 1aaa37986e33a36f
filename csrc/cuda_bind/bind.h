// What every CUDA binding (csrc/cuda_bind/<op>.cpp) does around a torch-free launcher of csrc/cuda:
// the dtype it passes, the device guard and stream it launches on, and how a launch's error is
// reported. Torch side only: never include this from csrc/common or csrc/cuda.
//
// The launch-error convention: every launcher returns its cudaError_t (cudaGetLastError() after the
// launches, cudaSuccess when there was nothing to launch), and the binding wraps every call in
// C10_CUDA_CHECK, which raises a c10::Error naming the CUDA error, the file and the line.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/dtype.h"

namespace slsdeep {

// The launcher's DType of a torch element type (bool is read as uint8); false where it has none.
inline bool to_dtype(at::ScalarType type, DType* dtype) {
  switch (type) {
    case at::kFloat:
      *dtype = DType::kFloat;
      return true;
    case at::kHalf:
      *dtype = DType::kHalf;
      return true;
    case at::kBFloat16:
      *dtype = DType::kBFloat16;
      return true;
    case at::kDouble:
      *dtype = DType::kDouble;
      return true;
    case at::kBool:
    case at::kByte:
      *dtype = DType::kUInt8;
      return true;
    case at::kLong:
      *dtype = DType::kInt64;
      return true;
    default:
      return false;
  }
}

// The DType of a tensor the CUDA kernels compute in: float32, float16 or bfloat16, else an error
// "<what> must be float32, float16 or bfloat16; got <dtype>" (what: e.g. "conv_bn_relu (cuda): input").
inline DType dtype_of(const at::Tensor& t, const char* what) {
  DType dtype = DType::kFloat;
  const bool floating = to_dtype(t.scalar_type(), &dtype) &&
                        (dtype == DType::kFloat || dtype == DType::kHalf || dtype == DType::kBFloat16);
  TORCH_CHECK(floating, what, " must be float32, float16 or bfloat16; got ", t.scalar_type());
  return dtype;
}

// The device guard and the stream of one binding call: construct it first (from the tensor whose
// device the op runs on), then launch on `stream`, the current stream of that device.
struct CudaCall {
  explicit CudaCall(const at::Tensor& on) : guard(on.device()), stream(c10::cuda::getCurrentCUDAStream()) {}
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
};

}  // namespace slsdeep
