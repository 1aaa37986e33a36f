// Portability macros for the per-element maths in csrc/common, compiled both by the host compiler
// (CPU kernels) and by nvcc (CUDA kernels). Torch-free on purpose.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SLSDEEP_HD __host__ __device__ __forceinline__
#else
#define SLSDEEP_HD inline
#endif
