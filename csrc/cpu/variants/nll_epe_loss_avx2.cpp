// The AVX2 variant of csrc/cpu/nll_epe_loss.cpp (csrc/cpu/variant.h).
#define SLSDEEP_CPU_VARIANT_AVX2
#include "cpu/variant.h"
#if SLSDEEP_CPU_VARIANT_BUILT
#include "cpu/nll_epe_loss.cpp"
#endif
