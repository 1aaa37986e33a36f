// Element types of the torch-free kernels: the one dtype enum, the one set of converters to and from
// the fp32 (or fp64) accumulation type, and the one dispatch macro. Torch-free: compiled by the host
// compiler (CPU kernels, torch bindings) and by nvcc alone with only -Icsrc (CUDA kernels); the
// half/bfloat16 parts exist only under nvcc, where cuda_fp16.h / cuda_bf16.h name the types.
#pragma once

#include <cstdint>

#include "common/macros.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace slsdeep {

// A tensor's element type as a launcher receives it. The floating ones are the activations' types
// (the CUDA kernels take kFloat, kHalf, kBFloat16); the others are read only (nll_epe_loss's target;
// a bool target is read as kUInt8). The binding maps a torch ScalarType onto it
// (csrc/cuda_bind/bind.h).
enum class DType : int { kFloat, kHalf, kBFloat16, kDouble, kUInt8, kInt64 };

// Bytes per element of each DType.
SLSDEEP_HD constexpr int bytes_of(DType type) {
  switch (type) {
    case DType::kUInt8:
      return 1;
    case DType::kHalf:
    case DType::kBFloat16:
      return 2;
    case DType::kFloat:
      return 4;
    case DType::kDouble:
    case DType::kInt64:
      return 8;
  }
  return 0;
}

// Element -> accumulation type, and back with round-to-nearest-even. The read-only mask types convert
// to float exactly for the values a mask holds.
SLSDEEP_HD float to_float(float v) { return v; }
SLSDEEP_HD double to_float(double v) { return v; }
SLSDEEP_HD float to_float(uint8_t v) { return static_cast<float>(v); }
SLSDEEP_HD float to_float(int64_t v) { return static_cast<float>(v); }

template <typename T>
SLSDEEP_HD T from_float(float v);
template <>
SLSDEEP_HD float from_float<float>(float v) { return v; }
template <>
SLSDEEP_HD double from_float<double>(float v) { return static_cast<double>(v); }

#if defined(__CUDACC__)
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Runs the statements (...) with `scalar_t` the element type of a floating `dtype` the CUDA kernels
// take (kFloat, kHalf, kBFloat16); any other dtype makes the enclosing launcher return
// cudaErrorInvalidValue (the binding's checks never let one through). For use inside a function
// returning cudaError_t, e.g.
//   SLSDEEP_DISPATCH_FLOATING(dtype, kernel<scalar_t><<<grid, block, 0, stream>>>(...));
//   return cudaGetLastError();
#define SLSDEEP_DISPATCH_FLOATING(dtype, ...) \
  switch (dtype) {                            \
    case ::slsdeep::DType::kFloat: {          \
      using scalar_t = float;                 \
      __VA_ARGS__;                            \
      break;                                  \
    }                                         \
    case ::slsdeep::DType::kHalf: {           \
      using scalar_t = __half;                \
      __VA_ARGS__;                            \
      break;                                  \
    }                                         \
    case ::slsdeep::DType::kBFloat16: {       \
      using scalar_t = __nv_bfloat16;         \
      __VA_ARGS__;                            \
      break;                                  \
    }                                         \
    default:                                  \
      return cudaErrorInvalidValue;           \
  }
#endif

}  // namespace slsdeep
