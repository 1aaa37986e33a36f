// The AVX512 variant of csrc/cpu/pyramid.cpp (csrc/cpu/variant.h).
#define SLSDEEP_CPU_VARIANT_AVX512
#include "cpu/variant.h"
#if SLSDEEP_CPU_VARIANT_BUILT
#include "cpu/pyramid.cpp"
#endif
