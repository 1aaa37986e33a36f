// The CPU kernels' variant choice (csrc/cpu/dispatch.h) and the ops that report and override it.
#include "cpu/dispatch.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

namespace slsdeep::cpu {
namespace {

constexpr int kAutomatic = -1;
std::atomic<int> variant_override{kAutomatic};

// The best variant of this build that this CPU can run (the instruction sets each variant's
// pragma enables, as ATen checks them for its own AVX2/AVX512 kernels).
Variant best_runnable() {
#if SLSDEEP_CPU_HAS_VARIANTS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return avx512 ? Variant::AVX512 : avx2 ? Variant::AVX2 : Variant::DEFAULT;
#else
  return Variant::DEFAULT;
#endif
}

// ATen's capability (ATEN_CPU_CAPABILITY applied) as a variant. ATen trusts that variable even
// beyond the CPU, so it only ever lowers the choice.
Variant aten_capability() {
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") return Variant::AVX512;
  if (capability == "AVX2") return Variant::AVX2;
  return Variant::DEFAULT;
}

Variant automatic_variant() {
  static const Variant variant = std::min(best_runnable(), aten_capability());
  return variant;
}

Variant parse(const std::string& name) {
  for (const Variant v : {Variant::DEFAULT, Variant::AVX2, Variant::AVX512}) {
    if (variant_name(v) == name) return v;
  }
  TORCH_CHECK(false, "cpu variant: unknown variant '", name, "'; the variants are DEFAULT, AVX2, AVX512");
}

std::vector<std::string> runnable_variant_names() {
  std::vector<std::string> names;
  for (const Variant v : runnable_variants()) names.push_back(variant_name(v));
  return names;
}

std::string active_variant_name() { return variant_name(active_variant()); }

std::string set_override(const c10::optional<std::string>& variant) { return set_variant_override(variant.value_or("")); }

}  // namespace

std::string variant_name(Variant variant) {
  switch (variant) {
    case Variant::AVX512:
      return "AVX512";
    case Variant::AVX2:
      return "AVX2";
    default:
      return "DEFAULT";
  }
}

Variant active_variant() {
  const int pinned = variant_override.load(std::memory_order_relaxed);
  return pinned == kAutomatic ? automatic_variant() : static_cast<Variant>(pinned);
}

std::vector<Variant> runnable_variants() {
  std::vector<Variant> variants;
  for (int v = 0; v <= static_cast<int>(best_runnable()); ++v) variants.push_back(static_cast<Variant>(v));
  return variants;
}

std::string set_variant_override(const std::string& variant) {
  int pinned = kAutomatic;
  if (!variant.empty()) {
    const Variant v = parse(variant);
    TORCH_CHECK(v <= best_runnable(), "cpu variant: ", variant, " cannot run here (this build and CPU run up to ",
                variant_name(best_runnable()), ")");
    pinned = static_cast<int>(v);
  }
  const int previous = variant_override.exchange(pinned);
  return previous == kAutomatic ? std::string() : variant_name(static_cast<Variant>(previous));
}

}  // namespace slsdeep::cpu

TORCH_LIBRARY_FRAGMENT(slsdeep_kernels, m) {
  m.def("cpu_variant() -> str", &slsdeep::cpu::active_variant_name);
  m.def("cpu_variants() -> str[]", &slsdeep::cpu::runnable_variant_names);
  m.def("_set_cpu_variant(str? variant) -> str", &slsdeep::cpu::set_override);
}
