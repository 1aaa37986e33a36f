// Run-time choice of the CPU kernels' variant (csrc/cpu/variant.h), made per call from one atomic.
//
// An op's CPU implementation is registered once, from its DEFAULT translation unit, as
// SLSDEEP_CPU_DISPATCH(fn): a baseline function that calls fn of the active variant's namespace.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "cpu/variant.h"

namespace slsdeep::cpu {

enum class Variant : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

// The variant the CPU kernels run: the override, else the best this build has and this CPU runs,
// capped by ATen's capability (so ATEN_CPU_CAPABILITY pins it, as it pins ATen's own kernels).
Variant active_variant();
// The variants this build has and this CPU can run, in order (DEFAULT first).
std::vector<Variant> runnable_variants();
// Test-only: every later CPU kernel call of this process runs `variant` (empty: back to automatic);
// returns the override it replaces ("" for automatic), so overrides nest.
std::string set_variant_override(const std::string& variant);
std::string variant_name(Variant variant);

template <auto kDefault, auto kAvx2, auto kAvx512>
struct Dispatch;

template <typename R, typename... Args, R (*kDefault)(Args...), R (*kAvx2)(Args...), R (*kAvx512)(Args...)>
struct Dispatch<kDefault, kAvx2, kAvx512> {
  static R call(Args... args) {
    switch (active_variant()) {
      case Variant::AVX512:
        return kAvx512(std::forward<Args>(args)...);
      case Variant::AVX2:
        return kAvx2(std::forward<Args>(args)...);
      default:
        return kDefault(std::forward<Args>(args)...);
    }
  }
};

}  // namespace slsdeep::cpu

#if SLSDEEP_CPU_HAS_VARIANTS
// Declares fn of the AVX2 and AVX512 variants (defined in their translation units) with the
// DEFAULT one's type, then names the dispatching function.
#define SLSDEEP_CPU_DECLARE_VARIANTS(fn)                                   \
  namespace slsdeep::cpu::AVX2 { decltype(::slsdeep::cpu::DEFAULT::fn) fn; }   \
  namespace slsdeep::cpu::AVX512 { decltype(::slsdeep::cpu::DEFAULT::fn) fn; }
#define SLSDEEP_CPU_DISPATCH(fn)                                                          \
  (&::slsdeep::cpu::Dispatch<&::slsdeep::cpu::DEFAULT::fn, &::slsdeep::cpu::AVX2::fn, \
                             &::slsdeep::cpu::AVX512::fn>::call)
#else
#define SLSDEEP_CPU_DECLARE_VARIANTS(fn)
#define SLSDEEP_CPU_DISPATCH(fn) (&::slsdeep::cpu::DEFAULT::fn)
#endif

// Registers fn under its own name as the dispatching CPU implementation (in a TORCH_LIBRARY_IMPL
// block, whose registrar is m).
#define SLSDEEP_CPU_IMPL(fn) m.impl(#fn, SLSDEEP_CPU_DISPATCH(fn));
