// Reductions of the CPU kernels in fixed lanes, included INSIDE a variant's namespace (after
// SLSDEEP_CPU_VARIANT_BEGIN), so each variant compiles them for its own instructions.
//
// kLanes independent accumulators, merged in a fixed order: the compiler vectorises the lanes
// without reassociating, so a sum is the same bits on every variant and thread count (an
// `omp simd reduction` would follow the vector width). Includes nothing: the op file includes
// <cstdint> before the variant opens.
#pragma once

constexpr int kLanes = 16;

// The sum of p[0, n) in acc_t.
template <typename acc_t, typename scalar_t>
acc_t sum_span(const scalar_t* p, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] += static_cast<acc_t>(p[i + j]);
  }
  acc_t total = 0;
  for (; i < n; ++i) total += static_cast<acc_t>(p[i]);
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}
