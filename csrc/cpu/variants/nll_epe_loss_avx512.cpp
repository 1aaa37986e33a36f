// The AVX512 variant of csrc/cpu/nll_epe_loss.cpp (csrc/cpu/variant.h).
#define SLSDEEP_CPU_VARIANT_AVX512
#define SLSDEEP_CPU_AVX512_ZMM  // 512-bit vectors: the loss measured 27% faster on them (cpu/variant.h)
#include "cpu/variant.h"
#if SLSDEEP_CPU_VARIANT_BUILT
#include "cpu/nll_epe_loss.cpp"
#endif
