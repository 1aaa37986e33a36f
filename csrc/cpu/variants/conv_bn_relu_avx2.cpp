// The AVX2 variant of csrc/cpu/conv_bn_relu.cpp (csrc/cpu/variant.h).
#define SLSDEEP_CPU_VARIANT_AVX2
#include "cpu/variant.h"
#if SLSDEEP_CPU_VARIANT_BUILT
#include "cpu/conv_bn_relu.cpp"
#endif
