// The CPU kernels' instruction-set variants (run-time ISA dispatch, as ATen's native/cpu kernels).
//
// Every csrc/cpu/<op>.cpp is compiled once per variant: directly as DEFAULT (baseline x86-64, or
// whatever the platform's baseline is), and through csrc/cpu/variants/<op>_<variant>.cpp, a wrapper
// that defines SLSDEEP_CPU_VARIANT_<NAME> and includes the op's file, as AVX2 and AVX512. setuptools
// has no per-file compile flags, so a variant's instruction set is not a flag but a
// `#pragma GCC target` that SLSDEEP_CPU_VARIANT_BEGIN opens AFTER the file's #includes:
//  * everything the pragma covers (the op's own code) is in namespace slsdeep::cpu::<NAME>, so no
//    two variants share a symbol;
//  * the inline ATen/c10/std code of the headers is defined before the pragma, so its out-of-line
//    copies are baseline code in every variant: the copy the linker keeps can never be AVX-512
//    (tests/test_cpu_variants.py disassembles _C to prove it). Baseline code still inlines into a
//    variant's functions, where it is compiled for the variant's instructions.
// The pragma names instruction sets only (no arch=/tune=), which keeps that inlining legal in GCC.
// The AVX512 variant's vector width is chosen per op, as measured (docs/design.md §6): AVX-512
// instructions on 256-bit vectors by default, 512-bit vectors where the op's wrapper defines
// SLSDEEP_CPU_AVX512_ZMM (the loss). On a Zen 5 the pyramid's short rows and the BatchNorm passes
// ran 13% to 3x slower on 512-bit vectors than on 256-bit ones; the loss's rows ran 27% faster.
// csrc/cpu/dispatch.h picks the variant at run time. Variants are built with GCC on x86-64; any
// other compiler or platform builds DEFAULT only.
//
// The vectorisation style, one for every CPU file: plain loops over contiguous spans, in the
// accumulation type (bf16 and fp16 converted to fp32 lanes in the loop), that the compiler
// vectorises for each variant: `#pragma omp simd` on element loops, and for reductions a fixed
// number of independent lane accumulators, which sum in the same order on every variant and
// thread count (cpu/lanes.h). The extension is compiled with -ffp-contract=off: no variant fuses
// a·b + c into an FMA, so what these kernels compute does not depend on the variant (and equals
// ATen's unfused expressions, e.g. the Python side's eval fold); the ATen/oneDNN convolutions they
// call pick their own code by the CPU. tests/test_cpu_variants.py checks that every CPU kernel gives
// the same bits on every variant the machine runs; a new reduction must keep that (fixed lanes, not
// an `omp simd reduction`, whose order follows the vector width).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SLSDEEP_CPU_HAS_VARIANTS 1
#else
#define SLSDEEP_CPU_HAS_VARIANTS 0
#endif

// _Pragma of its argument with the macros in it expanded (SLSDEEP_CPU_AVX512_WIDTH)
#define SLSDEEP_CPU_PRAGMA_TEXT(text) _Pragma(#text)
#define SLSDEEP_CPU_PRAGMA(text) SLSDEEP_CPU_PRAGMA_TEXT(text)
#if defined(SLSDEEP_CPU_VARIANT_AVX512)
#define SLSDEEP_CPU_VARIANT AVX512
#if defined(SLSDEEP_CPU_AVX512_ZMM)
#define SLSDEEP_CPU_AVX512_WIDTH "prefer-vector-width=512"
#else
#define SLSDEEP_CPU_AVX512_WIDTH "prefer-vector-width=256"
#endif
#define SLSDEEP_CPU_VARIANT_PUSH \
  _Pragma("GCC push_options")    \
  SLSDEEP_CPU_PRAGMA(GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma", SLSDEEP_CPU_AVX512_WIDTH))
#define SLSDEEP_CPU_VARIANT_POP _Pragma("GCC pop_options")
#elif defined(SLSDEEP_CPU_VARIANT_AVX2)
#define SLSDEEP_CPU_VARIANT AVX2
#define SLSDEEP_CPU_VARIANT_PUSH _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define SLSDEEP_CPU_VARIANT_POP _Pragma("GCC pop_options")
#else
#define SLSDEEP_CPU_VARIANT DEFAULT
#define SLSDEEP_CPU_VARIANT_DEFAULT 1
#define SLSDEEP_CPU_VARIANT_PUSH
#define SLSDEEP_CPU_VARIANT_POP
#endif

// Whether this translation unit compiles a variant at all (a wrapper of AVX2/AVX512 compiles to
// nothing where variants are not built).
#if defined(SLSDEEP_CPU_VARIANT_DEFAULT) || SLSDEEP_CPU_HAS_VARIANTS
#define SLSDEEP_CPU_VARIANT_BUILT 1
#else
#define SLSDEEP_CPU_VARIANT_BUILT 0
#endif

// Open and close the variant's code: after the file's #includes, around everything it defines.
#define SLSDEEP_CPU_VARIANT_BEGIN SLSDEEP_CPU_VARIANT_PUSH namespace slsdeep::cpu::SLSDEEP_CPU_VARIANT {
#define SLSDEEP_CPU_VARIANT_END \
  }                             \
  SLSDEEP_CPU_VARIANT_POP
