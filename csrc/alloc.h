// Output allocation shared by the CPU kernels and the CUDA bindings (torch side only: never
// include this from csrc/common or csrc/cuda, which stay free of torch headers).
//
// With SLSDEEP_KERNELS_POISON=1 in the environment (the test suite sets it) every output is filled
// with NaN (floating) or 0x5A bytes (integer) before a kernel writes it, so an element a kernel
// forgets to write shows up in the comparison against the reference instead of passing by luck.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdlib>
#include <limits>
#include <cstring>

namespace slsdeep {

inline bool poison_outputs() {
  static const bool enabled = [] {
    const char* value = std::getenv("SLSDEEP_KERNELS_POISON");
    return value != nullptr && std::strcmp(value, "") != 0 && std::strcmp(value, "0") != 0;
  }();
  return enabled;
}

// The memory format an op's output keeps from its input, as PyTorch's own ops (and the Python side's
// backend.preserved_format): channels_last for a 4-D channels_last tensor that is not also contiguous.
inline at::MemoryFormat preserved_format(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous()
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                             at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  at::Tensor out = at::empty(sizes, options.memory_format(format));
  if (poison_outputs()) {
    if (at::isFloatingType(out.scalar_type())) {
      out.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      out.fill_(0x5A);
    }
  }
  return out;
}

}  // namespace slsdeep
